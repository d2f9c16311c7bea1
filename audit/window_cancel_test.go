package audit_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"egressd/admin"
	"egressd/audit"
	"egressd/internal/testnet"
	"egressd/policy"
)

// TestWindowReadStopsWhenClientLeaves: a window's (since=) read of the
// event log is the request's: a client that leaves mid-read stops it at
// the next 64 KiB, rather than costing the read of the whole window (a
// month's log: seconds of a core and a ledger's worth of memory) for a
// report no one will get. The admin server serves a real event log of
// 20,000 events in a temp dir; the read is held after its 100th event
// until the request's context ends, then the test counts the events it
// still passes on. Before, it passed on all 20,000 and built the report.
func TestWindowReadStopsWhenClientLeaves(t *testing.T) {
	eng := audit.LoadPolicy(t, "policy.yaml")
	dir := t.TempDir()
	f, err := os.Create(filepath.Join(dir, audit.CurrentLog))
	if err != nil {
		t.Fatal(err)
	}
	const n = 20000
	sink := audit.NewNDJSONSink(f)
	start := time.Now().UTC().Add(-2 * time.Hour)
	tcp, ok := policy.ParseProto("tcp")
	if !ok {
		t.Fatal("policy: no proto tcp")
	}
	for i := range n {
		ev := audit.Event{Kind: audit.KindFlow, Source: audit.SourceCapture, Time: start.Add(time.Duration(i) * time.Millisecond),
			Client: netip.MustParseAddr("192.168.10.5"), ClientPort: uint16(10000 + i), Dest: netip.MustParseAddr("203.0.113.9"),
			DestPort: 443, Proto: "tcp", Name: fmt.Sprintf("h%d.tracker.example", i%500), BytesOut: 100, BytesIn: 1000}
		ev.Stamp(eng.Decide(policy.Input{Client: ev.Client, Dest: ev.Dest, Port: 443, Proto: tcp, Name: ev.Name, Now: ev.Time}))
		sink.Emit(ev)
	}
	if err := sink.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	l := audit.NewLedger(eng, audit.LedgerOptions{})
	j, st, err := audit.OpenJournal(audit.JournalConfig{Dir: dir, Logger: slog.New(slog.DiscardHandler)}, l)
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	if st.Events != n {
		t.Fatalf("the event log holds %d events, want %d", st.Events, n)
	}

	const holdAt = 100
	var read atomic.Uint64
	held := make(chan struct{})
	audit.SetWindowEventHook(t, func(ctx context.Context, events uint64) {
		read.Store(events)
		if events == holdAt {
			close(held)
			<-ctx.Done()
		}
	})
	s, err := admin.New(admin.Config{}, admin.Deps{Reporter: l, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	ts := httptest.NewServer(s.Handler())
	ctx, cancel := context.WithCancel(context.Background())
	got := testnet.Get(ctx, ts.URL+"/report.json?since=7d")
	select {
	case <-held:
	case err := <-got:
		cancel()
		ts.Close()
		t.Fatalf("answered (%v) before the window's read reached its %dth event", err, holdAt)
	case <-time.After(30 * time.Second):
		cancel()
		ts.Close()
		t.Fatalf("the window's read did not reach its %dth event", holdAt)
	}
	cancel()
	if err := <-got; !errors.Is(err, context.Canceled) {
		t.Errorf("the client's request: %v, want it canceled", err)
	}
	ts.Close() // waits for the handler: the read is over
	// 64 KiB buffered past the hold, and the chunk the read had begun.
	if r := read.Load(); r >= n/4 {
		t.Errorf("the window's read went on to its %dth of %d events after its client left, want it stopped within a few hundred after the %dth", r, n, holdAt)
	}
}
