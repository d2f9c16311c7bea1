#!/usr/bin/env bash
# Runs every test: formatting, vet, the race-enabled test suite (namespace
# and end-to-end tests included: run as root), and a short run of each fuzz
# target. FUZZTIME sets the fuzz time per target (default 10s).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=$PATH:/usr/local/go/bin:/usr/sbin:/sbin

echo "== gofmt"
bad=$(gofmt -l $(git ls-files '*.go'))
if [ -n "$bad" ]; then echo "gofmt would change: $bad"; exit 1; fi

echo "== go vet"
go vet ./...

echo "== go mod tidy"
go mod tidy -diff

echo "== go test -race"
go test -race -count=1 -timeout 30m ./... 2>&1 | tee /tmp/egressd-test.log
status=${PIPESTATUS[0]}
[ "$status" -eq 0 ] || exit "$status"

echo "== fuzz (${FUZZTIME:=10s} per target)"
for pkg in $(go list ./...); do
  dir=$(go list -f '{{.Dir}}' "$pkg")
  for t in $(grep -ho '^func Fuzz[A-Za-z0-9_]*' "$dir"/*_test.go 2>/dev/null | sed 's/^func //' | sort -u); do
    echo "-- $pkg $t"
    go test -run '^$' -fuzz "^$t\$" -fuzztime "$FUZZTIME" "$pkg" >/tmp/egressd-fuzz.log 2>&1 || { cat /tmp/egressd-fuzz.log; exit 1; }
  done
done

passed=$(grep -c '^ok ' /tmp/egressd-test.log || true)
echo "packages: $passed passed, 0 failed"
