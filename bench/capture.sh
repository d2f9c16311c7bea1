#!/bin/sh
# Capture benchmarks: offline classification (packets per second of CPU
# time, one goroutine) and a live AF_PACKET run under bulk TCP load routed
# through a gateway namespace (needs root), both directions, reporting the
# kernel's drop counter of the capture socket (tpacket stats).
# Usage: bench/capture.sh [live]
#   CAPTURE_RING_MB=N      ring size (default 64)
#   CAPTURE_FULL_FRAMES=1  no snap filter: whole frames in the ring
set -eu
cd "$(dirname "$0")/.."
go test -run XXX -bench 'BenchmarkClassify|BenchmarkReadFile' -benchtime 3s -cpu 1 ./capture/
if [ "${1:-}" = live ]; then
	go test -run XXX -bench BenchmarkLiveBulk -benchtime 8x -count 3 ./capture/
fi
