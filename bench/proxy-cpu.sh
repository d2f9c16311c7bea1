#!/usr/bin/env bash
# proxy-cpu.sh - CPU time per new TLS connection: of the whole box under
# direct routing, and of each transparent proxy (user and kernel) under the
# same wrk load, in the shared peers script's three-namespace topology.
#
# The ratios of proxy-tls.sh move by +-0.2 between runs on a shared box;
# CPU per connection moves much less, and it says what a proxy may spend:
# when wrk, nginx and the kernel saturate the box, a proxy that adds X us of
# CPU to a connection whose direct path costs B us of the box's CPU reaches
# at most B / (B + X) of direct routing's connection rate. X includes the
# proxy's system calls and the kernel's work for its second TCP connection.
#
# Systems (SYSTEMS, default "direct haproxy-plain haproxy egressd"):
#   direct         routing only: the box's CPU per connection (B)
#   haproxy-plain  HAProxy forwarding to the original destination with no
#                  inspection at all: the least a TCP-terminating proxy
#                  costs here
#   haproxy        HAProxy with the SNI allow-list (peers-tls.sh's)
#   sniproxy       sniproxy (peers-tls.sh's): one thread, an event loop,
#                  read and write through buffers (no splice)
#   nginx          nginx stream with ssl_preread (peers-tls.sh's), its
#                  master and workers in the gateway namespace
#   egressd        bench/cmd/proxybench, as bench/proxy-tls.sh runs it
#   egressd-daemon `egressd run` itself (bench/egressd-gw.sh: with its DNS
#                  forwarder, capture on the client-side interface, journal
#                  and admin server)
#   floor-goroutine, floor-epoll, floor-hybrid  bench/cmd/tcpfloor: a Go
#                  transparent proxy that does nothing but forward (splice,
#                  half-close), built as egressd's is (goroutines, net
#                  package), as an event loop on its own epoll, or the first
#                  way until the first bytes are replayed and the second for
#                  the splicing: the floor of each way in Go
# Each system runs alone in its own topology (one peers-script run each);
# ROUNDS (default 2) repeats the whole list, round-robin.
#
# RATE=N replaces wrk's closed loop with bench/cmd/tlsrate's open loop at N
# new connections/s (as bench/proxy-latency.sh does): the figures are then
# those of a fixed load below saturation, and the run's p50 and p99 are
# printed with them. For every proxy the script also sums its threads'
# run-queue wait (/proc/PID/task/*/schedstat, the time a runnable thread
# waited for a CPU) per connection, and how many time slices it ran in.
# PROXYBENCH_ENV="GOMAXPROCS=1" puts variables in egressd's environment only.
#
# DNS_QPS=N (egressd-daemon only) also sends N DNS queries a second from
# the client namespace to the daemon's forwarder (dnsperf, allowed names
# from its cache after the first pass) over the sampled seconds, as a
# site's clients do while they connect: the proxy's figures then include
# what the forwarder beside it costs it. dnsperf's summary is printed.
#
# BULK=1 measures bulk instead of new connections: one download of BULK_MIB
# (default 4096) MiB through each system, CPU sampled over SAMPLE_SECS
# (default 3) of it, and every figure per MiB instead of per connection
# (no latencies). A proxy that copies slowly enough never finds its socket
# empty; one that splices wakes more often: the time slices say which.
#
# Usage (root): bench/proxy-cpu.sh   [SYSTEMS=... ROUNDS=N WRK_SECS=14
#   SAMPLE_SECS=10 PEERS_TLS=... RATE=600 PROXYBENCH_ENV=...]. Traffic stays in
#   the namespaces the peers script creates (198.18.0.0/15); each load is one
#   bounded wrk (or tlsrate) run.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PEERS_TLS=${PEERS_TLS:-$ROOT/../shared/bench-peers/peers-tls.sh}
[ -f "$PEERS_TLS" ] || { echo "proxy-cpu.sh: peers script $PEERS_TLS not found (set PEERS_TLS)" >&2; exit 1; }
SYSTEMS=${SYSTEMS:-"direct haproxy-plain haproxy egressd"}
ROUNDS=${ROUNDS:-2}
WRK_SECS=${WRK_SECS:-14}
UNIT=conn WARMUP=2
if [ -n "${BULK:-}" ]; then
	[ -z "${RATE:-}" ] || { echo "proxy-cpu.sh: BULK and RATE exclude each other" >&2; exit 1; }
	UNIT=MiB WARMUP=0.5 SAMPLE_SECS=${SAMPLE_SECS:-3}
fi
SAMPLE_SECS=${SAMPLE_SECS:-10}
[ -n "${BULK:-}" ] || [ "$SAMPLE_SECS" -le $((WRK_SECS - 3)) ] || { echo "proxy-cpu.sh: SAMPLE_SECS must be at most WRK_SECS - 3" >&2; exit 1; }
TMP=$(mktemp -d /tmp/proxy-cpu.XXXXXX)
RUNPID=""
cleanup() {
	[ -z "$RUNPID" ] || kill "$RUNPID" 2>/dev/null || true
	wait 2>/dev/null || true
	rm -rf "$TMP"
}
trap cleanup EXIT

# HAProxy with no inspection, started through the peers script's custom hook.
cat >"$TMP/haproxy-plain.sh" <<'EOF'
#!/bin/sh
cfg=$(dirname "$0")/haproxy-plain.cfg
cat >"$cfg" <<CFG
global
	maxconn 4096
	nbthread 2
defaults
	mode tcp
	timeout connect 3s
	timeout client 30s
	timeout server 30s
frontend plain
	bind :$1 backlog 4096
	default_backend original_dst
backend original_dst
	server orig 0.0.0.0:0
CFG
exec haproxy -db -f "$cfg"
EOF
chmod +x "$TMP/haproxy-plain.sh"

NS_GW=${BTLS_NS_G:-btls-gw} # the peers script's gateway namespace (BTLS_NS_G if it reads one)
NS_C=${BTLS_NS_C:-btls-c}   # its client namespace
GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
case " $SYSTEMS " in *" floor-"*) "$GO" build -o "$TMP/tcpfloor" ./bench/cmd/tcpfloor ;; esac
LOAD=wrk
if [ -n "${RATE:-}" ]; then
	# tlsrate in wrk's place, first on the peers script's PATH
	mkdir -p "$TMP/shim"
	bash bench/tlsrate-wrk.sh "$TMP/shim"
	export PATH="$TMP/shim:$PATH" TLSRATE_RATE=$RATE
	LOAD=tlsrate
fi
# the load is running: wrk or tlsrate, or with BULK the peers script's
# bulk download (its curl fetches big.bin; others, the checks, do not),
# in the client namespace: another run's wrk on a shared box is not ours
load_running() {
	local pids
	pids=$(ip netns pids "$NS_C" 2>/dev/null | paste -sd, -)
	[ -n "$pids" ] || return 1
	if [ -n "${BULK:-}" ]; then ps -o args= -p "$pids" | grep -q 'curl .*big\.bin'; else ps -o comm= -p "$pids" | grep -qx "$LOAD"; fi
}

# busy ticks of the whole box (steal, idle and iowait left out)
box_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 }' /proc/stat; }
# "utime stime" of processes, in ticks, summed (the comm field has no
# spaces here; sniproxy runs as two processes, its own and a binder)
proc_ticks() {
	local p
	for p in "$@"; do cat "/proc/$p/stat" 2>/dev/null || true; done | awk '{ u += $14; s += $15 } END { print u + 0, s + 0 }'
}
HZ=$(getconf CLK_TCK)
GW_CLIENT_IP=198.18.1.1 # the gateway's address on the client side
if [ -n "${DNS_QPS:-}" ]; then
	command -v dnsperf >/dev/null || { echo "proxy-cpu.sh: DNS_QPS needs dnsperf" >&2; exit 1; }
	for i in $(seq 1 200); do echo "n$i.allowed.test A"; done >"$TMP/queries"
fi

# "run-queue-wait-ns time-slices" summed over every thread of processes
wait_stat() {
	local p
	for p in "$@"; do cat "/proc/$p"/task/*/schedstat 2>/dev/null || true; done | awk '{ w += $2; n += $3 } END { printf "%.0f %.0f\n", w, n }'
}
# p50 and p99 in ms of the run's one load round (wrk --latency or tlsrate)
latency_ms() {
	awk 'function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
		$1 == "50%" { p50 = ms($2) } $1 == "99%" { p99 = ms($2) } END { printf "%.2f %.2f\n", p50, p99 }' "${BENCH_TLS_DIR:-/tmp/bench-tls}/wrk.log"
}

# one_run SYS: writes "rate box_us user_us sys_us wait_us slices p50 p99" (per
# connection; latencies in ms) to $TMP/res
one_run() {
	local sys=$1 proc="" pid="" i t b0 b1 u0 s0 u1 s1 w0="0 0" w1="0 0" out rate smt="" sm0="" sm1=""
	case $sys in haproxy*) proc=haproxy ;; egressd) proc=proxybench ;; egressd-daemon) proc=egressd ;; floor-*) proc=tcpfloor ;; sniproxy) proc=sniproxy ;; nginx) proc=nginx ;; esac
	case $sys in
	direct) (SYSTEMS=direct bash "$PEERS_TLS") ;;
	haproxy) (SYSTEMS=haproxy bash "$PEERS_TLS") ;;
	sniproxy) (SYSTEMS=sniproxy bash "$PEERS_TLS") ;;
	nginx) (SYSTEMS=nginx bash "$PEERS_TLS") ;;
	haproxy-plain) (SYSTEMS=haproxy-plain CUSTOM_TLS_NAME=haproxy-plain \
		CUSTOM_TLS_CMD="$TMP/haproxy-plain.sh {PORT}" bash "$PEERS_TLS") ;;
	egressd) (SYSTEMS=egressd PEERS_TLS=$PEERS_TLS bash "$ROOT/bench/proxy-tls.sh") ;;
	egressd-daemon) (SYSTEMS=egressd EGRESSD=daemon PEERS_TLS=$PEERS_TLS bash "$ROOT/bench/proxy-tls.sh") ;;
	floor-*) (SYSTEMS=$sys CUSTOM_TLS_NAME=$sys \
		CUSTOM_TLS_CMD="$TMP/tcpfloor -mode ${sys#floor-} -port {PORT}" bash "$PEERS_TLS") ;;
	*) echo "proxy-cpu.sh: unknown system $sys" >&2; return 1 ;;
	esac >"$TMP/run.out" 2>&1 &
	RUNPID=$!
	for i in $(seq 1 600); do load_running && break; sleep 0.2; done
	load_running || { wait "$RUNPID" || true; RUNPID=""; tail -5 "$TMP/run.out" >&2; return 1; }
	sleep "$WARMUP"
	if [ -n "$proc" ]; then
		# the proxy's processes: those in the gateway namespace (nginx
		# also serves the origin, in the server namespace)
		pid=$(for i in $(ip netns pids "$NS_GW"); do [ "$(cat "/proc/$i/comm" 2>/dev/null)" = "$proc" ] && echo "$i"; done | tr '\n' ' ')
		[ -n "$pid" ] || { echo "proxy-cpu.sh: no $proc process in $NS_GW" >&2; return 1; }
		t=$(proc_ticks $pid); u0=${t% *} s0=${t#* }
		w0=$(wait_stat $pid)
		# Go's sysmon runs on the first thread the runtime creates: the
		# process's second-lowest thread id.
		case $sys in egressd*) smt=$(ls "/proc/${pid%% *}/task" | sort -n | sed -n 2p) sm0=$(thread_stat "${pid%% *}" "$smt") ;; esac
	fi
	local dnspid=""
	if [ -n "${DNS_QPS:-}" ] && [ "$sys" = egressd-daemon ]; then
		ip netns exec "$NS_C" dnsperf -s "$GW_CLIENT_IP" -d "$TMP/queries" -Q "$DNS_QPS" -l "$SAMPLE_SECS" >"$TMP/dnsperf.out" 2>&1 &
		dnspid=$!
	fi
	b0=$(box_ticks)
	sleep "$SAMPLE_SECS"
	b1=$(box_ticks)
	if [ -n "$pid" ]; then t=$(proc_ticks $pid); u1=${t% *} s1=${t#* }; w1=$(wait_stat $pid); else u0=0 s0=0 u1=0 s1=0; fi
	[ -z "$smt" ] || sm1=$(thread_stat "${pid%% *}" "$smt")
	if [ -n "$dnspid" ]; then
		wait "$dnspid" || true
		awk '/Queries completed|Average Latency/ { sub(/^ +/, ""); printf "  (dnsperf at %s q/s: %s)\n", q, $0 }' q="$DNS_QPS" "$TMP/dnsperf.out" >"$TMP/dns"
	fi
	wait "$RUNPID" || true
	RUNPID=""
	out=$(grep -m1 -A1 '^system' "$TMP/run.out" | tail -1)
	# new connections/s from the table, or with BULK the download's MiB/s
	# (whole MiB) from the log: without wrk rounds the script ends before
	# its table
	if [ -n "${BULK:-}" ]; then
		local psys=${sys%-daemon} # the peers script's name for the system
		rate=$(awk -v sys="$psys:" '$2 == sys && $3 == "bulk" { print int($NF) }' "$TMP/run.out" | tail -1)
		out=$(grep "$psys: bulk" "$TMP/run.out" | tail -1)
	else
		rate=$(echo "$out" | awk '{ print $4 }')
	fi
	[ -n "$rate" ] && [ "$rate" -gt 0 ] 2>/dev/null || { echo "proxy-cpu.sh: $sys: no rate in: $out" >&2; return 1; }
	awk -v r="$rate" -v s="$SAMPLE_SECS" -v hz="$HZ" -v b=$((b1 - b0)) -v u=$((u1 - u0)) -v k=$((s1 - s0)) \
		-v w="$w0 $w1" -v lat="$([ -n "${BULK:-}" ] && echo "- -" || latency_ms)" \
		'BEGIN { n = r * s; f = 1e6 / hz / n; split(w, W, " ")
			printf "%d %.0f %.0f %.0f %.0f %.1f %s\n", r, b * f, u * f, k * f, (W[3] - W[1]) / 1e3 / n, (W[4] - W[2]) / n, lat }' >"$TMP/res"
	: >"$TMP/sysmon"
	[ -z "$sm1" ] || echo "$sm0 $sm1" | awk -v r="$rate" -v s="$SAMPLE_SECS" \
		-v unit="$UNIT" '{ n = r * s; printf "  (egressd: Go runtime sysmon thread %.0f us/%s on CPU, %.1f wakeups/%s)\n", ($3 - $1) / 1e3 / n, unit, ($4 - $2) / n, unit }' >"$TMP/sysmon"
	[ -z "$dnspid" ] || cat "$TMP/dns" >>"$TMP/sysmon"
}

# "ns-on-CPU voluntary-switches" of thread $2 of process $1
thread_stat() {
	echo "$(awk '{ print $1 }' "/proc/$1/task/$2/schedstat" 2>/dev/null || echo 0)" \
		"$(awk '/^voluntary_ctxt_switches/ { print $2 }' "/proc/$1/task/$2/status" 2>/dev/null || echo 0)"
}

load="wrk -d${WRK_SECS}s (closed loop, saturating)"
[ -z "${RATE:-}" ] || load="tlsrate at $RATE conn/s for ${WRK_SECS}s (open loop)"
[ -z "${BULK:-}" ] || load="one ${BULK_MIB:-4096} MiB download"
echo "proxy-cpu: $(nproc) CPUs, kernel $(uname -r); $load per system, CPU sampled over ${SAMPLE_SECS}s of it; $ROUNDS round(s)"
echo "(wait: the proxy's threads' run-queue wait; slices: the time slices they ran in; p50/p99 of the load's round)"
u=$UNIT
printf '%-14s %5s %9s %11s %13s %13s %13s %12s %11s %7s %7s\n' system round "$u/s" "box us/$u" "proxy us/$u" "user us/$u" "kernel us/$u" "wait us/$u" "slices/$u" "p50 ms" "p99 ms"
if [ -n "${BULK:-}" ]; then
	export WRK_RUNS=0 WRK_SECS BULK_RUNS=1 BULK_MIB=${BULK_MIB:-4096}
else
	export WRK_RUNS=1 WRK_SECS BULK_RUNS=1 BULK_MIB=${BULK_MIB:-16}
fi
for r in $(seq 1 "$ROUNDS"); do
	for sys in $SYSTEMS; do
		# not in $(...): RUNPID must be this shell's, for the cleanup
		if one_run "$sys"; then
			set -- $(cat "$TMP/res")
			if [ "$sys" = direct ]; then set -- "$1" "$2" "$3" "$4" - - "$7" "$8"; fi
			printf '%-14s %5s %9s %11s %13s %13s %13s %12s %11s %7s %7s\n' "$sys" "$r" "$1" "$2" "$(($3 + $4))" "$3" "$4" "$5" "$6" "$7" "$8"
			cat "$TMP/sysmon"
		else
			printf '%-14s %5s %9s\n' "$sys" "$r" "failed"
		fi
	done
done
