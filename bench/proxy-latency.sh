#!/usr/bin/env bash
# proxy-latency.sh - the transparent proxy's latency at a fixed offered load:
# new TLS connections arrive at RATE per second whatever the system does
# (bench/cmd/tlsrate, open loop, latency counted from each connection's due
# time), against direct routing and the peers, in the shared peers script's
# topology and rounds.
#
# proxy-tls.sh's p99 comes from wrk's closed loop at saturation: 50
# connections always busy, so its latency is mostly the queue of the rate
# each system saturates at, and its p99 ratio follows the rate ratio. This
# script asks what a site below saturation sees: how much a proxy adds to
# a connection at a load the box carries. It runs proxy-tls.sh with a
# script named wrk, first on the PATH, that runs tlsrate in wrk's place;
# the table's "new-conn r/s" column is then the rate of responses (RATE
# when the system kept up) and its p99 the open-loop p99. Bulk is measured
# once, small (BULK_RUNS=1 BULK_MIB=16): it is proxy-tls.sh's business.
#
# tlsrate's client is Go's crypto/tls with its defaults: an X25519MLKEM768
# key share, a ClientHello of about 1.8 KB that spans two TCP segments, as
# current browsers send; TLSRATE_GROUPS=classic sends a one-segment hello.
#
# Usage (root): bench/proxy-latency.sh   [RATE=400 WRK_RUNS=5 WRK_SECS=10
#   SYSTEMS="direct egressd haproxy nginx sniproxy" TLSRATE_GROUPS=classic
#   PEERS_TLS=... PROXYBENCH_ARGS=...]. Traffic stays in the namespaces the
#   peers script creates (198.18.0.0/15); every round is RATE x WRK_SECS
#   connections at most, each bounded by wrk's --timeout (5 s).
set -euo pipefail
cd "$(dirname "$0")/.."
RATE=${RATE:-400}
SHIM=$(mktemp -d /tmp/tlsrate.XXXXXX)
trap 'rm -rf "$SHIM"' EXIT
bash bench/tlsrate-wrk.sh "$SHIM"
export TLSRATE_RATE=$RATE TLSRATE_GROUPS=${TLSRATE_GROUPS:-} PATH="$SHIM:$PATH"
export BULK_RUNS=${BULK_RUNS:-1} BULK_MIB=${BULK_MIB:-16} WRK_RUNS=${WRK_RUNS:-5} WRK_SECS=${WRK_SECS:-10}
echo "proxy-latency: tlsrate in wrk's place, $RATE new TLS connections/s (Poisson), ${WRK_SECS}s x $WRK_RUNS rounds, groups ${TLSRATE_GROUPS:-Go default (X25519MLKEM768)}"
bash bench/proxy-tls.sh
# The peers script keeps tlsrate's whole output in its wrk.log: the
# percentiles' medians over the rounds, as ratios to direct routing (p99
# moves most with the box's other tenants; p50 and p90 say more about
# what a proxy adds to each connection).
WRKLOG=${BENCH_TLS_DIR:-/tmp/bench-tls}/wrk.log
echo
echo "latency from due time, median over $WRK_RUNS rounds (x direct):"
awk '
	function med(s,   a, n, i, j, t) {
		n = split(s, a, " ")
		for (i = 2; i <= n; i++) for (j = i; j > 1 && a[j - 1] + 0 > a[j] + 0; j--) { t = a[j]; a[j] = a[j - 1]; a[j - 1] = t }
		return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
	}
	/^### / { sys = $2; if (!(sys in seen)) { seen[sys] = 1; order[++ns] = sys }; next }
	$1 ~ /^(50|90|99|99\.9)%$/ { v = $2; sub(/ms$/, "", v); L[sys, $1] = L[sys, $1] " " v }
	END {
		printf "%-10s %14s %14s %14s %14s\n", "system", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms"
		for (k = 1; k <= ns; k++) {
			s = order[k]; printf "%-10s", s
			split("50% 90% 99% 99.9%", P, " ")
			for (q = 1; q <= 4; q++) {
				m = med(L[s, P[q]]); b = med(L["direct", P[q]])
				printf " %6.2f (%4.2fx)", m, (b > 0 ? m / b : 0)
			}
			printf "\n"
		}
	}' "$WRKLOG"
