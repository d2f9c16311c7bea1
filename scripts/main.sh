#!/usr/bin/env bash
# The main job on a fresh machine: build egressd and run it with no flags —
# the embedded seed profile (nirovision) in audit mode, capture on the LAN
# interface, DNS on :53, the report on http://127.0.0.1:9901/. Run as root
# (without root it says which capability each part lacks and runs the rest).
# Extra arguments go to `egressd run` (e.g. --lan eth1 --wan eth0).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=$PATH:/usr/local/go/bin
mkdir -p bin
CGO_ENABLED=0 go build -trimpath -o bin/egressd ./cmd/egressd
bin/egressd policy check profile:nirovision
exec bin/egressd run "$@"
