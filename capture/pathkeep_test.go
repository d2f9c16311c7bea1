package capture

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"egressd/audit"
	"egressd/policy"
)

// TestFlowKeepsBoundedPath: an open plain-HTTP flow keeps its first
// request's path only as the event will carry it, cut to
// audit.MaxPathBytes with its length noted, once the flow is decided. It
// kept the whole path (and, before httpwire's heads copied their strings,
// the whole head): a client whose open connections each sent a 60 KB
// request line held 60 KB of capture's memory per flow, up to the flow
// table's 65,536 flows.
func TestFlowKeepsBoundedPath(t *testing.T) {
	srv := netip.MustParseAddr("203.0.113.92")
	long := "/nirovision/" + strings.Repeat("p", 60000)
	p := newPcap(t)
	const n = 20
	for i := range n {
		cli := netip.AddrFrom4([4]byte{192, 0, 2, byte(100 + i)})
		c := &tcpConn{p: p, cli: cli, srv: srv, cport: uint16(47200 + i), sport: 80, cseq: 1, sseq: 1}
		c.handshake()
		c.send(true, []byte("GET "+long+"?q=1 HTTP/1.1\r\nHost: notion.test\r\n\r\n"), 1400, nil, nil)
	}
	// One more packet: the hook before it sees every flow's state.
	p.udp(true, netip.MustParseAddr("192.0.2.99"), srv, 40000, 9999, []byte("x"))
	path := p.close()
	rec := &recorder{}
	cp, err := New(Config{}, Deps{Policy: policy.NewStore(testEngine(t, fmt.Sprintf(keepAlivePolicy, policy.ModeAudit))), Sink: rec, DNS: factsMap{srv: {"notion.test"}}})
	if err != nil {
		t.Fatal(err)
	}
	held, open := 0, 0
	feed(t, cp, path, func(time.Time) {
		held, open = 0, 0
		for _, f := range cp.proc.flows {
			if f.decided {
				held += len(f.path)
				open++
			}
		}
	})
	if open != n {
		t.Fatalf("%d flows decided before the end, want %d", open, n)
	}
	if limit := n * audit.MaxPathBytes; held > limit {
		t.Errorf("%d open flows hold %d bytes of paths, over %d (%d each)", n, held, limit, audit.MaxPathBytes)
	}
	evs := 0
	for _, ev := range rec.all() {
		if ev.Kind != audit.KindFlow || ev.Dest != srv || ev.DestPort != 80 {
			continue
		}
		evs++
		if len(ev.Path) > audit.MaxPathBytes || ev.PathLen != len(long) || !strings.HasPrefix(ev.Path, "/nirovision/ppp") || ev.Verdict != policy.Allow {
			t.Errorf("event path %d bytes (%q…), path_len %d, %s; want at most %d bytes, path_len %d, allowed", len(ev.Path), ev.Path[:min(20, len(ev.Path))], ev.PathLen, ev.Verdict, audit.MaxPathBytes, len(long))
			break
		}
	}
	if evs != n {
		t.Errorf("%d flow events, want %d", evs, n)
	}
}
