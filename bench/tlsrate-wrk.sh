#!/usr/bin/env bash
# tlsrate-wrk.sh DIR - builds bench/cmd/tlsrate into DIR and writes DIR/wrk,
# a script that runs it with wrk's arguments (tlsrate -wrk). With DIR first
# on the PATH and TLSRATE_RATE set, the shared peers script's wrk rounds
# become tlsrate's open loop at that rate (bench/proxy-latency.sh,
# bench/proxy-cpu.sh with RATE).
set -euo pipefail
[ $# -eq 1 ] && [ -d "$1" ] || { echo "usage: tlsrate-wrk.sh DIR (an existing directory)" >&2; exit 2; }
dir=$(cd "$1" && pwd)
cd "$(dirname "$0")/.."
"${GO:-$(command -v go || echo /usr/local/go/bin/go)}" build -o "$dir/tlsrate" ./bench/cmd/tlsrate
printf '#!/bin/sh\nexec %s -wrk "$@"\n' "$dir/tlsrate" >"$dir/wrk"
chmod +x "$dir/wrk"
