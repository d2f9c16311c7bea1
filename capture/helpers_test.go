package capture

import (
	"context"
	"sync"
	"testing"

	"egressd/audit"
	"egressd/policy"
)

// testPolicy allows a few names and addresses so tests see both verdicts.
const testPolicy = `version: 1
mode: audit
rules:
  - name: web
    to: ["*.allowed.test", "allowed.test", "*.instagram.com"]
    ports: [443/tcp, 443/udp, 80/tcp]
  - name: dns
    to: ["*"]
    ports: [53/udp, 53/tcp]
  - name: lab
    to: [198.51.100.0/24]
    ports: [any]
`

func testEngine(t testing.TB, src string) *policy.Engine {
	t.Helper()
	eng, err := policy.Compile("test.yaml", []byte(src))
	if err != nil {
		t.Fatal(err)
	}
	return eng
}

// recorder is a real audit.Sink that keeps events.
type recorder struct {
	mu     sync.Mutex
	events []audit.Event
}

func (r *recorder) Emit(ev audit.Event) {
	r.mu.Lock()
	r.events = append(r.events, ev)
	r.mu.Unlock()
}

func (r *recorder) all() []audit.Event {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]audit.Event(nil), r.events...)
}

// fileResult is what one pass over a capture file found.
type fileResult struct {
	stats  Stats
	err    error
	obs    []observation
	events []audit.Event
}

func runFile(t testing.TB, path string, src string, dns DNSFacts) fileResult {
	t.Helper()
	rec := &recorder{}
	c, err := New(Config{}, Deps{Policy: policy.NewStore(testEngine(t, src)), Sink: rec, DNS: dns})
	if err != nil {
		t.Fatal(err)
	}
	var res fileResult
	c.observe = func(o observation) { res.obs = append(res.obs, o) }
	res.stats, res.err = c.ReadFile(context.Background(), path, nil)
	res.events = rec.all()
	return res
}
