package capture

import (
	"net/netip"
	"testing"

	"egressd/audit"
	"egressd/policy"
)

// TestNoPathNeedsTheStart: capture calls a flow path-unseen (cleartext
// the proxy reads no HTTP/1 path from, where only a host/path rule would
// allow it) only when it saw the flow from the client's SYN on. A flow
// already open when capture started, or whose first client segment
// capture lost, may well be TLS or HTTP/1 the proxy read: it is judged at
// host level, as before. The event of the first says it showed no path
// (Event.NoPath), for a replay to decide it so again.
func TestNoPathNeedsTheStart(t *testing.T) {
	const pol = `version: 1
mode: audit
rules:
  - name: api
    to: ["pathhost.test/api/*"]
    ports: [443/tcp]
`
	cli := netip.MustParseAddr("192.0.2.85")
	srv := netip.MustParseAddr("203.0.113.85")
	appData := append([]byte{0x17, 3, 3, 0, 40}, make([]byte, 40)...) // a TLS application data record
	p := newPcap(t)
	// 0: seen from its SYN, not TLS or HTTP: path-unseen.
	c := &tcpConn{p: p, cli: cli, srv: srv, cport: 48000, sport: 443, cseq: 1, sseq: 1}
	c.handshake()
	c.send(true, []byte("\x00\x01binary"), 1400, nil, nil)
	c.close()
	// 1: already open when capture started: TLS application data.
	c = &tcpConn{p: p, cli: cli, srv: srv, cport: 48001, sport: 443, cseq: 5000, sseq: 9000}
	c.send(true, appData, 1400, nil, nil)
	c.send(false, appData, 1400, nil, nil)
	c.close()
	// 2: seen from its SYN, the first client segment lost: the ClientHello
	// capture did not see.
	c = &tcpConn{p: p, cli: cli, srv: srv, cport: 48002, sport: 443, cseq: 1, sseq: 1}
	c.handshake()
	c.send(true, realClientHello(t, "pathhost.test"), 600, nil, map[int]bool{0: true})
	c.close()
	r := synthRun(t, p.close(), pol, factsMap{srv: {"pathhost.test"}}, Config{})
	got := map[uint16]audit.Event{}
	for _, ev := range r.events {
		got[ev.ClientPort] = ev
	}
	for i, want := range []string{policy.ReasonPathUnseen, policy.ReasonAllowed, policy.ReasonAllowed} {
		if ev, ok := got[uint16(48000+i)]; !ok || ev.Reason != want || ev.NoPath != (i == 0) {
			t.Errorf("flow %d: %+v, want %s", i, ev, want)
		}
	}
}
