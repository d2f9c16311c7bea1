package capture

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"egressd/audit"
	"egressd/policy"
)

// TestSyntheticKeepAliveReloadToEnforce: a plain-HTTP connection capture
// began following live in audit mode is still followed after a reload to
// enforce, but nothing refuses its requests one by one: it was never
// redirected to the proxy (NAT applies to a connection's first packet),
// and the enforce firewall judges its packets by address like a new
// connection's (firewall.CTMarkEnforced). Its later requests are reported
// in the mode the connection began in, audit: a request the policy
// refuses is "would deny", not enforced, as the connection's flow event
// is. Before, they were stamped with the new mode, so a refused request
// was marked enforced and closed "denied" although no 403 was sent.
func TestSyntheticKeepAliveReloadToEnforce(t *testing.T) {
	cli := netip.MustParseAddr("192.0.2.92")
	srv := netip.MustParseAddr("203.0.113.92")
	p := newPcap(t)
	c := &tcpConn{p: p, cli: cli, srv: srv, cport: 47200, sport: 80, cseq: 1, sseq: 1}
	c.handshake()
	c.send(true, []byte("GET /nirovision/a HTTP/1.1\r\nHost: notion.test\r\n\r\n"), 1400, nil, nil)
	c.send(false, []byte("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"), 1400, nil, nil)
	c.send(true, []byte("GET /nirovision/b HTTP/1.1\r\nHost: notion.test\r\n\r\n"), 1400, nil, nil)
	c.send(false, []byte("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"), 1400, nil, nil)
	p.now = p.now.Add(2 * time.Second)
	reload := p.now
	p.now = p.now.Add(2 * time.Second)
	c.send(true, []byte("GET /other HTTP/1.1\r\nHost: notion.test\r\n\r\n"), 1400, nil, nil)
	c.send(true, []byte("GET /nirovision/c HTTP/1.1\r\nHost: notion.test\r\n\r\n"), 1400, nil, nil)
	c.close()
	path := p.close()

	rec := &recorder{}
	store := policy.NewStore(testEngine(t, fmt.Sprintf(keepAlivePolicy, policy.ModeAudit)))
	capt, err := New(Config{}, Deps{Policy: store, Sink: rec, DNS: factsMap{srv: {"notion.test"}}})
	if err != nil {
		t.Fatal(err)
	}
	swapped := false
	feed(t, capt, path, func(ts time.Time) {
		if !swapped && ts.After(reload) {
			store.Swap(testEngine(t, fmt.Sprintf(keepAlivePolicy, policy.ModeEnforce)))
			swapped = true
		}
	})
	if !swapped {
		t.Fatal("the policy was not swapped")
	}
	var got []string
	for _, ev := range rec.all() {
		if ev.Kind != audit.KindRequest {
			continue
		}
		got = append(got, fmt.Sprintf("%s %s %s %s enforced=%v %s", ev.Path, ev.Verdict, ev.Reason, ev.Mode, ev.Enforced, ev.Close))
	}
	want := []string{
		"/nirovision/b allow allowed audit enforced=false forwarded",
		"/other deny path-not-allowed audit enforced=false forwarded",
		"/nirovision/c allow allowed audit enforced=false forwarded",
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("requests\n got %q\nwant %q", got, want)
	}
}
