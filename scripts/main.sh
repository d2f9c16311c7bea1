#!/usr/bin/env bash
# The main job on a fresh machine: build egressd and show what the embedded seed
# profile (nirovision, audit mode) decides for every line of the vendor page.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=$PATH:/usr/local/go/bin
mkdir -p bin
CGO_ENABLED=0 go build -trimpath -o bin/egressd ./cmd/egressd
bin/egressd policy check profile:nirovision
while read -r to port; do
  bin/egressd policy explain profile:nirovision --to "$to" --port "$port"
done <<'LIST'
production.cloudflare.docker.com 443/tcp
docker.io.evil.net 443/tcp
https://notion.so/nirovision/start 443/tcp
agent-intake.logs.datadoghq.com 10516/tcp
0.pool.ntp.org 123/udp
198.51.100.53 53/udp
192.168.1.20 7001/tcp
17.1.2.3 5223/tcp
17.1.2.3 5224/tcp
alt3-mtalk.google.com 5229/tcp
LIST
