package capture

import (
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/gopacket/gopacket/layers"

	"egressd/policy"
)

// TestQUICOtherNamesEventAlias: an event carries its flow's other names
// without a copy (eventOthers), so a name the flow gains later must not
// show in, nor race with, an event handed over before: a reader of the
// held event (the journal's, the ledger's goroutine) sees the names of
// its time while capture appends (run with -race).
func TestQUICOtherNamesEventAlias(t *testing.T) {
	srv := netip.MustParseAddr("203.0.113.10")
	rec := &recorder{}
	capt, err := New(Config{}, Deps{Policy: policy.NewStore(testEngine(t, testPolicy)), Sink: rec, DNS: factsMap{srv: {decoyName}}})
	if err != nil {
		t.Fatal(err)
	}
	p := capt.proc
	cli, dst := netip.AddrPortFrom(netip.MustParseAddr("192.0.2.10"), 47000), netip.AddrPortFrom(srv, 443)
	now := time.Unix(1e9, 0)
	send := func(i int, name string) {
		now = now.Add(time.Millisecond)
		dg := clientInitialV(t, quicV1, []byte{byte(i + 1), 1, 1, 1}, nil, 0, 0, handHello(sniExt(name))[5:])
		p.packet(udpFrame(t, macClient, macGW, cli, dst, dg), now, layers.LinkTypeEthernet)
	}
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
