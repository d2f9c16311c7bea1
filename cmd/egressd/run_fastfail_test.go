package main

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"testing"

	"egressd/internal/nfq"
	"egressd/policy"
	"egressd/proxy"
)

// brokenQueue is a fast-path queue whose reads fail at once, as
// nfq.Conn.Serve fails on a read error of its socket (the e2e build's
// nfq.Conn.Break; TestFastPathQueueFails).
type brokenQueue struct{}

func (brokenQueue) Serve(context.Context, func(nfq.Packet)) error {
	return errors.New("nfq: read: broken")
}
func (brokenQueue) Verdict(uint32, nfq.Verdict) error             { return nil }
func (brokenQueue) VerdictMark(uint32, nfq.Verdict, uint32) error { return nil }

// TestFastQueueFailsAsStopping: the fast path's queue reader fails just
// before egressd stops. Once proxy.ServeQueue says so (a QueueError: it
// saw the failure while egressd ran, and the connections pending then
// are recorded fast-path-failed), the warning that the fast path is off
// because its reader failed is written, whichever comes first after:
// the stop before the reader's goroutine handed the failure on (cut),
// or the stop taken by the main loop before the failure it had been
// handed (unread). Before, both lost the line: the goroutine dropped
// the failure once the stop had begun, and the main loop's select took
// the stop over a failure waiting (TestServeQueueFailedPending's events
// with no line beside them).
func TestFastQueueFailsAsStopping(t *testing.T) {
	for _, cut := range []bool{true, false} {
		name := "unread"
		if cut {
			name = "cut"
		}
		t.Run(name, func(t *testing.T) {
			eng, err := policy.Compile("p", []byte("version: 1\nmode: enforce\nrules: []\n"))
			if err != nil {
				t.Fatal(err)
			}
			var logs bytes.Buffer
			log := slog.New(slog.NewJSONHandler(&logs, nil))
			prx, err := proxy.New(proxy.Config{}, proxy.Deps{Policy: policy.NewStore(eng), Logger: log})
			if err != nil {
				t.Fatal(err)
			}
			defer prx.Close()
			d := &daemon{log: log, store: policy.NewStore(eng), degraded: map[string]string{}, fastFailed: make(chan *proxy.QueueError, 1)}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			var wg sync.WaitGroup
			wg.Add(1)
			go func() {
				defer wg.Done()
				err := prx.ServeQueue(ctx, brokenQueue{})
				var qerr *proxy.QueueError
				if !errors.As(err, &qerr) {
					t.Errorf("ServeQueue on a queue whose reads fail: %v, want a QueueError", err)
				}
				if cut {
					cancel() // the stop begins before the failure is handed on
				}
				d.queueEnded(ctx, err)
			}()
			// The goroutine has handed the failure on (unread: the main
			// loop then takes the stop first), or seen the stop begin
			// first (cut), when the stop goes on.
			wg.Wait()
			if err := d.shutdown(cancel, &wg); err != nil {
				t.Fatal(err)
			}
			var lines []string
			for _, l := range strings.Split(logs.String(), "\n") {
				if strings.Contains(l, "the fast path is off") {
					lines = append(lines, l)
				}
			}
			if len(lines) != 1 || !strings.Contains(lines[0], "queue reader failed") || !strings.Contains(lines[0], `"level":"WARN"`) ||
				!strings.Contains(lines[0], "nfq: read: broken") || !strings.Contains(lines[0], `"pending_lost":0`) {
				t.Errorf("%d lines say the fast path is off, want one warning that its queue reader failed, with the error and pending_lost:\n%s", len(lines), logs.String())
			}
		})
	}
}
