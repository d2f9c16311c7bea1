#!/usr/bin/env bash
# proxy-connect.sh - egressd's explicit (CONNECT) proxy against direct
# routing and the peers (Squid; Smokescreen when SMOKESCREEN_BIN is set) in
# one run, in the shared peers script's three-namespace topology.
#
# It builds bench/cmd/proxybench (the proxy package; policy: *.allowed.test
# on 443/tcp only; names from the topology's private hosts file) and hands
# it to the peers script through its CUSTOM_CONNECT hook. The peers script
# measures bulk MiB/s and new CONNECT+TLS connections/s and checks that a
# denied name, an IP literal and an allowed name on another port (8443) are
# all refused.
#
# Usage (root): bench/proxy-connect.sh
#   PEERS_CONNECT=path/to/peers-connect.sh (default ../shared/bench-peers/peers-connect.sh)
#   SYSTEMS="direct egressd squid"  and the peers script's knobs;
#   PROXYBENCH_ARGS="-cpuprofile /tmp/cpu.pprof"  extra proxybench flags;
#   PROXYBENCH_ENV="GOMAXPROCS=1"  variables for proxybench only.
#
# By turns: TURNS=N calls the peers script N times, every system of SYSTEMS
# in each call, the order rotated by one each turn, with one bulk and one
# load round per call unless BULK_RUNS / LOAD_RUNS say otherwise. It prints
# a line per turn, then per system the median over turns of bulk MiB/s and
# new conn/s and of their ratios to direct in the same turn, and the turns
# egressd won against each peer. It stops with an error at the first turn in
# which egressd let a wrong-name, IP-literal or wrong-port CONNECT through
# (or answered one without a 4xx). KEEP=DIR keeps every turn's log and table.
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS_CONNECT=${PEERS_CONNECT:-../shared/bench-peers/peers-connect.sh}
[ -f "$PEERS_CONNECT" ] || { echo "proxy-connect.sh: peers script $PEERS_CONNECT not found (set PEERS_CONNECT)" >&2; exit 1; }
BIN=$(mktemp -d /tmp/proxybench.XXXXXX)
trap 'rm -rf "$BIN"' EXIT
GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
"$GO" build -o "$BIN/proxybench" ./bench/cmd/proxybench
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
export SYSTEMS=${SYSTEMS:-"direct egressd squid"}
export CUSTOM_CONNECT_NAME=egressd
# Started in the gateway namespace with LISTEN_IP, PROXY_PORT and HOSTS_FILE set.
export CUSTOM_CONNECT_CMD="${PROXYBENCH_ENV:+env $PROXYBENCH_ENV }$BIN/proxybench -explicit \$LISTEN_IP:{PORT} -allow '*.allowed.test' -hosts \$HOSTS_FILE ${PROXYBENCH_ARGS:-}"

# ------------------------------------------------------------- by turns ---
# One turn: the peers script once, every system in it, the order rotated.
# Its log goes to stderr as in a single run and to turnN.log, its table to
# turnN.out; the table's rows (medians of the turn's rounds) to turns.tsv.
check_refusals() { # turn: egressd refused every wrong CONNECT of the turn?
	awk -v me="$CUSTOM_CONNECT_NAME" -v t="$1" '
	# "[12:59:06] egressd: CONNECT evil.example:443 -> connect,http,rc = 403 000 56"
	$2 == me ":" && $3 == "CONNECT" {
		n++
		c = $(NF - 2); h = $(NF - 1); rc = $NF
		if (c !~ /^4[0-9][0-9]$/ || (h == 200 && rc == 0)) bad = bad " " $4 " (connect,http,rc = " c " " h " " rc ")"
		if ($0 ~ /\(IP literal\)/) ip = 1
		if ($0 ~ /\(other port\)/) port = 1
	}
	$0 ~ "WARNING: " me " let a denied" { bad = bad " [" $0 "]" }
	END {
		if (bad != "" || n < 4 || !ip || !port) {
			printf "proxy-connect.sh: FAIL turn %d: %s did not refuse every wrong CONNECT (%d probes, IP literal %s, other port %s):%s\n",
				t, me, n, ip ? "probed" : "MISSING", port ? "probed" : "MISSING", bad > "/dev/stderr"
			exit 1
		}
		print n
	}' "$BIN/turn$1.log"
}

run_turns() {
	export BULK_RUNS=${BULK_RUNS:-1} LOAD_RUNS=${LOAD_RUNS:-1}
	local sys=($SYSTEMS) n t i order start load busy probes base=direct
	n=${#sys[@]}
	case " $SYSTEMS " in *" direct "*) ;; *) base=${sys[0]} ;; esac
	: >"$BIN/turns.tsv"
	: >"$BIN/turns.meta"
	for t in $(seq 1 "$TURNS"); do
		order=""
		for i in $(seq 0 $((n - 1))); do order="$order ${sys[$(((i + t - 1) % n))]}"; done
		order=${order# }
		start=$(date -u +%T)
		load=$(cut -d' ' -f1 /proc/loadavg)
		printf '[%s] proxy-connect.sh: turn %d/%d, load %s: SYSTEMS="%s"\n' "$start" "$t" "$TURNS" "$load" "$order" >&2
		{ SYSTEMS="$order" bash "$PEERS_CONNECT" 2>&1 1>&3 | tee "$BIN/turn$t.log" >&2; } 3>"$BIN/turn$t.out"
		[ -z "$KEEP" ] || cp "$BIN/turn$t.log" "$BIN/turn$t.out" "$KEEP/"
		probes=-
		case " $SYSTEMS " in *" $CUSTOM_CONNECT_NAME "*)
			probes=$(check_refusals "$t") || exit 1
			# the table's "more" column (look-alike names) must be all refused too
			awk -v me="$CUSTOM_CONNECT_NAME" -v t="$t" '
			$1 == me && NF >= 13 { more = $13; split(more, m, "/"); if (m[1] != m[2] || m[2] + 0 < 1) bad = 1; seen = 1 }
			END { if (bad || !seen) { printf "proxy-connect.sh: FAIL turn %d: %s refused %s of the look-alike names\n", t, me, seen ? more : "none (no row)" > "/dev/stderr"; exit 1 } }' \
				"$BIN/turn$t.out" || exit 1 ;;
		esac
		busy=$(sed -n 's/.*CPU busy before start (other tenants): \([0-9]*\)%.*/\1/p' "$BIN/turn$t.log" | head -1)
		printf '%s %s %s %s %s %s\n' "$t" "$start" "$load" "${busy:-NA}" "$probes" "$order" >>"$BIN/turns.meta"
		# table rows: system bulk x conn x p50 p99 x errors evil IP port more
		awk -v t="$t" -v order=" $order " '
		/^system / { tab = 1; next }
		tab && NF >= 13 && index(order, " " $1 " ") { print t, $1, $2, $4, $7, $9 }' \
			"$BIN/turn$t.out" >>"$BIN/turns.tsv"
	done
	[ -z "$KEEP" ] || cp "$BIN/turns.tsv" "$BIN/turns.meta" "$KEEP/"
	echo
	echo "CONNECT by turns: $TURNS turns, each one peers-script run of every system (order rotated each turn);"
	echo "per turn: bulk ${BULK_MIB:-256} MiB x $BULK_RUNS, new-conn ${LOAD_SECS:-10}s x $LOAD_RUNS; $(nproc) CPUs, kernel $(uname -r)${PROXYBENCH_ENV:+; proxybench with $PROXYBENCH_ENV}"
	awk -v systems="$SYSTEMS" -v base="$base" -v me="$CUSTOM_CONNECT_NAME" -v turns="$TURNS" '
	FILENAME ~ /meta$/ { st[$1] = $2; ld[$1] = $3; bz[$1] = $4; pr[$1] = $5; first[$1] = $6; next }
	{ B[$1, $2] = $3; R[$1, $2] = $4; P[$1, $2] = $5; E[$2] += $6 }
	function ok(v) { return v != "" && v != "NA" && v != "-" }
	function med(a, k,   i, j, x) {
		if (k == 0) return "NA"
		for (i = 2; i <= k; i++) { x = a[i]; for (j = i - 1; j >= 1 && a[j] > x; j--) a[j + 1] = a[j]; a[j + 1] = x }
		return k % 2 ? a[(k + 1) / 2] : (a[k / 2] + a[k / 2 + 1]) / 2
	}
	function fmt(v, f) { return v == "NA" ? "NA" : sprintf(f, v) }
	END {
		ns = split(systems, S, " ")
		printf "per turn, bulk MiB/s / new conn/s (start UTC, load at start, %% busy before start, refused probes of %s, first system):\n", me
		printf "%-4s %-8s %5s %4s %4s %-12s", "turn", "start", "load", "busy", "ref", "first"
		for (i = 1; i <= ns; i++) printf " %14s", S[i]
		printf "\n"
		for (t = 1; t <= turns; t++) {
			printf "%-4s %-8s %5s %4s %4s %-12s", t, st[t], ld[t], bz[t], pr[t], first[t]
			for (i = 1; i <= ns; i++) printf " %14s", B[t, S[i]] "/" R[t, S[i]]
			printf "\n"
		}
		printf "\nmedians over turns (ratios: to %s in the same turn):\n", base
		printf "%-13s %10s %7s %9s %7s %7s %6s\n", "system", "bulk MiB/s", "x" base, "conn r/s", "x" base, "p99 ms", "errors"
		for (i = 1; i <= ns; i++) {
			s = S[i]; kb = kr = kp = kbr = krr = 0
			for (t = 1; t <= turns; t++) {
				if (ok(B[t, s])) { b[++kb] = B[t, s] + 0; if (ok(B[t, base]) && B[t, base] + 0 > 0) br[++kbr] = B[t, s] / B[t, base] }
				if (ok(R[t, s])) { r[++kr] = R[t, s] + 0; if (ok(R[t, base]) && R[t, base] + 0 > 0) rr[++krr] = R[t, s] / R[t, base] }
				if (ok(P[t, s])) p[++kp] = P[t, s] + 0
			}
			printf "%-13s %10s %7s %9s %7s %7s %6s\n", s, fmt(med(b, kb), "%.1f"), fmt(med(br, kbr), "%.2f"),
				fmt(med(r, kr), "%.0f"), fmt(med(rr, krr), "%.2f"), fmt(med(p, kp), "%.2f"), E[s] + 0
		}
		if (!(index(" " systems " ", " " me " "))) exit
		printf "\nturns %s won against each system (same turn; a tie is not a win):\n", me
		printf "%-13s %10s %10s %10s\n", "system", "bulk", "new conn/s", "p99"
		for (i = 1; i <= ns; i++) {
			s = S[i]; if (s == me) continue
			wb = tb = wr = tr = wp = tp = 0
			for (t = 1; t <= turns; t++) {
				if (ok(B[t, me]) && ok(B[t, s])) { tb++; wb += (B[t, me] + 0 > B[t, s] + 0) }
				if (ok(R[t, me]) && ok(R[t, s])) { tr++; wr += (R[t, me] + 0 > R[t, s] + 0) }
				if (ok(P[t, me]) && ok(P[t, s])) { tp++; wp += (P[t, me] + 0 < P[t, s] + 0) }
			}
			printf "%-13s %10s %10s %10s\n", s, wb "/" tb, wr "/" tr, wp "/" tp
		}
	}' "$BIN/turns.meta" "$BIN/turns.tsv"
	case " $SYSTEMS " in *" $CUSTOM_CONNECT_NAME "*)
		echo "every wrong-name, IP-literal and wrong-port CONNECT was refused by $CUSTOM_CONNECT_NAME (4xx) in every turn" ;;
	esac
}

if [ "${TURNS:-0}" -gt 0 ]; then
	KEEP=${KEEP:-}
	[ -z "$KEEP" ] || mkdir -p "$KEEP"
	run_turns
	exit 0
fi
# The peers script's log goes to stderr as before and to a file, from which
# rounds.sh counts the rounds egressd won against each system.
{ bash "$PEERS_CONNECT" 2>&1 1>&3 | tee "$BIN/peers.log" >&2; } 3>&1
case " $SYSTEMS " in
*" egressd "*) echo; bash bench/rounds.sh "$BIN/peers.log" egressd ;;
esac
