#!/usr/bin/env bash
# rounds.sh - round by round, how often one system beat each other system in
# a run of the shared peers scripts (peers-tls.sh, peers-connect.sh), read
# from the log those scripts write to stderr.
#
# The scripts visit every system once per round, back to back, and report
# medians. On a shared box a round moves by +-20 %, so a median ahead by a
# few hundredths says little; the count of rounds won against each peer,
# each compared with the peer's run of the same round, says more.
#
# Usage: bench/rounds.sh LOG SYSTEM   (SYSTEM: the one compared, e.g. egressd)
set -euo pipefail
export LC_ALL=C
[ $# -eq 2 ] || { echo "usage: rounds.sh LOG SYSTEM" >&2; exit 2; }
[ -r "$1" ] || { echo "rounds.sh: cannot read $1" >&2; exit 1; }
awk -v me="$2" '
# "[12:59:06] egressd: wrk round 1: 1070 req/s, p99 45.17 ms, errors 0"
# "[13:03:46] egressd: load round 1: 1035 req/s, p50 46.22 ms, p99 95.69 ms, ..."
/: (wrk|load) round [0-9]+: / {
	sys = $2; sub(/:$/, "", sys)
	r = $5; sub(/:$/, "", r)
	rps[sys, r] = $6
	for (i = 7; i < NF; i++) if ($i == "p99") p99[sys, r] = $(i + 1)
	if (!(sys in seen)) { seen[sys] = 1; order[++n] = sys }
	if (r + 0 > nr) nr = r + 0
}
# "[12:38:41] egressd: bulk 256 MiB (MiB/s): 500.2 587.0 653.3 -> median 587.0"
/: bulk .*\(MiB\/s\):/ {
	sys = $2; sub(/:$/, "", sys)
	line = $0; sub(/.*\(MiB\/s\):/, "", line); sub(/->.*/, "", line)
	k = split(line, v, " ")
	for (i = 1; i <= k; i++) bulk[sys, i] = v[i]
	if (k > nb) nb = k
	if (!(sys in seen)) { seen[sys] = 1; order[++n] = sys }
}
function cmp(a, b, higher) {
	# 1 won, 0 lost or tied, -1 not comparable
	if (a == "" || b == "" || a == "NA" || b == "NA") return -1
	return higher ? (a + 0 > b + 0) : (a + 0 < b + 0)
}
function tally(arr, rounds, peer, higher,   r, w, t, c) {
	w = 0; t = 0
	for (r = 1; r <= rounds; r++) {
		c = cmp(arr[me, r], arr[peer, r], higher)
		if (c < 0) continue
		t++; w += c
	}
	return t ? w "/" t : "-"
}
END {
	if (!(me in seen)) { print "rounds.sh: no rounds of " me " in the log" > "/dev/stderr"; exit 1 }
	if (n < 2) exit 0 # nothing to compare with
	printf "rounds %s won against each system (same round):\n", me
	printf "%-14s %14s %10s %10s\n", "system", "new conn/s", "p99", "bulk"
	for (i = 1; i <= n; i++) {
		s = order[i]
		if (s == me) continue
		printf "%-14s %14s %10s %10s\n", s, tally(rps, nr, s, 1), tally(p99, nr, s, 0), tally(bulk, nb, s, 1)
	}
}' "$1"
