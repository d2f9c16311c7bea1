#!/usr/bin/env bash
# proxy-idle.sh - memory per idle tunnel: N idle TLS tunnels (an allowed
# SNI, established end to end, then silent) held through egressd's
# transparent proxy, and for comparison through HAProxy with an SNI
# allow-list, and through `egressd run --fast-path` (system egressd-fast),
# in a three-namespace topology of its own:
#
#   pidle-c 198.18.1.2 --veth-- 198.18.1.1 pidle-g 198.18.2.1 --veth-- 198.18.2.2 pidle-s
#                               nft: tcp/443 from the client -> REDIRECT to the proxy
#
# For each system: RSS (VmRSS) and open descriptors of the proxy process(es)
# before and with the N tunnels open; per tunnel = difference / N; and the
# kernel's part on the gateway, its conntrack entries (nf_conntrack_count
# of the gateway namespace, before and with the tunnels) times the
# nf_conntrack slab object size (/proc/slabinfo; the entries' extensions,
# allocated apart, are not counted). N is bounded by the descriptor limit
# (a tunnel costs the proxy two sockets, plus pipes where splice waits) and
# the client holds the tunnels for HOLD seconds at most; at the end of the
# hold, ECHO of them (spread over them) must still carry bytes both ways.
#
# egressd-fast: `egressd run --fast-path` (enforce, its own ruleset: the
# REDIRECT above is emptied for it), a policy allowing *.allowed.test on
# 443/tcp, names answered by a dnsmasq on the gateway's loopback (as
# bench/egressd-gw.sh), and the client asks egressd's DNS for the name
# first and dials the address it got (the fast path takes only addresses
# the forwarder gave this client). egressd decides each connection from
# its queued SYN and ClientHello and the kernel forwards the rest: egressd
# holds no socket for a tunnel, and its flow table forgets a decided one
# 30 s later. Its RSS is measured before, with the tunnels, once the table
# has let go of them (egress_proxy_fast_flows back to its count before,
# the tunnels still open and idle), and settled (SETTLE seconds later, past
# the Go runtime's forced collection every 2 minutes: egressd
# run has no signal to collect its garbage). Every tunnel must have been
# taken by the fast path (egress_proxy_fast_syns_total{result="fast"} rises
# by N, no other result rises, and N events close `fast-path`).
#
# Usage (root): bench/proxy-idle.sh      N=10000 SYSTEMS="egressd haproxy" bench/proxy-idle.sh
#   PROXYBENCH_FLAGS="-heapprofile /tmp/idle" N=3000 SYSTEMS=egressd bench/proxy-idle.sh: also heap and
#   goroutine profiles of proxybench with the tunnels open (/tmp/idle.heap, /tmp/idle.goroutine)
set -euo pipefail
export LC_ALL=C
cd "$(dirname "$0")/.."
N=${N:-10000}
HOLD=${HOLD:-20}
ECHO=${ECHO:-50}
SETTLE=${SETTLE:-130} # past the Go runtime's forced collection (every 2 minutes)
SYSTEMS=${SYSTEMS:-"egressd haproxy"}
PROXYBENCH_FLAGS=${PROXYBENCH_FLAGS:-} # more flags for proxybench, e.g. "-heapprofile /tmp/idle" (written at the settle's SIGUSR1)
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
case " $SYSTEMS " in *" egressd-fast "*) CGO_ENABLED=0 "$GO" build -o "$W/egressd" ./cmd/egressd ;; esac
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

# the kernel's part: established TCP connections to port 443 in the
# gateway's conntrack table (a proxied tunnel is two: the client's,
# redirected, and the proxy's to the server; a fast one is one)
ct_est() { nsx $NS_G awk '$1 == "ipv4" && $3 == "tcp" && / ESTABLISHED / && / dport=443 / { n++ } END { print n + 0 }' /proc/net/nf_conntrack; }
CT_OBJ=$(awk '$1 == "nf_conntrack" { print $4 }' /proc/slabinfo)
[ -n "$CT_OBJ" ] || die "no nf_conntrack slab in /proc/slabinfo"
# egressd run's admin server in the gateway namespace (egressd-fast)
metric() { nsx $NS_G curl -sf --max-time 5 http://127.0.0.1:9901/metrics | awk -v m="$1" '$1 == m { v = $2 } END { print v + 0 }'; }
fast_other() { nsx $NS_G curl -sf --max-time 5 http://127.0.0.1:9901/metrics | awk '/^egress_proxy_fast_syns_total\{/ && !/result="fast"/ { v += $2 } END { print v + 0 }'; }

declare -A R
idx=0
for sys in $SYSTEMS; do
	idx=$((idx + 1))
	SPORT=$((PORT + idx))
	nsx $NS_G nft flush chain ip pidle prerouting
	[ "$sys" = egressd-fast ] || nsx $NS_G nft add rule ip pidle prerouting iifname gwc tcp dport 443 redirect to :$SPORT
	target=198.18.2.2:443
	hold=$HOLD
	case $sys in
	egressd)
		ip netns exec $NS_G "$W/proxybench" -transparent :$SPORT -allow '*.allowed.test' -map www.allowed.test=198.18.2.2 $PROXYBENCH_FLAGS >"$W/$sys.log" 2>&1 &
		PID=$!
		per=${EGRESSD_FDS_PER_TUNNEL:-2} ;;
	egressd-fast)
		printf 'version: 1\nmode: enforce\nrules:\n  - name: bench\n    to: ["*.allowed.test"]\n    ports: [443/tcp]\n' >"$W/policy.yaml"
		nsx $NS_G dnsmasq -k --no-resolv --no-hosts --bind-interfaces --listen-address=127.0.0.1 --port=5353 \
			--address=/allowed.test/198.18.2.2 --address=/allowed.test/2001:db8::2 --local-ttl=3600 \
			--pid-file= >"$W/dnsmasq.log" 2>&1 &
		DNSMASQ=$!
		ip netns exec $NS_G "$W/egressd" run --policy "$W/policy.yaml" --fast-path \
			--proxy-listen ":$SPORT" --explicit-proxy-listen off --lan gwc --wan gws \
			--upstream-dns 127.0.0.1:5353 --dns-listen :53 --state-dir "$W/state" --admin 127.0.0.1:9901 \
			--log-format json >"$W/$sys.log" 2>&1 &
		PID=$!
		for i in $(seq 1 100); do nsx $NS_G curl -sf --max-time 2 http://127.0.0.1:9901/readyz >/dev/null 2>&1 && break; sleep 0.3; done
		nsx $NS_G curl -sf --max-time 2 http://127.0.0.1:9901/readyz >/dev/null || die "$sys not ready: $(tail -5 "$W/$sys.log")"
		nsx $NS_G nft list table inet egressd >/dev/null 2>&1 || die "$sys installed no table"
		ip=$(nsx $NS_C dig +short +tries=2 +time=2 @198.18.1.1 www.allowed.test A | head -1)
		[ "$ip" = 198.18.2.2 ] || die "$sys: egressd's DNS answered '$ip' for www.allowed.test"
		target=$ip:443
		hold=$((HOLD + 240 + SETTLE)) # ended by SIGUSR1 once measured
		fast0=$(metric 'egress_proxy_fast_syns_total{result="fast"}')
		other0=$(fast_other)
		flows0=$(metric egress_proxy_fast_flows)
		heap0=$(metric go_memstats_heap_inuse_bytes)
		per=0 ;;
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
	if [ "$per" -gt 0 ]; then
		max=$(( (LIMIT - 200) / per ))
		if [ "$n" -gt "$max" ]; then
			log "$sys: the descriptor limit $LIMIT allows about $max tunnels ($per descriptors each); using $max"
			n=$max
		fi
	fi
	PIDS="$PID $(pgrep -P $PID | tr '\n' ' ' || true)"
	before_rss=$(sum_rss $PIDS); before_fds=$(sum_fds $PIDS); before_ct=$(ct_est)
	: >"$W/client.out"
	t0=$(date +%s)
	# ip netns exec runs the client itself: CPID is its PID (SIGUSR1 below)
	ip netns exec $NS_C "$W/idletunnels" client -target "$target" -n "$n" -hold "${hold}s" -echo "$ECHO" >"$W/client.out" 2>&1 &
	CPID=$!
	for i in $(seq 1 600); do grep -q established "$W/client.out" && break; sleep 0.5; done
	grep -q established "$W/client.out" || die "$sys: tunnels not established: $(cat "$W/client.out")"
	log "$sys: $(cat "$W/client.out") in $(( $(date +%s) - t0 )) s"
	sleep 2
	PIDS="$PID $(pgrep -P $PID | tr '\n' ' ' || true)"
	after_rss=$(sum_rss $PIDS); after_fds=$(sum_fds $PIDS); after_ct=$(ct_est)
	est=$(awk '/established/ { print $2 }' "$W/client.out")
	[ "$est" -gt 0 ] || die "$sys: no tunnel established"
	gone_rss=-
	if [ "$sys" = egressd-fast ]; then
		# every tunnel taken by the fast path, none by the proxy
		fast=$(( $(metric 'egress_proxy_fast_syns_total{result="fast"}') - fast0 ))
		other=$(( $(fast_other) - other0 ))
		heap1=$(metric go_memstats_heap_inuse_bytes)
		log "$sys: fast_syns fast +$fast, other results +$other, fast_flows $(metric egress_proxy_fast_flows), conntrack established $after_ct"
		[ "$fast" -eq "$est" ] && [ "$other" -eq 0 ] || die "$sys: $est tunnels but fast_syns fast +$fast, other +$other"
		# the flow table lets go of a decided connection 30 s after its decision
		for i in $(seq 1 240); do [ "$(metric egress_proxy_fast_flows)" -le "$flows0" ] && break; sleep 1; done
		flows=$(metric egress_proxy_fast_flows)
		[ "$flows" -le "$flows0" ] || die "$sys: the flow table still holds $flows connections"
		log "$sys: the flow table let go of them $(( $(date +%s) - t0 )) s after the first dial; conntrack established $(ct_est)"
		gone_rss=$(sum_rss $PIDS)
		heap2=$(metric go_memstats_heap_inuse_bytes)
		sleep "$SETTLE"
		heap3=$(metric go_memstats_heap_inuse_bytes)
		# the Go heap in use (live and not yet collected), per tunnel: with
		# the tunnels, once the table let go, settled
		log "$sys: go_memstats_heap_inuse_bytes $heap0 before; per tunnel $(awk -v h0="$heap0" -v a="$heap1" -v b="$heap2" -v c="$heap3" -v n="$est" \
			'BEGIN { printf "%.2f KiB with the tunnels, %.2f once the table let go, %.2f settled", (a - h0) / n / 1024, (b - h0) / n / 1024, (c - h0) / n / 1024 }')"
	fi
	# settled: after a garbage collection (egressd: SIGUSR1 to proxybench;
	# haproxy has no garbage to collect, the same figure is shown;
	# egressd-fast: SETTLE seconds later, egressd run has no such signal)
	if [ "$sys" = egressd ]; then
		kill -USR1 $PID; sleep 2
		[ -z "$PROXYBENCH_FLAGS" ] || grep -a '^proxybench: goroutines' "$W/$sys.log" | tail -1 >&2 || true
	fi
	settled_rss=$(sum_rss $PIDS); end_fds=$(sum_fds $PIDS)
	# the tunnels, idle all this time, must still carry bytes
	kill -USR1 $CPID 2>/dev/null || true
	wait $CPID 2>/dev/null || true
	echo_line=$(awk '/^echo/ { print $2 "/" $4 }' "$W/client.out")
	[ -n "$echo_line" ] || echo_line=none
	[ "$echo_line" = "$ECHO/$ECHO" ] || [ "$ECHO" = 0 ] || log "$sys: WARNING: echo $echo_line"
	if [ "$sys" = egressd-fast ]; then
		# one event per connection, closed fast-path (the event log is
		# buffered: wait for it)
		for i in $(seq 1 30); do
			ev=$(grep -c '"close":"fast-path"' "$W/state/events.ndjson" 2>/dev/null || true)
			[ "$ev" -ge "$est" ] && break
			sleep 1
		done
		log "$sys: $ev events close fast-path (events.ndjson) for $est tunnels; fds at the end $end_fds"
	fi
	R[$sys]=$(awk -v b="$before_rss" -v a="$after_rss" -v g="$gone_rss" -v s="$settled_rss" -v n="$est" -v bf="$before_fds" -v af="$after_fds" \
		-v bc="$before_ct" -v ac="$after_ct" -v o="$CT_OBJ" -v e="$echo_line" \
		'BEGIN { gg = g == "-" ? "-" : sprintf("%.2f", (g - b) / n)
			printf "%8d %9.0f %9.0f %10.2f %10s %10.2f %8.1f %8.2f %10.2f %7s", n, b, a, (a - b) / n, gg, (s - b) / n, (af - bf) / n, (ac - bc) / n, (ac - bc) / n * o / 1024, e }')
	log "$sys: ${R[$sys]}"
	kill $PID 2>/dev/null || true; wait $PID 2>/dev/null || true
	if [ "$sys" = egressd-fast ]; then
		kill "$DNSMASQ" 2>/dev/null || true; wait "$DNSMASQ" 2>/dev/null || true
		# its ruleset stays after it stops (it keeps fast connections across a restart)
		nsx $NS_G nft delete table inet egressd 2>/dev/null || true
	fi
	sleep 1
done
echo
echo "idle tunnels: $(nproc) CPUs, kernel $(uname -r), descriptor limit $LIMIT; RSS of the proxy process(es), before and with the tunnels;"
echo "let go: egressd-fast once its flow table forgot them (tunnels still open); settled: egressd after a GC, egressd-fast ${SETTLE} s later;"
echo "conntrack: established entries to port 443 in the gateway per tunnel, times the nf_conntrack slab object ($CT_OBJ bytes); echo: tunnels that carried bytes at the end"
printf '%-13s %8s %9s %9s %10s %10s %10s %8s %8s %10s %7s\n' system tunnels "RSS0 KiB" "RSS KiB" KiB/tunnel "let go K/t" "settled/t" fds/tun ct/tun "ct KiB/t" echo
for sys in $SYSTEMS; do printf '%-13s %s\n' "$sys" "${R[$sys]}"; done
