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
# The peers script's log goes to stderr as before and to a file, from which
# rounds.sh counts the rounds egressd won against each system.
{ bash "$PEERS_CONNECT" 2>&1 1>&3 | tee "$BIN/peers.log" >&2; } 3>&1
case " $SYSTEMS " in
*" egressd "*) echo; bash bench/rounds.sh "$BIN/peers.log" egressd ;;
esac
