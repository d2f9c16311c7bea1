#!/bin/sh
# Capture benchmarks: offline classification (packets per second of CPU
# time, one goroutine) and a live AF_PACKET run under bulk TCP load in test
# namespaces (needs root), reporting the kernel's drop counter.
# Usage: bench/capture.sh [live]   (CAPTURE_RING_MB=N to size the ring)
set -eu
cd "$(dirname "$0")/.."
go test -run XXX -bench 'BenchmarkClassify|BenchmarkReadFile' -benchtime 3s -cpu 1 ./capture/
if [ "${1:-}" = live ]; then
	go test -run XXX -bench BenchmarkLiveBulk -benchtime 8x ./capture/
fi
