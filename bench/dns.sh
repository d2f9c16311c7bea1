#!/usr/bin/env bash
# bench/dns.sh - egressd's filtering DNS forwarder (dnsfilter) against unbound
# and dnsmasq configured as allow-list forwarders, and against querying the
# upstream directly, with dnsperf, in one run on this machine.
#
# Same method as ../shared/bench-peers/peers-dns.sh (whose figures the issue
# quotes): everything lives on the loopback of a private network namespace
# with no other interface, so no packet can leave it. The upstream is unbound
# answering from local data (allowed.test, denied.test, evil.example; 1000
# names each) on 127.0.0.1:5300. Every forwarder allows *.allowed.test and
# refuses the rest. The query file is 75% allowed names (each 3 times) and
# 25% denied ones, shuffled deterministically; dnsperf loops over it, so a
# cache warms up after one pass ("warm cache"); the -nocache variants send
# every allowed query upstream ("misses").
#
# Usage: sudo bench/dns.sh    (from the repository root; needs unbound,
#        unbound-control, dnsmasq, dnsperf, dig, go)
# Knobs: SYSTEMS, ROUNDS (3), DNSPERF_SECS (10), DNSPERF_CLIENTS (8),
#        DNSPERF_Q (100), LIGHT_QPS (5000, 0 = skip), LIGHT_SECS (4),
#        NAMES (1000), BENCH_DNS_DIR (/tmp/bench-dns-egressd),
#        DNSBENCH_ARGS (more flags for egressd's dnsbench, e.g.
#        "-cpuprofile F" or "-memprofile F" with SYSTEMS naming one
#        egressd variant), DNSBENCH_BIN (a binary run for the egressd
#        systems instead of dnsbench, with dnsbench's flags: e.g. one
#        built from bench/cmd/udpfloor, the floor of a Go responder),
#        DNSBENCH_ENV (variables for the egressd systems' environment
#        only, e.g. "GOMAXPROCS=1": a one-CPU machine's runtime),
#        QUERY_LOG (1: every system records every query, as a deployed
#        filter would: unbound's log-queries and dnsmasq's --log-queries to
#        a file in the scratch directory, egressd's canonical log line at
#        info and its audit journal, as egressd run does; default 0: none
#        of them records queries).
set -euo pipefail
export LC_ALL=C
cd "$(dirname "$0")/.."

W=${BENCH_DNS_DIR:-/tmp/bench-dns-egressd}
NS=bdns-egressd
UP_PORT=5300
SYSTEMS=${SYSTEMS:-"direct dnsmasq unbound egressd dnsmasq-nocache unbound-nocache egressd-nocache"}
ROUNDS=${ROUNDS:-3}
QUERY_LOG=${QUERY_LOG:-0}
SECS=${DNSPERF_SECS:-10}
CLIENTS=${DNSPERF_CLIENTS:-8}
OUTSTANDING=${DNSPERF_Q:-100}
NAMES=${NAMES:-1000}
LIGHT_QPS=${LIGHT_QPS:-5000}
LIGHT_SECS=${LIGHT_SECS:-4}

say() { printf '[%s] %s\n' "$(date +%T)" "$*" >&2; }
fail() { say "FATAL: $*"; exit 1; }
inns() { ip netns exec "$NS" "$@"; }
have_ns() { ip netns list 2>/dev/null | awk '{print $1}' | grep -qx -- "$NS"; }

# Every process in the namespace was started by this script: stop them by PID.
stop_ns_procs() {
	local pids i
	have_ns || return 0
	pids=$(ip netns pids "$NS" 2>/dev/null | tr '\n' ' ')
	[ -n "${pids// /}" ] || return 0
	kill $pids 2>/dev/null || true
	for i in $(seq 1 30); do
		pids=$(ip netns pids "$NS" 2>/dev/null | tr '\n' ' ')
		[ -z "${pids// /}" ] && return 0
		sleep 0.1
	done
	kill -9 $pids 2>/dev/null || true
}
cleanup() {
	stop_ns_procs
	if have_ns; then ip netns del "$NS"; fi
	# QUERY_LOG's query logs: about 250 MB per system in 30 s at saturation.
	rm -f "$W"/*.queries
	return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM

listening() { # port
	local i
	for i in $(seq 1 100); do
		[ -n "$(inns ss -Hlun "sport = :$1" 2>/dev/null)" ] && return 0
		sleep 0.1
	done
	return 1
}

make_data() {
	mkdir -p "$W"
	local i z
	{
		for z in allowed.test denied.test evil.example; do echo "local-zone: \"$z.\" static"; done
		for ((i = 0; i < NAMES; i++)); do
			printf 'local-data: "h%04d.allowed.test. 3600 IN A 192.0.2.%d"\n' $i $((i % 250 + 1))
			printf 'local-data: "h%04d.denied.test. 3600 IN A 198.51.100.%d"\n' $i $((i % 250 + 1))
			printf 'local-data: "h%04d.evil.example. 3600 IN A 203.0.113.%d"\n' $i $((i % 250 + 1))
		done
	} >"$W/zone.conf"
	{
		for ((i = 0; i < NAMES; i++)); do
			printf 'h%04d.allowed.test A\nh%04d.allowed.test A\nh%04d.allowed.test A\n' $i $i $i
			if ((i % 2)); then printf 'h%04d.denied.test A\n' $i; else printf 'h%04d.evil.example A\n' $i; fi
		done
	} | shuf --random-source=<(yes) >"$W/queries.txt"
}

unbound_conf() { # port name
	cat <<-EOF
	server:
		interface: 127.0.0.1@$1
		do-ip6: no
		num-threads: 2
		so-reuseport: yes
		chroot: ""
		username: ""
		directory: "$W"
		pidfile: "$W/$2.pid"
		use-syslog: no
		logfile: ""
		verbosity: 0
		module-config: "iterator"
		access-control: 127.0.0.0/8 allow
	remote-control:
		control-enable: yes
		control-interface: "$W/$2.ctl"
		control-use-cert: no
	EOF
}

start_upstream() {
	{
		unbound_conf $UP_PORT upstream
		printf 'server:\n\tlocal-zone: "." refuse\n\tinclude: "%s/zone.conf"\n' "$W"
	} >"$W/upstream.conf"
	unbound-checkconf "$W/upstream.conf" >/dev/null || fail "upstream config"
	inns unbound -d -c "$W/upstream.conf" >"$W/upstream.log" 2>&1 &
	listening $UP_PORT || fail "upstream did not start: $(tail -3 "$W/upstream.log")"
}

upstream_count() {
	{ inns unbound-control -c "$W/upstream.conf" stats_noreset 2>/dev/null || true; } |
		awk -F= '$1 == "total.num.queries" { n = $2 } END { print n + 0 }'
}

# dnsmasq_log prints dnsmasq's logging flags: its log to stderr, or with
# QUERY_LOG=1 every query to a file.
dnsmasq_log() {
	if [ "$QUERY_LOG" = 1 ]; then
		echo "--log-queries --log-facility=$W/$1.queries"
	else
		echo "--log-facility=-"
	fi
}

declare -A PORT
start_system() { # name port
	local sys=$1 p=$2
	case $sys in
	dnsmasq | dnsmasq-nocache)
		local cs=10000
		[ "$sys" = dnsmasq-nocache ] && cs=0
		inns dnsmasq --keep-in-foreground --conf-file=/dev/null --no-resolv --no-hosts \
			--listen-address=127.0.0.1 --bind-interfaces --port="$p" \
			--server=/allowed.test/127.0.0.1#$UP_PORT --cache-size=$cs --dns-forward-max=1000 \
			--pid-file="$W/$sys.pid" $(dnsmasq_log "$sys") >"$W/$sys.log" 2>&1 &
		;;
	unbound | unbound-nocache)
		{
			unbound_conf "$p" "$sys"
			cat <<-EOF
			server:
				do-not-query-localhost: no
				local-zone: "." refuse
				local-zone: "test." refuse
				local-zone: "allowed.test." transparent
			forward-zone:
				name: "allowed.test."
				forward-addr: 127.0.0.1@$UP_PORT
			EOF
			if [ "$QUERY_LOG" = 1 ]; then
				printf 'server:\n\tlog-queries: yes\n\tlogfile: "%s/%s.queries"\n' "$W" "$sys"
			fi
			if [ "$sys" = unbound-nocache ]; then
				printf 'server:\n\tcache-max-ttl: 0\n\tcache-max-negative-ttl: 0\n\tprefetch: no\n'
			fi
		} >"$W/$sys.conf"
		unbound-checkconf "$W/$sys.conf" >/dev/null || fail "$sys config"
		inns unbound -d -c "$W/$sys.conf" >"$W/$sys.log" 2>&1 &
		;;
	egressd | egressd-nocache)
		local extra=""
		[ "$sys" = egressd-nocache ] && extra=-no-cache
		[ "$QUERY_LOG" = 1 ] && extra="$extra -log info -journal"
		inns env ${DNSBENCH_ENV:-} "${DNSBENCH_BIN:-$W/dnsbench}" -listen "127.0.0.1:$p" -upstream "127.0.0.1:$UP_PORT" -allow '*.allowed.test' $extra ${DNSBENCH_ARGS:-} >"$W/$sys.log" 2>&1 &
		;;
	*) fail "unknown system $sys" ;;
	esac
	listening "$p" || fail "$sys did not start on :$p ($(tail -3 "$W/$sys.log" | tr '\n' ' '))"
}

declare -A ALLOWED DENIED
status_of() { # port name
	local out
	out=$(inns dig +tries=1 +time=2 @127.0.0.1 -p "$1" "$2" A 2>&1) || { echo no-answer; return; }
	echo "$out" | awk '/status:/ { for (i = 1; i <= NF; i++) if ($i == "status:") { s = $(i + 1); sub(",", "", s) } }
		/^[^;].*[[:space:]]IN[[:space:]]+A[[:space:]]/ { a = $NF } END { print s (a ? "(" a ")" : "") }'
}
check_system() {
	local sys=$1 p=${PORT[$1]} a d e
	a=$(status_of "$p" h0007.allowed.test)
	d=$(status_of "$p" h0007.denied.test)
	e=$(status_of "$p" h0008.evil.example)
	say "$sys: allowed -> $a; denied.test -> $d; evil.example -> $e"
	case $a in NOERROR\(*) ;; *) fail "$sys does not resolve an allowed name" ;; esac
	ALLOWED[$sys]=${a%%(*}
	DENIED[$sys]=${d%%(*}
	[ "${d%%(*}" = "${e%%(*}" ] || DENIED[$sys]="${d%%(*}/${e%%(*}"
	if [ "$sys" != direct ] && { [[ $d == NOERROR* ]] || [[ $e == NOERROR* ]]; }; then
		fail "$sys resolved a denied name"
	fi
}

perf() { # sys secs [extra] -> "qps avg_ms p99_ms lost completed"
	local sys=$1 secs=$2 out=$W/perf.out
	shift 2
	inns timeout $((secs + 20)) dnsperf -s 127.0.0.1 -p "${PORT[$sys]}" -d "$W/queries.txt" \
		-l "$secs" -c "$CLIENTS" -q "$OUTSTANDING" -t 2 -v "$@" >"$out" 2>&1 || true
	grep -v '^>' "$out" | sed "s/^/[$sys] /" >>"$W/dnsperf.log"
	awk '
		/^> / { if ($2 == "T") next; us = int($5 * 1e6 + 0.5); c[us]++; n++; if (us > max) max = us; next }
		/Queries per second:/ { qps = $4 }
		/Average Latency/ { avg = $4 * 1000 }
		/Queries lost:/ { lost = $3 }
		/Queries completed:/ { done = $3 }
		END {
			p99 = "NA"
			if (n > 0) { need = 0.99 * n; cum = 0
				for (i = 0; i <= max; i++) if (i in c) { cum += c[i]; if (cum >= need) { p99 = sprintf("%.3f", i / 1000); break } } }
			printf "%.0f %.3f %s %d %d\n", qps, avg, p99, lost, done
		}' "$out"
	rm -f "$out"
}

median() { tr ' ' '\n' | grep -v '^$' | grep -v NA | sort -g | awk '{ a[NR] = $1 } END { if (NR == 0) print "NA"; else if (NR % 2) print a[(NR + 1) / 2]; else printf "%.3f\n", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
ratio() { awk -v v="$1" -v b="$2" 'BEGIN { if (v == "NA" || b == "NA" || v == "" || b == "" || b + 0 == 0) print "-"; else printf "%.2f", v / b }'; }
busy_pct() {
	local a b
	a=$(awk '/^cpu / { print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9 }' /proc/stat)
	sleep 1
	b=$(awk '/^cpu / { print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9 }' /proc/stat)
	echo "$a $b" | awk '{ d = $4 - $2; printf "%.0f", (d > 0 ? 100 * ($3 - $1) / d : 0) }'
}

[ "$(id -u)" = 0 ] || fail "run as root (network namespace)"
for t in unbound unbound-control unbound-checkconf dnsmasq dnsperf dig shuf go; do
	command -v $t >/dev/null || fail "missing tool: $t"
done
T0=$(date +%s)
cleanup
mkdir -p "$W"
: >"$W/dnsperf.log"
say "building bench/cmd/dnsbench"
CGO_ENABLED=0 go build -trimpath -o "$W/dnsbench" ./bench/cmd/dnsbench
BUSY=$(busy_pct)
say "CPU busy before start (other tenants): ${BUSY}%"
make_data
ip netns add "$NS"
inns ip link set lo up
start_upstream
i=0
for sys in $SYSTEMS; do
	i=$((i + 1))
	if [ "$sys" = direct ]; then PORT[direct]=$UP_PORT; continue; fi
	PORT[$sys]=$((UP_PORT + i))
	start_system "$sys" "${PORT[$sys]}"
done
for sys in $SYSTEMS; do check_system "$sys"; done

declare -A QPS AVG P99 LOST UPQ
for r in $(seq 1 "$ROUNDS"); do
	for sys in $SYSTEMS; do
		u0=$(upstream_count)
		set -- $(perf "$sys" "$SECS")
		u1=$(upstream_count)
		QPS[$sys]="${QPS[$sys]:-} $1"
		AVG[$sys]="${AVG[$sys]:-} $2"
		P99[$sys]="${P99[$sys]:-} $3"
		LOST[$sys]=$((${LOST[$sys]:-0} + $4))
		u=$(awk -v u=$((u1 - u0)) -v d="$5" 'BEGIN { if (d > 0) printf "%.2f", u / d; else print "NA" }')
		UPQ[$sys]="${UPQ[$sys]:-} $u"
		say "$sys round $r/$ROUNDS: $1 q/s, avg $2 ms, p99 $3 ms, lost $4, upstream/query $u"
	done
done
declare -A LAVG LP99
if [ "$LIGHT_QPS" -gt 0 ]; then
	for sys in $SYSTEMS; do
		set -- $(perf "$sys" "$LIGHT_SECS" -Q "$LIGHT_QPS")
		LAVG[$sys]=$2
		LP99[$sys]=$3
		LOST[$sys]=$((${LOST[$sys]:-0} + $4))
		say "$sys light ($LIGHT_QPS q/s): avg $2 ms, p99 $3 ms, lost $4"
	done
fi

base=direct
case " $SYSTEMS " in *" direct "*) ;; *) base=$(echo $SYSTEMS | awk '{ print $1 }') ;; esac
declare -A MQ MA MP MU
for sys in $SYSTEMS; do
	MQ[$sys]=$(echo "${QPS[$sys]}" | median)
	MA[$sys]=$(echo "${AVG[$sys]}" | median)
	MP[$sys]=$(echo "${P99[$sys]}" | median)
	MU[$sys]=$(echo "${UPQ[$sys]}" | median)
done
{
	echo
	echo "DNS filtering forwarders, $(nproc) CPUs (${BUSY}% busy before start); saturation: dnsperf -l $SECS -c $CLIENTS -q $OUTSTANDING,"
	echo "median of $ROUNDS interleaved rounds; light: dnsperf -Q $LIGHT_QPS -l $LIGHT_SECS; $(wc -l <"$W/queries.txt") queries/pass, 75% allowed"
	[ "$QUERY_LOG" = 1 ] && echo "QUERY_LOG=1: every forwarder records every query (unbound, dnsmasq: query logs; egressd: log line and audit journal)"
	printf '%-16s %8s %6s %7s %6s %7s %6s | %7s %7s %6s | %5s %5s  %-7s %-7s\n' \
		system "q/s" "x$base" "avg ms" "x$base" "p99 ms" "x$base" "L avg" "L p99" "x$base" lost "up/q" allowed denied
	for sys in $SYSTEMS; do
		printf '%-16s %8s %6s %7s %6s %7s %6s | %7s %7s %6s | %5s %5s  %-7s %-7s\n' "$sys" \
			"${MQ[$sys]}" "$(ratio "${MQ[$sys]}" "${MQ[$base]}")" \
			"${MA[$sys]}" "$(ratio "${MA[$sys]}" "${MA[$base]}")" \
			"${MP[$sys]}" "$(ratio "${MP[$sys]}" "${MP[$base]}")" \
			"${LAVG[$sys]:--}" "${LP99[$sys]:--}" "$(ratio "${LP99[$sys]:-NA}" "${LP99[$base]:-NA}")" \
			"${LOST[$sys]}" "${MU[$sys]}" "${ALLOWED[$sys]}" "${DENIED[$sys]}"
	done
} | tee "$W/results.txt"
say "elapsed $(($(date +%s) - T0))s; dnsperf summaries in $W/dnsperf.log"
