package capture

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"egressd/audit"
	"egressd/policy"
)

// synRetxPolicy: a name rule on a port --tcp-ports 443 leaves to the
// forward chain (5222), and one for NTP, which the chain forwards too: it
// lets a flow out by the rule's learned set.
const synRetxPolicy = `version: 1
mode: %s
rules:
  - name: chat
    to: ["*.chat.test"]
    ports: [5222/tcp]
  - name: ntp
    to: ["*.time.test"]
    ports: [123/udp]
`

// TestForwardedSYNRetransmittedAfterAnswer: a client connects to an
// address before DNS gave it out (a stale cache, its connect racing its
// own lookup), then asks and gets the answer; its kernel retransmits the
// SYN (same port pair, same initial sequence number) a second later. The
// forward chain dropped the first SYN (no conntrack entry was confirmed),
// so the retransmission is a new packet to it, which the learned set now
// admits: the handshake completes and the connection works. Capture
// judges such a connection again at each retransmitted SYN while the
// server has sent nothing, and reports it allowed, in audit and in
// enforce mode, whether the answer is one seen on the wire or the
// forwarder's (DNSGrant.Since). A connection whose every SYN came before
// the answer stays dropped. Before, capture decided the flow at its first
// SYN alone and reported it dropped (would be blocked) although it got
// out.
func TestForwardedSYNRetransmittedAfterAnswer(t *testing.T) {
	cli := netip.MustParseAddr("192.0.2.70")
	res := netip.MustParseAddr("198.51.100.53")
	late := netip.MustParseAddr("203.0.113.40")  // SYN, answer, SYN again: allowed
	never := netip.MustParseAddr("203.0.113.41") // every SYN before the answer: dropped
	for _, via := range []string{"wire", "forwarder"} {
		p := newPcap(t)
		start := p.now
		var facts grantFacts
		answer := func(name string, addr netip.Addr, port uint16) {
			if via == "wire" {
				p.udp(true, cli, res, port, 53, dnsQuery(t, name))
				p.udp(false, res, cli, 53, port, dnsResponse(t, name, []netip.Addr{addr}))
				return
			}
			p.now = p.now.Add(time.Millisecond)
			facts[addr] = append(facts[addr], DNSGrant{Client: cli, Name: name, Since: p.now})
		}
		if via == "forwarder" {
			facts = grantFacts{}
		}

		c := &tcpConn{p: p, cli: cli, srv: late, cport: 45000, sport: 5222, cseq: 7000, sseq: 9000}
		c.seg(true, "S", c.cseq, nil)
		p.now = p.now.Add(200 * time.Millisecond)
		answer("a.chat.test", late, 5300)
		p.now = p.now.Add(time.Second)
		c.handshake() // the retransmitted SYN (same ISN), then the rest
		c.send(true, []byte("<stream>"), 1400, nil, nil)
		c.send(false, []byte("<stream/>"), 1400, nil, nil)
		c.close()

		n := &tcpConn{p: p, cli: cli, srv: never, cport: 45001, sport: 5222, cseq: 8000, sseq: 1}
		for _, gap := range []time.Duration{0, time.Second, 2 * time.Second, 4 * time.Second} {
			p.now = p.now.Add(gap)
			n.seg(true, "S", n.cseq, nil)
		}
		p.now = p.now.Add(300 * time.Millisecond)
		answer("b.chat.test", never, 5301)
		if p.now.Sub(start) > time.Minute {
			t.Fatal("test: the flows must be reported at their end, not while open")
		}
		path := p.close()

		for _, mode := range []policy.Mode{policy.ModeAudit, policy.ModeEnforce} {
			cfg := Config{TCPPorts: []policy.PortRange{{Lo: 443, Hi: 443, Proto: policy.TCP}}}
			var dns DNSFacts
			if facts != nil {
				dns = facts
			}
			r := synthRun(t, path, fmt.Sprintf(synRetxPolicy, mode), dns, cfg)
			got := map[uint16]audit.Event{}
			for _, ev := range r.events {
				if ev.Kind == audit.KindFlow && ev.DestPort == 5222 {
					if _, dup := got[ev.ClientPort]; dup {
						t.Errorf("%s, %s: two events of the flow from port %d", via, mode, ev.ClientPort)
					}
					got[ev.ClientPort] = ev
				}
			}
			if ev := got[45000]; ev.Verdict != policy.Allow || ev.Rule != "chat" || ev.Name != "a.chat.test" || ev.Enforced {
				t.Errorf("%s answer, %s mode: SYN before the answer, retransmitted after it: %s rule %q name %q enforced %v, want allowed by chat, a.chat.test (the retransmitted SYN got out)",
					via, mode, ev.Verdict, ev.Rule, ev.Name, ev.Enforced)
			}
			if ev := got[45001]; ev.Verdict != policy.Deny || ev.Rule != "" || ev.Enforced != (mode == policy.ModeEnforce) {
				t.Errorf("%s answer, %s mode: every SYN before the answer: %s rule %q enforced %v, want dropped", via, mode, ev.Verdict, ev.Rule, ev.Enforced)
			}
		}
	}
}

// TestForwardedSYNRejudgeBounded: a client that repeats its SYN (the same
// ISN) far more often than a kernel retransmits it has its connection
// judged again at most maxRejudge times: an answer that came only after
// those leaves the flow dropped, as the first SYNs were.
func TestForwardedSYNRejudgeBounded(t *testing.T) {
	cli := netip.MustParseAddr("192.0.2.70")
	srv := netip.MustParseAddr("203.0.113.42")
	p := newPcap(t)
	c := &tcpConn{p: p, cli: cli, srv: srv, cport: 45002, sport: 5222, cseq: 100, sseq: 1}
	for range maxRejudge + 1 {
		c.seg(true, "S", c.cseq, nil)
	}
	p.now = p.now.Add(100 * time.Millisecond)
	facts := grantFacts{srv: {{Client: cli, Name: "c.chat.test", Since: p.now}}}
	p.now = p.now.Add(time.Second)
	c.seg(true, "S", c.cseq, nil) // past the bound: not judged again
	path := p.close()
	cfg := Config{TCPPorts: []policy.PortRange{{Lo: 443, Hi: 443, Proto: policy.TCP}}}
	r := synthRun(t, path, fmt.Sprintf(synRetxPolicy, policy.ModeEnforce), facts, cfg)
	for _, ev := range r.events {
		if ev.Kind == audit.KindFlow && ev.ClientPort == 45002 && ev.Verdict != policy.Deny {
			t.Errorf("a SYN repeated past the bound of re-judgements: %s rule %q, want dropped (judged no more)", ev.Verdict, ev.Rule)
		}
	}
}

// TestForwardedUDPAfterDecisionAfterAnswer: as a retransmitted SYN, a
// datagram a client sends again from the same socket after the DNS answer
// is a new packet to the forward chain when every earlier one was dropped
// (no conntrack entry was confirmed), and the learned set now lets it out.
// Capture decides a UDP flow 10 s after it began; a datagram after that,
// and after the answer, while the server has sent nothing, judges the flow
// again: allowed, in audit and in enforce mode. One whose every datagram
// came before the answer stays dropped. Before, a flow decided dropped at
// 10 s stayed dropped though its later datagrams got out and were answered.
func TestForwardedUDPAfterDecisionAfterAnswer(t *testing.T) {
	cli := netip.MustParseAddr("192.0.2.70")
	late := netip.MustParseAddr("203.0.113.50")
	never := netip.MustParseAddr("203.0.113.51")
	other := netip.MustParseAddr("203.0.113.52")
	p := newPcap(t)
	start := p.now
	p.udp(true, cli, late, 46000, 123, []byte("ntp"))
	p.udp(true, cli, never, 46001, 123, []byte("ntp"))
	p.now = p.now.Add(4 * time.Second)
	p.udp(true, cli, late, 46000, 123, []byte("ntp"))
	p.udp(true, cli, never, 46001, 123, []byte("ntp"))
	// Past classifyWait: another flow's datagram sweeps both, decided
	// dropped (no answer yet).
	p.now = start.Add(11 * time.Second)
	p.udp(true, cli, other, 46002, 9, []byte("x"))
	p.now = start.Add(12 * time.Second)
	facts := grantFacts{
		late:  {{Client: cli, Name: "a.time.test", Since: p.now}},
		never: {{Client: cli, Name: "b.time.test", Since: p.now}},
	}
	p.now = start.Add(14 * time.Second)
	p.udp(true, cli, late, 46000, 123, []byte("ntp")) // from the same socket, after the answer
	p.udp(false, late, cli, 123, 46000, []byte("ntp reply"))
	path := p.close()
	for _, mode := range []policy.Mode{policy.ModeAudit, policy.ModeEnforce} {
		r := synthRun(t, path, fmt.Sprintf(synRetxPolicy, mode), facts, Config{})
		got := map[uint16]audit.Event{}
		for _, ev := range r.events {
			if ev.Kind == audit.KindFlow && ev.DestPort == 123 {
				got[ev.ClientPort] = ev
			}
		}
		if ev := got[46000]; ev.Verdict != policy.Allow || ev.Rule != "ntp" || ev.Name != "a.time.test" {
			t.Errorf("%s mode: datagrams before the answer, one after it and after the decision: %s rule %q name %q, want allowed by ntp, a.time.test", mode, ev.Verdict, ev.Rule, ev.Name)
		}
		if ev := got[46001]; ev.Verdict != policy.Deny || ev.Rule != "" {
			t.Errorf("%s mode: every datagram before the answer: %s rule %q, want dropped", mode, ev.Verdict, ev.Rule)
		}
	}
}
