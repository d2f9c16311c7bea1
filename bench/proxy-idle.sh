#!/usr/bin/env bash
# proxy-idle.sh - memory per idle tunnel: N idle TLS tunnels (an allowed
# SNI, established end to end, then silent) held through egressd's
# transparent proxy, and for comparison through HAProxy with an SNI
# allow-list, in a three-namespace topology of its own:
#
#   pidle-c 198.18.1.2 --veth-- 198.18.1.1 pidle-g 198.18.2.1 --veth-- 198.18.2.2 pidle-s
#                               nft: tcp/443 from the client -> REDIRECT to the proxy
#
# For each system: RSS (VmRSS) and open descriptors of the proxy process(es)
# before and with the N tunnels open; per tunnel = difference / N.
# N is bounded by the descriptor limit (a tunnel costs the proxy two
# sockets, plus pipes where splice waits) and the client holds the tunnels
# for HOLD seconds at most.
#
# Usage (root): bench/proxy-idle.sh      N=10000 SYSTEMS="egressd haproxy" bench/proxy-idle.sh
set -euo pipefail
export LC_ALL=C
cd "$(dirname "$0")/.."
N=${N:-10000}
HOLD=${HOLD:-20}
SYSTEMS=${SYSTEMS:-"egressd haproxy"}
NS_C=pidle-c; NS_G=pidle-g; NS_S=pidle-s
PORT=15001
W=
nsx() { local ns=$1; shift; ip netns exec "$ns" "$@"; }
log() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }
ns_exists() { ip netns list 2>/dev/null | awk '{print $1}' | grep -qx -- "$1"; }
cleanup() {
	local ns pids
	for ns in $NS_C $NS_G $NS_S; do
		ns_exists "$ns" || continue
		pids=$(ip netns pids "$ns" | tr '\n' ' ')
		[ -z "${pids// /}" ] || kill -9 $pids 2>/dev/null || true
	done
	for ns in $NS_C $NS_G $NS_S; do ns_exists "$ns" && ip netns del "$ns"; done
	[ -z "$W" ] || rm -rf "$W"
	return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM
[ "$(id -u)" = 0 ] || die "must run as root"
cleanup
W=$(mktemp -d /tmp/proxy-idle.XXXXXX)
GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
"$GO" build -o "$W/proxybench" ./bench/cmd/proxybench
"$GO" build -o "$W/idletunnels" ./bench/cmd/idletunnels
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
LIMIT=$(ulimit -n)

for ns in $NS_C $NS_G $NS_S; do
	ip netns add $ns
	nsx $ns sysctl -qw net.ipv6.conf.all.disable_ipv6=1
	nsx $ns ip link set lo up
	nsx $ns sysctl -qw net.ipv4.ip_local_port_range="1024 65000"
done
ip link add c0 netns $NS_C type veth peer name gwc netns $NS_G
ip link add s0 netns $NS_S type veth peer name gws netns $NS_G
nsx $NS_C ip addr add 198.18.1.2/24 dev c0; nsx $NS_C ip link set c0 up
nsx $NS_C ip route add 198.18.0.0/15 via 198.18.1.1
nsx $NS_G ip addr add 198.18.1.1/24 dev gwc; nsx $NS_G ip link set gwc up
nsx $NS_G ip addr add 198.18.2.1/24 dev gws; nsx $NS_G ip link set gws up
nsx $NS_S ip addr add 198.18.2.2/24 dev s0; nsx $NS_S ip link set s0 up
nsx $NS_S ip route add 198.18.0.0/15 via 198.18.2.1
nsx $NS_G sysctl -qw net.ipv4.ip_forward=1
printf 'table ip pidle {\n\tchain prerouting {\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n\t\tiifname "gwc" tcp dport 443 redirect to :%s\n\t}\n}\n' $PORT >"$W/redirect.nft"
nsx $NS_G nft -f "$W/redirect.nft"
nsx $NS_S "$W/idletunnels" server -listen 198.18.2.2:443 &
sleep 0.3

rss_kb() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
fds() { ls "/proc/$1/fd" | wc -l; }
# all processes of a system (haproxy: master + worker)
sum_rss() { local t=0 p; for p in "$@"; do t=$((t + $(rss_kb "$p"))); done; echo $t; }
sum_fds() { local t=0 p; for p in "$@"; do t=$((t + $(fds "$p"))); done; echo $t; }

declare -A R
idx=0
for sys in $SYSTEMS; do
	idx=$((idx + 1))
	SPORT=$((PORT + idx))
	nsx $NS_G nft flush chain ip pidle prerouting
	nsx $NS_G nft add rule ip pidle prerouting iifname gwc tcp dport 443 redirect to :$SPORT
	case $sys in
	egressd)
		ip netns exec $NS_G "$W/proxybench" -transparent :$SPORT -allow '*.allowed.test' -map www.allowed.test=198.18.2.2 >"$W/$sys.log" 2>&1 &
		PID=$!
		per=${EGRESSD_FDS_PER_TUNNEL:-2} ;;
	haproxy)
		{
			printf 'global\n\tmaxconn %d\n\tnbthread 2\n' $((LIMIT / 2 - 100))
			printf 'defaults\n\tmode tcp\n\ttimeout connect 3s\n\ttimeout client 10m\n\ttimeout server 10m\n'
			printf 'frontend sni_filter\n\tbind :%s\n\ttcp-request inspect-delay 5s\n' $SPORT
			printf '\tacl sni_allowed req.ssl_sni,lower -m end .allowed.test\n'
			printf '\ttcp-request content accept if { req.ssl_hello_type 1 } sni_allowed\n\ttcp-request content reject\n'
			printf '\tdefault_backend original_dst\nbackend original_dst\n\tserver orig 0.0.0.0:0\n'
		} >"$W/haproxy.cfg"
		ip netns exec $NS_G haproxy -db -f "$W/haproxy.cfg" >"$W/$sys.log" 2>&1 &
		PID=$!
		per=2 ;;
	*) die "unknown system $sys" ;;
	esac
	sleep 1
	kill -0 $PID 2>/dev/null || die "$sys did not start: $(cat "$W/$sys.log")"
	n=$N
	max=$(( (LIMIT - 200) / per ))
	if [ "$n" -gt "$max" ]; then
		log "$sys: the descriptor limit $LIMIT allows about $max tunnels ($per descriptors each); using $max"
		n=$max
	fi
	PIDS="$PID $(pgrep -P $PID | tr '\n' ' ' || true)"
	before_rss=$(sum_rss $PIDS); before_fds=$(sum_fds $PIDS)
	: >"$W/client.out"
	nsx $NS_C "$W/idletunnels" client -target 198.18.2.2:443 -n "$n" -hold "${HOLD}s" >"$W/client.out" 2>&1 &
	CPID=$!
	for i in $(seq 1 600); do grep -q established "$W/client.out" && break; sleep 0.5; done
	grep -q established "$W/client.out" || die "$sys: tunnels not established: $(cat "$W/client.out")"
	sleep 2
	PIDS="$PID $(pgrep -P $PID | tr '\n' ' ' || true)"
	after_rss=$(sum_rss $PIDS); after_fds=$(sum_fds $PIDS)
	est=$(awk '/established/ { print $2 }' "$W/client.out")
	# settled: after a garbage collection (egressd: SIGUSR1 to proxybench;
	# haproxy has no garbage to collect, the same figure is shown)
	if [ "$sys" = egressd ]; then kill -USR1 $PID; sleep 2; fi
	settled_rss=$(sum_rss $PIDS)
	R[$sys]=$(awk -v b="$before_rss" -v a="$after_rss" -v s="$settled_rss" -v n="$est" -v bf="$before_fds" -v af="$after_fds" \
		'BEGIN { printf "%8d %10.0f %10.0f %12.2f %14.2f %10.1f", n, b, a, (a - b) / n, (s - b) / n, (af - bf) / n }')
	log "$sys: $(cat "$W/client.out"): ${R[$sys]}"
	kill $CPID 2>/dev/null || true; wait $CPID 2>/dev/null || true
	kill $PID 2>/dev/null || true; wait $PID 2>/dev/null || true
	sleep 1
done
echo
echo "idle tunnels: $(nproc) CPUs, kernel $(uname -r), descriptor limit $LIMIT; RSS of the proxy process(es), before and with the tunnels"
printf '%-10s %8s %10s %10s %12s %14s %10s\n' system tunnels "RSS0 KiB" "RSS KiB" "KiB/tunnel" "settled KiB/t" "fds/tunnel"
for sys in $SYSTEMS; do printf '%-10s %s\n' "$sys" "${R[$sys]}"; done
