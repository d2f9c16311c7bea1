#!/usr/bin/env bash
# proxy-tls.sh - the transparent proxy against direct routing and HAProxy
# (SNI allow-list) in one run, in the three-namespace topology of the shared
# peers script (client -> gateway with an nftables REDIRECT -> server).
#
# It builds bench/cmd/proxybench (the proxy package with a generated policy
# allowing *.allowed.test:443, names resolved from a static map) and hands it
# to the peers script through its CUSTOM_TLS hook, so egressd is measured
# interleaved with the peers under the same load: bulk download MiB/s
# (splice), new TLS connections/s and p99 under wrk, refusals of denied SNIs
# and of a ClientHello without SNI.
#
# Usage (root): bench/proxy-tls.sh
#   PEERS_TLS=path/to/peers-tls.sh  (default ../shared/bench-peers/peers-tls.sh)
#   SYSTEMS="direct egressd haproxy"  and the peers script's knobs
#   (BULK_RUNS, BULK_MIB, WRK_RUNS, WRK_SECS, WRK_CONNS, ...).
#   PROXYBENCH_ENV="GOMAXPROCS=1"  variables for proxybench's environment only
#   PROXYBENCH_ARGS="-cpuprofile /tmp/cpu.pprof"  extra proxybench flags
#   (profiles; see bench/cmd/proxybench). By default proxybench logs and
#   records events as egressd run does (JSON lines at info, event journal).
#   EGRESSD=daemon  measure `egressd run` itself in proxybench's place
#   (bench/egressd-gw.sh: its DNS forwarder, capture on the client-side
#   interface, journal and admin server too; PROXYBENCH_ENV applies to it)
#   EGRESSD=fast  the same with --fast-path and egressd's own firewall
#   (enforce ruleset, kept dormant while another system is measured:
#   bench/egressd-fast-hook.sh, run from a copy of the peers script whose
#   redirect_to asks it first)
#   KEEP=dir  keep what the run leaves in dir: the peers script's log
#   (peers.log), the custom system's log (custom.log: egressd's JSON lines)
#   and, with EGRESSD=daemon or fast, egressd's state directory with its
#   event journal (egressd-dir/)
# Traffic stays in the namespaces the peers script creates (198.18.0.0/15).
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS_TLS=${PEERS_TLS:-../shared/bench-peers/peers-tls.sh}
[ -x "$PEERS_TLS" ] || [ -f "$PEERS_TLS" ] || { echo "proxy-tls.sh: peers script $PEERS_TLS not found (set PEERS_TLS)" >&2; exit 1; }
BIN=$(mktemp -d /tmp/proxybench.XXXXXX)
trap 'rm -rf "$BIN"' EXIT
GO=${GO:-$(command -v go || echo /usr/local/go/bin/go)}
"$GO" build -o "$BIN/proxybench" ./bench/cmd/proxybench
case ${EGRESSD:-} in daemon | fast) CGO_ENABLED=0 "$GO" build -o "$BIN/egressd" ./cmd/egressd ;; esac
# egressd needs many descriptors for splice pipes at high connection rates.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
export SYSTEMS=${SYSTEMS:-"direct egressd haproxy"}
export CUSTOM_TLS_NAME=egressd
# Started in the gateway namespace with SERVER_IP and PROXY_PORT set.
export CUSTOM_TLS_CMD="${PROXYBENCH_ENV:+env $PROXYBENCH_ENV }$BIN/proxybench -transparent :{PORT} -allow '*.allowed.test' -map www.allowed.test=\$SERVER_IP ${PROXYBENCH_ARGS:-}"
if [ "${EGRESSD:-}" = daemon ]; then
	# egressd run itself, with its DNS forwarder, capture and journal
	CUSTOM_TLS_CMD="env EGRESSD_BIN=$BIN/egressd EGRESSD_ENV='${PROXYBENCH_ENV:-}' sh $PWD/bench/egressd-gw.sh {PORT}"
fi
if [ "${EGRESSD:-}" = fast ]; then
	CUSTOM_TLS_CMD="env EGRESSD_BIN=$BIN/egressd EGRESSD_FAST=1 EGRESSD_ENV='${PROXYBENCH_ENV:-}' sh $PWD/bench/egressd-gw.sh {PORT}"
	# The peers script's redirect_to asks the hook first (a copy, patched
	# here: the shared script is not ours to change).
	export REDIRECT_HOOK="sh $PWD/bench/egressd-fast-hook.sh"
	# Beside check_filter's warning, a note when the only thing let through
	# is the hello without SNI: egressd allows it by design here (the hook
	# had the client ask egressd's DNS for $ALLOWED: dns-learned;
	# bench/proxy-README.md). A denied SNI let through gets no note.
	awk '{ print } /^redirect_to\(\) \{/ {
		print "\tif REDIRECT_PORT=\"$1\" HOOK_PORT=\"${PORT[$CUSTOM_TLS_NAME]:-}\" NS_G=$NS_G NS_C=$NS_C G1_IP=$G1_IP ALLOWED=$ALLOWED $REDIRECT_HOOK; then"
		print "\t\tnsx $NS_G nft flush chain ip btls prerouting; return"
		print "\tfi"
	}
	/log "WARNING: \$sys let a denied connection through"/ {
		print "\t\t[ \"$sys\" != \"$CUSTOM_TLS_NAME\" ] || [ -n \"$leaked\" ] || log \"NOTE: EGRESSD=fast: the hello without SNI went to the address egressd'"'"'s DNS gave this client for $ALLOWED; egressd allows it by design (dns-learned, bench/proxy-README.md)\""
	}' "$PEERS_TLS" >"$BIN/peers-tls.sh"
	grep -q REDIRECT_HOOK "$BIN/peers-tls.sh" || { echo "proxy-tls.sh: could not patch redirect_to in $PEERS_TLS" >&2; exit 1; }
	PEERS_TLS=$BIN/peers-tls.sh
fi
if [ -n "${KEEP:-}" ]; then
	mkdir -p "$KEEP"
	KEEP=$(cd "$KEEP" && pwd)
	export EGRESSD_KEEP=$KEEP/egressd-dir
fi
# The peers script's log goes to stderr as before and to a file, from which
# rounds.sh counts the rounds egressd won against each system.
{ bash "$PEERS_TLS" 2>&1 1>&3 | tee "$BIN/peers.log" >&2; } 3>&1
if [ -n "${KEEP:-}" ]; then
	cp "$BIN/peers.log" "${BENCH_TLS_DIR:-/tmp/bench-tls}/custom.log" "$KEEP/" 2>/dev/null || true
	echo "proxy-tls.sh: logs kept in $KEEP" >&2
fi
case " $SYSTEMS " in
*" egressd "*) echo; bash bench/rounds.sh "$BIN/peers.log" egressd ;;
esac
