package capture

import (
	"slices"
	"sync"
	"testing"
)

// TestQUICOtherNamesEventAlias: an event carries its flow's other names
// without a copy (eventOthers), so a name the flow gains later must not
// show in, nor race with, an event handed over before: a reader of the
// held event (the journal's, the ledger's goroutine) sees the names of
// its time while capture appends (run with -race).
func TestQUICOtherNamesEventAlias(t *testing.T) {
	p, rec, send := quicNamesProc(t)
	send(0, decoyName)
	send(1, "b.allowed.test")
	if len(p.flows) != 1 {
		t.Fatalf("%d flows, want 1", len(p.flows))
	}
	for _, f := range p.flows {
		p.emitNow(f, "", 0)
	}
	evs := rec.all()
	if len(evs) != 1 || !slices.Equal(evs[0].OtherNames, []string{"b.allowed.test"}) {
		t.Fatalf("events %+v, want one naming b.allowed.test", evs)
	}
	held := evs[0]
	var wg sync.WaitGroup
	stop := make(chan struct{})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			if !slices.Equal(held.OtherNames, []string{"b.allowed.test"}) {
				t.Errorf("the held event's other names became %q", held.OtherNames)
				return
			}
			_ = append(held.OtherNames, "x") // a reader's append must not write into the flow's
		}
	}()
	send(2, "c.allowed.test")
	send(3, "d.allowed.test")
	close(stop)
	wg.Wait()
	for _, f := range p.flows {
		if !slices.Equal(f.otherNames, []string{"b.allowed.test", "c.allowed.test", "d.allowed.test"}) {
			t.Errorf("the flow's other names %q", f.otherNames)
		}
	}
	if !slices.Equal(held.OtherNames, []string{"b.allowed.test"}) {
		t.Errorf("the held event's other names became %q", held.OtherNames)
	}
}
