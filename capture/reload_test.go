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

// TestSyntheticOpenedBeforeEnforce: a TCP connection that opened in audit
// mode and sends its first request head (or ClientHello) after a reload to
// enforce was never redirected to the proxy (NAT applies to a connection's
// first packet), and the enforce firewall's established rule passes only
// connections it marked (firewall.CTMarkEnforced): its packets meet the
// forward chain's rules as a new connection's, by address. Without
// --tcp-ports that chain has no TCP accept rule at all, so it is dropped,
// whatever its name; with --tcp-ports it is let through where a CIDR rule
// or the rule's learned set admits its address, and dropped elsewhere.
// Capture reports that, in enforce mode; a drop gets its own reason,
// opened-before-enforce, not a rule's. Before, capture judged it by its
// Host as the proxy would a new connection and stamped that enforce: the
// connection to notion.test was reported allowed, though nftables drops it,
// and a head with two Host headers http-malformed, though no proxy read it.
func TestSyntheticOpenedBeforeEnforce(t *testing.T) {
	const pol = `version: 1
mode: %s
rules:
  - name: web
    to: ["notion.test"]
    ports: [80/tcp]
  - name: lab
    to: [198.51.100.0/24]
    ports: [80/tcp]
`
	cli := netip.MustParseAddr("192.0.2.93")
	given := netip.MustParseAddr("203.0.113.93") // our DNS gave it out for notion.test
	other := netip.MustParseAddr("203.0.113.94")
	labSrv := netip.MustParseAddr("198.51.100.93")
	head := []byte("GET / HTTP/1.1\r\nHost: notion.test\r\n\r\n")
	p := newPcap(t)
	var conns []*tcpConn
	for i, srv := range []netip.Addr{given, other, labSrv} {
		c := &tcpConn{p: p, cli: cli, srv: srv, cport: uint16(47300 + i), sport: 80, cseq: 1, sseq: 1}
		c.handshake()
		conns = append(conns, c)
	}
	bad := &tcpConn{p: p, cli: cli, srv: labSrv, cport: 47303, sport: 80, cseq: 1, sseq: 1}
	bad.handshake()
	p.now = p.now.Add(2 * time.Second)
	reload := p.now
	p.now = p.now.Add(2 * time.Second)
	for _, c := range conns {
		c.send(true, head, 1400, nil, nil)
	}
	// A head the proxy would refuse (two Host headers): no proxy reads it.
	bad.send(true, []byte("GET / HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\n\r\n"), 1400, nil, nil)
	conns = append(conns, bad)
	// Opened after the reload: the proxy's, judged by its Host.
	after := &tcpConn{p: p, cli: cli, srv: other, cport: 47310, sport: 80, cseq: 1, sseq: 1}
	after.handshake()
	after.send(true, head, 1400, nil, nil)
	for _, c := range append(conns, after) {
		c.close()
	}
	path := p.close()

	for _, tc := range []struct {
		name  string
		ports []policy.PortRange
		want  map[uint16]string
	}{
		{"all TCP redirected", nil, map[uint16]string{
			47300: "deny opened-before-enforce enforce enforced=true notion.test host",
			47301: "deny opened-before-enforce enforce enforced=true notion.test host",
			47302: "deny opened-before-enforce enforce enforced=true notion.test host",
			47303: "deny opened-before-enforce enforce enforced=true  none",
			47310: "allow allowed enforce enforced=false notion.test host",
		}},
		{"--tcp-ports 80", []policy.PortRange{{Lo: 80, Hi: 80, Proto: policy.TCP}}, map[uint16]string{
			47300: "allow allowed enforce enforced=false notion.test host",
			47301: "deny opened-before-enforce enforce enforced=true notion.test host",
			47302: "allow allowed enforce enforced=false notion.test host",
			47303: "allow allowed enforce enforced=false  none",
			47310: "allow allowed enforce enforced=false notion.test host",
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rec := &recorder{}
			store := policy.NewStore(testEngine(t, fmt.Sprintf(pol, policy.ModeAudit)))
			capt, err := New(Config{TCPPorts: tc.ports}, Deps{Policy: store, Sink: rec, DNS: factsMap{given: {"notion.test"}}})
			if err != nil {
				t.Fatal(err)
			}
			swapped := false
			feed(t, capt, path, func(ts time.Time) {
				if !swapped && ts.After(reload) {
					store.Swap(testEngine(t, fmt.Sprintf(pol, policy.ModeEnforce)))
					swapped = true
				}
			})
			got := map[uint16]string{}
			for _, ev := range rec.all() {
				if ev.Kind == audit.KindFlow {
					got[ev.ClientPort] = fmt.Sprintf("%s %s %s enforced=%v %s %s", ev.Verdict, ev.Reason, ev.Mode, ev.Enforced, ev.Name, ev.NameSource)
				}
			}
			for port, w := range tc.want {
				if got[port] != w {
					t.Errorf("port %d: got %q, want %q", port, got[port], w)
				}
			}
		})
	}
}

// reloadRun feeds a UDP flow from cli to each of dsts (port 123, a
// datagram each way every 10 s for 90 s, capture reporting flows open
// after a minute as Run does) and, before the datagrams of second 70,
// calls at. Events go to a recorder and a ledger.
func reloadRun(t *testing.T, pol string, dsts []netip.Addr, dns DNSFacts, extra func(p *pcapWriter), at func(c *Capture, store *policy.Store)) (*recorder, *audit.Report) {
	t.Helper()
	cli := netip.MustParseAddr("192.0.2.95")
	return reloadRunEach(t, pol, dns, 70*time.Second, func(p *pcapWriter, s int) {
		for i, dst := range dsts {
			p.udp(true, cli, dst, uint16(40100+i), 123, make([]byte, 48))
			p.udp(false, dst, cli, 123, uint16(40100+i), make([]byte, 48))
		}
		if extra != nil && s == 0 {
			extra(p)
		}
	}, at)
}

// reloadRunEach runs a capture (reporting flows open after a minute, as
// Run does) over the packets each(p, s) writes for second s (every 10 s,
// 0 to 90) and calls at once, before the packets of the first second at
// or past reload. Events go to a recorder and a ledger.
func reloadRunEach(t *testing.T, pol string, dns DNSFacts, reload time.Duration, each func(p *pcapWriter, s int), at func(c *Capture, store *policy.Store)) (*recorder, *audit.Report) {
	t.Helper()
	return reloadRunSteps(t, Config{}, pol, dns, each, reloadStep{reload, at})
}

// reloadStep is a reload of reloadRunSteps: at is called once, before
// the packets of the first second at or past after.
type reloadStep struct {
	after time.Duration
	at    func(c *Capture, store *policy.Store)
}

// reloadRunSteps is reloadRunEach with cfg and a reload at each of steps,
// in order.
func reloadRunSteps(t *testing.T, cfg Config, pol string, dns DNSFacts, each func(p *pcapWriter, s int), steps ...reloadStep) (*recorder, *audit.Report) {
	t.Helper()
	p := newPcap(t)
	start := p.now
	for s := 0; s <= 90; s += 10 {
		p.now = start.Add(time.Duration(s) * time.Second)
		each(p, s)
	}
	path := p.close()
	rec := &recorder{}
	store := policy.NewStore(testEngine(t, pol))
	ledger := audit.NewLedger(store.Load(), audit.LedgerOptions{})
	capt, err := New(cfg, Deps{Policy: store, Sink: audit.Tee(rec, ledger), DNS: dns})
	if err != nil {
		t.Fatal(err)
	}
	capt.proc.openReport = time.Minute
	var now time.Time
	capt.clock = func() time.Time { return now }
	done := 0
	feed(t, capt, path, func(ts time.Time) {
		now = ts
		for done < len(steps) && ts.Sub(start) >= steps[done].after {
			steps[done].at(capt, store)
			done++
		}
	})
	if done < len(steps) {
		t.Fatalf("%d of %d reloads were made", done, len(steps))
	}
	return rec, ledger.Report(audit.ReportOptions{})
}

// reloadTCP is a TCP connection from 192.0.2.95 that keepTCP (or
// keepTCPFrom) opens.
type reloadTCP struct {
	cport uint16
	srv   netip.Addr
	sport uint16
	hello []byte
}

// keepTCP is an each for reloadRunSteps: at second 0 it opens each of
// conns (handshake, then its hello from the client in segments of 1400
// bytes) and every 10 s from then on it keeps them open, the server
// sending reply on each and, unless ack is empty, the client ack after
// it.
func keepTCP(conns []reloadTCP, reply, ack string) func(p *pcapWriter, s int) {
	return keepTCPFrom(conns, nil, func(c *tcpConn) {
		c.send(false, []byte(reply), 1400, nil, nil)
		if ack != "" {
			c.send(true, []byte(ack), 1400, nil, nil)
		}
	})
}

// keepTCPFrom is keepTCP with connections that open later and other
// packets: conns[i] opens at second from[i] (nil: all at 0), its hello
// unless nil, and from then on, every 10 s, keep writes on it.
func keepTCPFrom(conns []reloadTCP, from []int, keep func(c *tcpConn)) func(p *pcapWriter, s int) {
	tcs := make([]*tcpConn, len(conns))
	return func(p *pcapWriter, s int) {
		for i, c := range conns {
			at := 0
			if from != nil {
				at = from[i]
			}
			switch {
			case s < at:
				continue
			case s == at:
				tcs[i] = &tcpConn{p: p, cli: netip.MustParseAddr("192.0.2.95"), srv: c.srv, cport: c.cport, sport: c.sport, cseq: 1, sseq: 1}
				tcs[i].handshake()
				tcs[i].send(true, c.hello, 1400, nil, nil)
			}
			keep(tcs[i])
		}
	}
}

// redecideTo is a reload for reloadRunSteps: the policy ntpPolicy makes
// of mode and rules, then Redecide.
func redecideTo(t *testing.T, mode policy.Mode, rules string) func(c *Capture, store *policy.Store) {
	return func(c *Capture, store *policy.Store) {
		c.Redecide(store.Swap(testEngine(t, fmt.Sprintf(ntpPolicy, mode, rules))))
	}
}

// wantFlowEvents checks the flowEvents of each client port of want.
func wantFlowEvents(t *testing.T, rec *recorder, want map[uint16][]string) {
	t.Helper()
	for port, w := range want {
		if got := flowEvents(rec, port); fmt.Sprint(got) != fmt.Sprint(w) {
			t.Errorf("port %d: events\n got %q\nwant %q", port, got, w)
		}
	}
}

// lastFlowEvent is the last event of the flow from client port cport.
func lastFlowEvent(rec *recorder, cport uint16) (last audit.Event) {
	for _, ev := range rec.all() {
		if ev.Kind == audit.KindFlow && ev.ClientPort == cport {
			last = ev
		}
	}
	return last
}

// flowEvents are the events of the flow from client port cport, as
// "source verdict reason mode enforced close".
func flowEvents(rec *recorder, cport uint16) []string {
	var got []string
	for _, ev := range rec.all() {
		if ev.Kind == audit.KindFlow && ev.ClientPort == cport {
			got = append(got, fmt.Sprintf("%s %s %s %s enforced=%v %s", ev.Source, ev.Verdict, ev.Reason, ev.Mode, ev.Enforced, ev.Close))
		}
	}
	return got
}

func droppedAt(r *audit.Report, dest string, port uint16) *audit.DroppedReport {
	for i := range r.Dropped {
		if r.Dropped[i].Dest == dest && r.Dropped[i].Port == port {
			return &r.Dropped[i]
		}
	}
	return nil
}

const ntpPolicy = `version: 1
mode: %s
rules:
%s  - name: lab
    to: [198.51.100.0/24]
    ports: [any]
`

const ntpRule = `  - name: ntp
    to: [203.0.113.0/24]
    ports: [123/udp]
`

// TestRevokeRecordsTheCut: in enforce mode the firewall cuts a forwarded
// flow a reload no longer allows and hands its event to Revoke. Capture
// records the cut on its own record of the flow, reported allowed while
// open: an event at once, then its end, both a drop enforced, close
// policy-revoked, with the flow's start, so the ledger counts the flow
// once, dropped. A cut flow capture does not follow is recorded as the
// firewall reported it. Before, capture's record said allowed to the end
// and the report never showed the cut.
func TestRevokeRecordsTheCut(t *testing.T) {
	ntp := netip.MustParseAddr("203.0.113.95")
	unknown := audit.Event{Kind: audit.KindFlow, Source: audit.SourceFirewall, Time: time.Now(),
		Client: netip.MustParseAddr("192.0.2.96"), ClientPort: 40999, Dest: netip.MustParseAddr("203.0.113.96"), DestPort: 123, Proto: "udp",
		Verdict: policy.Deny, Reason: policy.ReasonNoRule, Mode: policy.ModeEnforce, Enforced: true, Close: "policy-revoked"}
	rec, r := reloadRun(t, fmt.Sprintf(ntpPolicy, policy.ModeEnforce, ntpRule), []netip.Addr{ntp}, nil, nil, func(c *Capture, store *policy.Store) {
		store.Swap(testEngine(t, fmt.Sprintf(ntpPolicy, policy.ModeEnforce, "")))
		cut := unknown
		cut.Client, cut.ClientPort, cut.Dest = netip.MustParseAddr("192.0.2.95"), 40100, ntp
		c.Revoke(cut)
		c.Revoke(unknown)
	})
	want := []string{
		"capture allow allowed enforce enforced=false ",
		"capture deny no-rule enforce enforced=true policy-revoked",
		"capture deny no-rule enforce enforced=true policy-revoked",
	}
	if got := flowEvents(rec, 40100); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("events of the cut flow\n got %q\nwant %q", got, want)
	}
	if got := flowEvents(rec, 40999); len(got) != 1 || got[0] != "firewall deny no-rule enforce enforced=true policy-revoked" {
		t.Errorf("events of the flow capture did not follow: %q", got)
	}
	if d := droppedAt(r, ntp.String(), 123); d == nil || d.Flows != 1 || d.EnforcedFlows != 1 {
		t.Errorf("report: drop of the cut flow %+v, want 1 flow, enforced", d)
	}
	if d := droppedAt(r, "203.0.113.96", 123); d == nil || d.Flows != 1 {
		t.Errorf("report: drop of the flow capture did not follow %+v, want 1 flow", d)
	}
	if r.Totals.Flows != 2 || r.Totals.Allowed != 0 || r.Totals.Dropped != 2 {
		t.Errorf("report totals %+v, want 2 flows, both dropped", r.Totals)
	}
}

// TestRedecideAuditForwarded: in audit mode a reload that removes the
// rule of a live forwarded flow cuts nothing, but capture judges the flow
// again: it is recorded as one enforce would now drop (an event at once,
// its end likewise), so the report counts it dropped, not enforced; a
// flow whose rule stays is untouched. A later reload that allows the flow
// again credits it to the rule again (an event at once), as the reload to
// enforce credits a would-be deny the kernel lets go on: the report after
// it counts the flow under the rule, not among what enforce would drop.
// Before, the flow kept its allow to the end; then (session 25) the
// would-be deny stayed to the end, whatever a later reload allowed.
func TestRedecideAuditForwarded(t *testing.T) {
	ntp := netip.MustParseAddr("203.0.113.95")
	lab := netip.MustParseAddr("198.51.100.95")
	named := netip.MustParseAddr("198.18.5.97") // in no rule's CIDR
	const namedRule = `  - name: named
    to: [ntp.test]
    ports: [123/udp]
`
	with := fmt.Sprintf(ntpPolicy, policy.ModeAudit, ntpRule+namedRule)
	facts := factsMap{named: {"ntp.test"}}
	rec, r := reloadRun(t, with, []netip.Addr{ntp, lab, named}, facts, nil, func(c *Capture, store *policy.Store) {
		// The forwarder's answer for the named flow has expired since:
		// its rule, unchanged, still lets it run.
		delete(facts, named)
		c.Redecide(store.Swap(testEngine(t, fmt.Sprintf(ntpPolicy, policy.ModeAudit, namedRule))))
		c.proc.applyPending(time.Time{}) // before the next reload
		c.Redecide(store.Swap(testEngine(t, with)))
	})
	want := []string{
		"capture allow allowed audit enforced=false ",
		"capture deny no-rule audit enforced=false ",
		"capture allow allowed audit enforced=false ",
		"capture allow allowed audit enforced=false end-of-capture",
	}
	if got := flowEvents(rec, 40100); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("events of the NTP flow\n got %q\nwant %q", got, want)
	}
	for _, port := range []uint16{40101, 40102} {
		if got := flowEvents(rec, port); len(got) != 2 || got[0] != "capture allow allowed audit enforced=false " || got[1] != "capture allow allowed audit enforced=false end-of-capture" {
			t.Errorf("port %d: events %q, want its allow kept", port, got)
		}
	}
	if d := droppedAt(r, ntp.String(), 123); d != nil && d.Flows != 0 {
		t.Errorf("report: drop of the NTP flow %+v, want none: the last reload allows it", d)
	}
	if n := ruleFlows(r, "ntp"); n != 1 || r.Totals.Flows != 3 || r.Totals.Allowed != 3 || r.Totals.Dropped != 0 {
		t.Errorf("report: rule ntp %d flow(s), totals %+v; want 1, and 3 flows, all allowed", n, r.Totals)
	}
}

// TestRedecideAuditToEnforce: flows opened in audit mode and live after
// a reload to enforce carry no mark of the enforce ruleset, so the
// forward chain judges their next packets as a new connection's. Capture
// records what it does: a forwarded flow no rule admits now is a drop
// enforced (the rule's reason), one a CIDR rule admits stays allowed, so
// does one to an address egressd's forwarder gave out for a name a rule
// covers (the enforce ruleset's learned sets begin with those answers:
// firewall/seed.go; the e2e TestReloadAuditToEnforceKeepsGivenAnswers
// shows the datagrams answered), one only an answer of another resolver
// seen on the wire would admit is dropped as opened-before-enforce (not
// in the sets), and a TCP connection to a redirected port (decided by its
// Host in audit mode) is dropped as opened-before-enforce, which
// beforeEnforce says of one not yet named. (Until the sets were seeded,
// the forwarder's answer did not count either: that flow was dropped as
// opened-before-enforce, and this test said so.)
func TestRedecideAuditToEnforce(t *testing.T) {
	ntp := netip.MustParseAddr("203.0.113.95")
	lab := netip.MustParseAddr("198.51.100.95")
	named := netip.MustParseAddr("203.0.113.97")
	wire := netip.MustParseAddr("203.0.113.98") // another resolver gave it out for ntp.test
	web := `  - name: web
    to: [198.51.100.0/24]
    ports: [80/tcp]
  - name: named
    to: [ntp.test]
    ports: [123/udp]
`
	rec, r := reloadRun(t, fmt.Sprintf(ntpPolicy, policy.ModeAudit, ntpRule+web), []netip.Addr{ntp, lab, named, wire}, factsMap{named: {"ntp.test"}}, func(p *pcapWriter) {
		p.udp(false, netip.MustParseAddr("192.0.2.53"), netip.MustParseAddr("192.0.2.95"), 53, 40199, dnsResponseTTL(t, "ntp.test", []netip.Addr{wire}, 3600))
		c := &tcpConn{p: p, cli: netip.MustParseAddr("192.0.2.95"), srv: netip.MustParseAddr("198.51.100.96"), cport: 47400, sport: 80, cseq: 1, sseq: 1}
		c.handshake()
		c.send(true, []byte("GET / HTTP/1.1\r\nHost: 198.51.100.96\r\n\r\n"), 1400, nil, nil)
		c.send(false, []byte("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"), 1400, nil, nil)
	}, redecideTo(t, policy.ModeEnforce, web))
	for port, want := range map[uint16]string{
		40100: "capture deny no-rule enforce enforced=true policy-revoked",
		40101: "capture allow allowed audit enforced=false ",
		40102: "capture allow allowed audit enforced=false ",
		40103: "capture deny opened-before-enforce enforce enforced=true policy-revoked",
		47400: "capture deny opened-before-enforce enforce enforced=true policy-revoked",
	} {
		got := flowEvents(rec, port)
		if len(got) < 2 || got[len(got)-2] != want {
			t.Errorf("port %d: events %q, want the reload's %q", port, got, want)
		}
	}
	if d := droppedAt(r, ntp.String(), 123); d == nil || d.Flows != 1 || d.EnforcedFlows != 1 {
		t.Errorf("report: drop of the NTP flow %+v, want 1 flow, enforced", d)
	}
}

// TestRevokeWaitsForTheFlow: a cut that reaches capture before the
// flow's packets have come through the ring (a loaded box) waits for
// them, up to revokeWait, and is recorded on the flow, once: not passed
// on as the firewall's event beside capture's own record of the flow,
// allowed, which would count the flow twice.
func TestRevokeWaitsForTheFlow(t *testing.T) {
	cli := netip.MustParseAddr("192.0.2.95")
	ntp := netip.MustParseAddr("203.0.113.95")
	p := newPcap(t)
	start := p.now
	for s := range 5 {
		p.now = start.Add(time.Duration(s) * 500 * time.Millisecond)
		p.udp(true, cli, ntp, 40100, 123, make([]byte, 48))
		p.udp(false, ntp, cli, 123, 40100, make([]byte, 48))
	}
	path := p.close()
	rec := &recorder{}
	store := policy.NewStore(testEngine(t, fmt.Sprintf(ntpPolicy, policy.ModeEnforce, ntpRule)))
	ledger := audit.NewLedger(store.Load(), audit.LedgerOptions{})
	capt, err := New(Config{}, Deps{Policy: store, Sink: audit.Tee(rec, ledger)})
	if err != nil {
		t.Fatal(err)
	}
	capt.clock = func() time.Time { return start }
	done := false
	feed(t, capt, path, func(time.Time) {
		if !done {
			done = true
			store.Swap(testEngine(t, fmt.Sprintf(ntpPolicy, policy.ModeEnforce, "")))
			capt.Revoke(audit.Event{Kind: audit.KindFlow, Source: audit.SourceFirewall, Time: start,
				Client: cli, ClientPort: 40100, Dest: ntp, DestPort: 123, Proto: "udp",
				Verdict: policy.Deny, Reason: policy.ReasonNoRule, Mode: policy.ModeEnforce, Enforced: true, Close: "policy-revoked"})
		}
	})
	want := []string{
		"capture deny no-rule enforce enforced=true policy-revoked",
		"capture deny no-rule enforce enforced=true policy-revoked",
	}
	if got := flowEvents(rec, 40100); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("events\n got %q\nwant %q", got, want)
	}
	r := ledger.Report(audit.ReportOptions{})
	if r.Totals.Flows != 1 || r.Totals.Dropped != 1 {
		t.Errorf("report totals %+v, want the one flow, dropped", r.Totals)
	}
}

// TestRedecideUndecidedUDPAuditToEnforce: a UDP flow that opened in audit
// mode but was not decided yet at the reload to enforce (one datagram,
// no answer: capture decides such a flow at its seventh packet or at its
// end) meets the forward chain as the decided ones do: its next datagrams
// pass only where a CIDR rule or a learned set the enforce ruleset began
// with (the forwarder's answers: seeded) admits its address. One whose
// address only an answer seen on the wire gave out is dropped, and
// capture must say so (opened-before-enforce), not credit the new rule.
// Before, it was decided at its end as a new enforce flow, by the wire
// answer, and reported allowed while nftables dropped every datagram after
// the reload (found by the day-two walkthrough: a rule --suggest proposed
// for a UDP port, added with the switch to enforce).
func TestRedecideUndecidedUDPAuditToEnforce(t *testing.T) {
	const pol = `version: 1
mode: %s
rules:
  - name: lab
    to: [198.51.100.0/24]
    ports: [any]
%s`
	const named = `  - name: named
    to: [tracker.test]
    ports: [7777/udp]
`
	cli := netip.MustParseAddr("192.0.2.95")
	wire := netip.MustParseAddr("203.0.113.98")  // another resolver's answer, seen on the wire
	given := netip.MustParseAddr("203.0.113.97") // egressd's forwarder gave it out
	lab := netip.MustParseAddr("198.51.100.99")  // a CIDR rule's
	p := newPcap(t)
	p.udp(false, netip.MustParseAddr("192.0.2.53"), cli, 53, 40199, dnsResponseTTL(t, "tracker.test", []netip.Addr{wire}, 3600))
	for i, dst := range []netip.Addr{wire, given, lab} {
		p.udp(true, cli, dst, uint16(40300+i), 7777, []byte("before"))
	}
	p.now = p.now.Add(2 * time.Second)
	reload := p.now
	p.now = p.now.Add(2 * time.Second)
	for i, dst := range []netip.Addr{wire, given, lab} {
		p.udp(true, cli, dst, uint16(40300+i), 7777, []byte("after"))
	}
	path := p.close()
	rec := &recorder{}
	store := policy.NewStore(testEngine(t, fmt.Sprintf(pol, policy.ModeAudit, "")))
	capt, err := New(Config{}, Deps{Policy: store, Sink: rec, DNS: factsMap{given: {"tracker.test"}}})
	if err != nil {
		t.Fatal(err)
	}
	swapped := false
	feed(t, capt, path, func(ts time.Time) {
		if !swapped && ts.After(reload) {
			capt.Redecide(store.Swap(testEngine(t, fmt.Sprintf(pol, policy.ModeEnforce, named))))
			swapped = true
		}
	})
	for port, want := range map[uint16]string{
		40300: "capture deny opened-before-enforce enforce enforced=true",
		40301: "capture allow allowed enforce enforced=false",
		40302: "capture allow allowed enforce enforced=false",
	} {
		got := flowEvents(rec, port)
		if len(got) == 0 || !strings.HasPrefix(got[len(got)-1], want+" ") {
			t.Errorf("port %d: events %q, want the last %q", port, got, want)
		}
	}
}

// TestRedecideAuditToEnforceCreditsWouldDeny: a UDP flow capture decided
// in audit mode as one enforce would drop (no rule for its name), still
// live at the reload to enforce whose policy adds a rule for the name
// (the operator took it from report --suggest), goes on: the enforce
// ruleset's learned sets begin with the forwarder's answers, those for
// denied names too (firewall/seed.go). Capture must credit it to the new
// rule (an event at once, allowed, mode enforce) and the ledger count it
// there, once: not as a drop with the new rule unused for as long as the
// flow lives (an NTP or VoIP exchange, days). One whose address only an
// answer seen on the wire gave out stays a drop (opened-before-enforce,
// enforced). Before, the would-deny record stayed to the flow's end.
func TestRedecideAuditToEnforceCreditsWouldDeny(t *testing.T) {
	named := netip.MustParseAddr("203.0.113.97") // the forwarder gave it out for ntp.test
	wire := netip.MustParseAddr("203.0.113.98")  // another resolver gave it out for ntp.test
	const namedRule = `  - name: named
    to: [ntp.test]
    ports: [123/udp]
`
	rec, r := reloadRun(t, fmt.Sprintf(ntpPolicy, policy.ModeAudit, ""), []netip.Addr{named, wire}, factsMap{named: {"ntp.test"}}, func(p *pcapWriter) {
		p.udp(false, netip.MustParseAddr("192.0.2.53"), netip.MustParseAddr("192.0.2.95"), 53, 40199, dnsResponseTTL(t, "ntp.test", []netip.Addr{wire}, 3600))
	}, redecideTo(t, policy.ModeEnforce, namedRule))
	want := []string{
		"capture deny no-rule audit enforced=false ",
		"capture allow allowed enforce enforced=false ",
		"capture allow allowed enforce enforced=false end-of-capture",
	}
	if got := flowEvents(rec, 40100); fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("events of the named flow\n got %q\nwant %q", got, want)
	}
	for _, ev := range rec.all() {
		if ev.Kind == audit.KindFlow && ev.ClientPort == 40100 && ev.Verdict == policy.Allow && ev.Rule != "named" {
			t.Errorf("named flow credited to rule %q, want named", ev.Rule)
		}
	}
	if got := flowEvents(rec, 40101); len(got) < 2 || got[len(got)-2] != "capture deny opened-before-enforce enforce enforced=true policy-revoked" {
		t.Errorf("events of the wire-answered flow %q, want it dropped as opened-before-enforce", got)
	}
	if d := droppedAt(r, "ntp.test", 123); d == nil || d.Flows != 1 || d.EnforcedFlows != 1 {
		t.Errorf("report: drop of ntp.test %+v, want the wire-answered flow alone, enforced", d)
	}
	var used uint64
	for _, rr := range r.Rules {
		if rr.Name == "named" {
			used = rr.Flows
		}
	}
	// The third flow is the client's query to the other resolver.
	if used != 1 || r.Totals.Flows != 3 || r.Totals.Allowed != 1 || r.Totals.Dropped != 2 {
		t.Errorf("report: rule named %d flow(s), totals %+v; want 1, and 3 flows, 1 allowed, 2 dropped", used, r.Totals)
	}
}
