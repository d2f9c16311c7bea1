package admin

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"egressd/internal/testnet"
)

// TestRunOutOfFDs: Run's accept out of file descriptors is waited out by
// the listener (netutil.RetryListener), with one "admin: accept failing"
// line naming it, and Close ends Run meanwhile. Before, Run served the
// bare listener: net/http's server logged every retry to stderr ("http:
// Accept error") and nothing to the admin's log, and slept its pause
// through Close. Loopback only; the test fails only past 5 s, not on
// speed.
func TestRunOutOfFDs(t *testing.T) {
	runOutOfFDs(t, func(s *Server, cancel context.CancelFunc) { s.Close() })
}

// TestRunOutOfFDsCancel: Run's context ending (the way example_test's
// errgroup ends it) ends Run while its accept waits out EMFILE, as Close
// does, with the one line, and Run returns nil. Before, the wrapper's
// stop (ctx.Done) ended the pause before Run's Close at the context's
// end had begun Shutdown as often as not, and Run returned "admin:
// serve: accept ...: use of closed network connection", an error to the
// errgroup (a few rounds, each a toss-up).
func TestRunOutOfFDsCancel(t *testing.T) {
	for range 8 {
		runOutOfFDs(t, func(s *Server, cancel context.CancelFunc) { cancel() })
	}
}

// runOutOfFDs is TestRunOutOfFDs with Run ended by end, given the server
// and the cancel of Run's context.
func runOutOfFDs(t *testing.T, end func(*Server, context.CancelFunc)) {
	t.Helper()
	l, _ := testLedger(t, nil)
	var mu sync.Mutex
	var logs bytes.Buffer
	s, err := New(Config{Addr: "127.0.0.1:0"}, Deps{Reporter: l, Logger: slog.New(slog.NewTextHandler(writerFunc(func(b []byte) (int, error) {
		mu.Lock()
		defer mu.Unlock()
		return logs.Write(b)
	}), nil))})
	if err != nil {
		t.Fatal(err)
	}
	logged := func() string {
		mu.Lock()
		defer mu.Unlock()
		return logs.String()
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	deadline := time.Now().Add(10 * time.Second)
	for s.Addr() == "127.0.0.1:0" && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	addr := s.Addr()
	connect := testnet.DialQueued(t, addr)
	release := testnet.OutOfFDs(t)
	defer release()
	defer connect()()
	want := `msg="admin: accept failing: retrying" listen=` + addr
	for deadline := time.Now().Add(10 * time.Second); !strings.Contains(logged(), want); {
		if time.Now().After(deadline) {
			s.Close()
			release()
			t.Fatalf("the log does not say %q out of descriptors:\n%s", want, logged())
		}
		time.Sleep(10 * time.Millisecond)
	}
	end(s, cancel)
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Run: %v", err)
		}
	case <-time.After(5 * time.Second):
		release()
		t.Fatal("Run has not returned 5 s after it was ended while out of descriptors")
	}
	if n := strings.Count(logged(), "admin: accept failing"); n != 1 {
		t.Errorf("%d accept-failing lines, want 1:\n%s", n, logged())
	}
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(b []byte) (int, error) { return f(b) }
