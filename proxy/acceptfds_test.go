package proxy

import (
	"fmt"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"

	"egressd/internal/testnet"
	"egressd/policy"
)

// TestServeOutOfFDsStops: the transparent listener's accept out of file
// descriptors waits with a pause growing to a second (Serve); Close
// meanwhile has Serve return without waiting the pause out. The time it
// takes is logged; the test fails only past 5 s (a hang), not on speed.
func TestServeOutOfFDsStops(t *testing.T) {
	eng, err := policy.Compile("p", []byte(fmt.Sprintf(testPolicy, "enforce")))
	if err != nil {
		t.Fatal(err)
	}
	var logs lockedBuf
	p, err := New(Config{}, Deps{Policy: policy.NewStore(eng), Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- p.Serve(ln) }()

	connect := testnet.DialQueued(t, ln.Addr().String()) // the socket made while descriptors are free
	_, release := testnet.OutOfFDs(t)
	defer connect()() // waits in the queue: accept has no descriptor
	const warn = "proxy: accept failing: retrying"
	seen := func() bool { return strings.Contains(strings.Join(logs.lines(), "\n"), warn) }
	deadline := time.Now().Add(10 * time.Second)
	for !seen() && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if !seen() {
		release()
		t.Fatalf("the log does not say %q out of descriptors: %q", warn, logs.lines())
	}
	// 5 ms doubling: past 1.3 s each pause is a second long.
	time.Sleep(1500 * time.Millisecond)

	start := time.Now()
	p.Close()
	select {
	case err := <-done:
		t.Logf("Serve returned %v after Close, out of descriptors", time.Since(start))
		if err != nil {
			t.Errorf("serve: %v", err)
		}
	case <-time.After(5 * time.Second):
		release()
		t.Fatalf("Serve has not returned 5 s after Close while accept waited out EMFILE")
	}
}
