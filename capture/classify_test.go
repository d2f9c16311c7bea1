package capture

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/gopacket/gopacket/pcapgo"

	"egressd/audit"
	"egressd/internal/tlshello/hellotest"
	"egressd/policy"
)

// mismatchPolicy has two name rules on 443, so that "a name of the same
// rule" and "a name of another rule" differ, and a CIDR rule.
const mismatchPolicy = `version: 1
mode: %s
rules:
  - name: web
    to: ["*.allowed.test", "allowed.test"]
    ports: [443/tcp, 80/tcp]
  - name: other
    to: ["other.test"]
    ports: [443/tcp]
  - name: lab
    to: [198.51.100.0/24]
    ports: [any]
`

// TestSNIMismatch checks capture's copy of the proxy's A2 check: an
// allowed SNI (or Host) to an address that nothing gave out for a name of
// the same rule is denied as sni-mismatch, in audit and enforce mode.
func TestSNIMismatch(t *testing.T) {
	cli := netip.MustParseAddr("192.0.2.60")
	other := netip.MustParseAddr("192.0.2.61")
	resolver := netip.MustParseAddr("198.51.100.53")
	addr := func(i byte) netip.Addr { return netip.AddrFrom4([4]byte{203, 0, 113, i}) }
	facts := factsMap{
		addr(1): {"a.allowed.test"},
		addr(2): {"b.allowed.test"},
		addr(3): {"other.test"},
	}
	type want struct {
		verdict policy.Verdict
		rule    string
		reason  string
		src     audit.NameSource
	}
	allow := want{policy.Allow, "web", policy.ReasonAllowed, audit.NameSNI}
	mismatch := want{policy.Deny, "", ReasonSNIMismatch, audit.NameSNI}
	cases := []struct {
		what string
		dst  netip.Addr
		port uint16
		name string
		want want
	}{
		{"our DNS gave the address out for the name", addr(1), 443, "a.allowed.test", allow},
		{"our DNS gave it out for another name of the same rule", addr(2), 443, "a.allowed.test", allow},
		{"our DNS gave it out for a name of another rule", addr(3), 443, "a.allowed.test", mismatch},
		{"an answer on the wire, to this client", addr(4), 443, "A.Allowed.Test", allow},
		{"an answer on the wire, to another client", addr(5), 443, "a.allowed.test", allow},
		{"nothing knows the address", addr(6), 443, "a.allowed.test", mismatch},
		{"a CIDR rule allows the address itself", netip.MustParseAddr("198.51.100.7"), 443, "a.allowed.test", allow},
		{"a name no rule allows is no-rule, not a mismatch", addr(8), 443, "evil.test", want{policy.Deny, "", policy.ReasonNoRule, audit.NameSNI}},
		{"HTTP Host to an address nothing knows", addr(9), 80, "a.allowed.test", want{policy.Deny, "", ReasonSNIMismatch, audit.NameHost}},
		{"HTTP Host, vouched by our DNS", addr(1), 80, "a.allowed.test", want{policy.Allow, "web", policy.ReasonAllowed, audit.NameHost}},
		// Once every answer for the name has expired there is no evidence
		// left that the name resolves elsewhere: judged by name, as the
		// proxy's fresh lookup would most likely find the address.
		{"a wire answer older than its 30-minute floor", addr(10), 443, "a.allowed.test", allow},
		{"a name never seen answered", addr(11), 443, "b.allowed.test", allow},
	}

	p := newPcap(t)
	// DNS answers on the wire: addr(4) to this client, addr(5) to another
	// one, addr(10) to this client half an hour before its flow.
	p.udp(false, resolver, cli, 53, 5300, dnsResponse(t, "a.allowed.test", []netip.Addr{addr(4), addr(10)}))
	p.udp(false, resolver, other, 53, 5301, dnsResponse(t, "a.allowed.test", []netip.Addr{addr(5)}))
	for i, tc := range cases {
		if tc.dst == addr(10) {
			p.now = p.now.Add(31 * time.Minute)
		}
		c := &tcpConn{p: p, cli: cli, srv: tc.dst, cport: uint16(41000 + i), sport: tc.port, cseq: 1, sseq: 1}
		c.namedConn(t, tc.name)
	}
	path := p.close()
	for _, mode := range []policy.Mode{policy.ModeAudit, policy.ModeEnforce} {
		t.Run(string(mode), func(t *testing.T) {
			r := synthRun(t, path, fmt.Sprintf(mismatchPolicy, mode), facts, Config{})
			for i, tc := range cases {
				var ev *audit.Event
				for j := range r.events {
					if e := &r.events[j]; e.ClientPort == uint16(41000+i) && e.Client == cli {
						ev = e
					}
				}
				if ev == nil {
					t.Errorf("%s: no event", tc.what)
					continue
				}
				w := tc.want
				if ev.Verdict != w.verdict || ev.Rule != w.rule || ev.Reason != w.reason || ev.NameSource != w.src || ev.Mode != mode {
					t.Errorf("%s: %s %q reason %q (%s, %s), want %s %q reason %q (%s, %s)", tc.what,
						ev.Verdict, ev.Rule, ev.Reason, ev.NameSource, ev.Mode, w.verdict, w.rule, w.reason, w.src, mode)
				}
				if ev.Name != strings.ToLower(tc.name) {
					t.Errorf("%s: name %q, want %q", tc.what, ev.Name, strings.ToLower(tc.name))
				}
				if wantEnf := w.verdict == policy.Deny && mode == policy.ModeEnforce; ev.Enforced != wantEnf {
					t.Errorf("%s: enforced %v, want %v", tc.what, ev.Enforced, wantEnf)
				}
			}
		})
	}
}

// devicesMap is Devices for tests: addresses with the same device number
// are one device's.
type devicesMap map[netip.Addr]int

func (m devicesMap) SameDevice(a, b netip.Addr) bool {
	da, ok1 := m[a.Unmap()]
	db, ok2 := m[b.Unmap()]
	return a.Unmap() == b.Unmap() || ok1 && ok2 && da == db
}

// TestNoNameWireAnswerDevice: a flow without a name (bytes that are not
// TLS, a hello without SNI) to an address a DNS answer on the wire gave
// out is decided by that answer's name only when the answer went to this
// client or to another address of its device (Deps.Devices), as the proxy
// decides by what DNS gave this client's device; another device's answer
// does not allow it. A flow with the name (SNI) is vouched for by any
// client's answer, as before: it stands for the proxy's fresh lookup.
func TestNoNameWireAnswerDevice(t *testing.T) {
	cli := netip.MustParseAddr("192.0.2.60")
	sib := netip.MustParseAddr("2001:db8::60") // cli's device, over IPv6
	other := netip.MustParseAddr("192.0.2.61")
	other6 := netip.MustParseAddr("2001:db8::61")
	resolver := netip.MustParseAddr("198.51.100.53")
	// cli asks over IPv4 and gets both families' addresses.
	given4, given6 := netip.MustParseAddr("203.0.113.4"), netip.MustParseAddr("2001:db8:1::4")
	p := newPcap(t)
	p.udp(false, resolver, cli, 53, 5300, dnsResponse(t, "a.allowed.test", []netip.Addr{given4, given6}))
	cases := []struct {
		what   string
		from   netip.Addr
		hello  bool
		want   policy.Verdict
		reason string
		name   string
		src    audit.NameSource
	}{
		{"not TLS, from the client that asked", cli, false, policy.Allow, policy.ReasonAllowed, "a.allowed.test", audit.NameDNSAnswer},
		{"not TLS, from another address of its device", sib, false, policy.Allow, policy.ReasonAllowed, "a.allowed.test", audit.NameDNSAnswer},
		{"not TLS, from another device", other, false, policy.Deny, policy.ReasonNoRule, "", audit.NameNone},
		{"not TLS, from another device over IPv6", other6, false, policy.Deny, policy.ReasonNoRule, "", audit.NameNone},
		{"SNI, from another device", other, true, policy.Allow, policy.ReasonAllowed, "a.allowed.test", audit.NameSNI},
	}
	for i, tc := range cases {
		given := given4
		if tc.from.Is6() {
			given = given6
		}
		c := &tcpConn{p: p, cli: tc.from, srv: given, cport: uint16(43000 + i), sport: 443, cseq: 1, sseq: 1}
		c.handshake()
		if tc.hello {
			c.send(true, realClientHello(t, "a.allowed.test"), 1400, nil, nil)
		} else {
			c.send(true, []byte("SSH-2.0-test\r\n"), 1400, nil, nil)
		}
		c.close()
	}
	path := p.close()
	devs := devicesMap{cli: 1, sib: 1, other: 2, other6: 2}
	for _, withDevices := range []bool{true, false} {
		deps := Deps{}
		if withDevices {
			deps.Devices = devs
		}
		r := synthRunDeps(t, path, fmt.Sprintf(mismatchPolicy, "enforce"), deps, Config{})
		for i, tc := range cases {
			var ev *audit.Event
			for j := range r.events {
				if e := &r.events[j]; e.ClientPort == uint16(43000+i) && e.Kind == audit.KindFlow {
					ev = e
				}
			}
			if ev == nil {
				t.Errorf("%s: no event", tc.what)
				continue
			}
			want, reason, name, src := tc.want, tc.reason, tc.name, tc.src
			if !withDevices && tc.from == sib {
				// Without Devices each address is its own client.
				want, reason, name, src = policy.Deny, policy.ReasonNoRule, "", audit.NameNone
			}
			if ev.Verdict != want || ev.Reason != reason || ev.Name != name || ev.NameSource != src {
				t.Errorf("%s (devices %v): %s %q name %q (%s), want %s %q name %q (%s)", tc.what, withDevices,
					ev.Verdict, ev.Reason, ev.Name, ev.NameSource, want, reason, name, src)
			}
		}
	}
}

// TestSNIMismatchSharedAddress: a CDN address serves many names, and DNS
// answers for several of them give it out. An allowed name whose answer
// capture saw, to this client, is not a mismatch because the client then
// resolved more names to the same address before it connected.
func TestSNIMismatchSharedAddress(t *testing.T) {
	cli := netip.MustParseAddr("192.0.2.60")
	resolver := netip.MustParseAddr("198.51.100.53")
	cdn := netip.MustParseAddr("203.0.113.20")
	p := newPcap(t)
	p.udp(false, resolver, cli, 53, 5300, dnsResponse(t, "a.allowed.test", []netip.Addr{cdn}))
	for i := range 6 {
		p.udp(false, resolver, cli, 53, uint16(5301+i), dnsResponse(t, fmt.Sprintf("site%d.cdn-customer.test", i), []netip.Addr{cdn}))
	}
	c := &tcpConn{p: p, cli: cli, srv: cdn, cport: 41000, sport: 443, cseq: 1, sseq: 1}
	c.handshake()
	c.send(true, handHello(sniExt("a.allowed.test")), 1400, nil, nil)
	c.close()
	r := synthRun(t, p.close(), fmt.Sprintf(mismatchPolicy, policy.ModeAudit), nil, Config{})
	for _, ev := range r.events {
		if ev.ClientPort == 41000 && (ev.Verdict != policy.Allow || ev.Rule != "web") {
			t.Errorf("a.allowed.test to the address its answer gave: %s %q reason %q, want allowed by web", ev.Verdict, ev.Rule, ev.Reason)
		}
	}
}

// feed runs a capture file through c's pipeline frame by frame, calling
// before with each frame's time ahead of it, then ends every flow.
func feed(t *testing.T, c *Capture, path string, before func(ts time.Time)) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	r, err := pcapgo.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	for {
		data, ci, err := r.ReadPacketData()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		before(ci.Timestamp)
		c.proc.packetLen(data, ci.Length, ci.Timestamp, r.LinkType())
	}
	c.proc.flush("end-of-capture")
}

// TestVerdictAtClassification reloads the policy while flows are open:
// each keeps the verdict of the moment its name was read, not the one in
// force when it ends (a connection no rule allowed when it opened is not
// credited to a rule added later, and the other way round).
func TestVerdictAtClassification(t *testing.T) {
	const base = `version: 1
mode: audit
rules:
  - name: web
    to: ["*.allowed.test"]
    ports: [443/tcp]
`
	const withNew = base + `  - name: new
    to: ["tracker.test"]
    ports: [443/tcp]
`
	cli := netip.MustParseAddr("192.0.2.70")
	srv := netip.MustParseAddr("203.0.113.70")
	facts := factsMap{srv: {"tracker.test"}}
	cases := []struct {
		what       string
		start, end string // policy at the hello, policy from just after it
		verdict    policy.Verdict
		rule       string
	}{
		{"rule added while open", base, withNew, policy.Deny, ""},
		{"rule removed while open", withNew, base, policy.Allow, "new"},
	}
	for _, tc := range cases {
		t.Run(tc.what, func(t *testing.T) {
			p := newPcap(t)
			c := &tcpConn{p: p, cli: cli, srv: srv, cport: 42000, sport: 443, cseq: 1, sseq: 1}
			c.handshake()
			c.send(true, realClientHello(t, "tracker.test"), 1400, nil, nil)
			reload := p.now
			for i := 0; i < 5; i++ {
				p.now = p.now.Add(2 * time.Second)
				c.send(false, []byte("server data"), 1400, nil, nil)
				c.send(true, []byte("client data"), 1400, nil, nil)
			}
			c.close()
			path := p.close()

			rec := &recorder{}
			store := policy.NewStore(testEngine(t, tc.start))
			capt, err := New(Config{}, Deps{Policy: store, Sink: rec, DNS: facts})
			if err != nil {
				t.Fatal(err)
			}
			swapped := false
			feed(t, capt, path, func(ts time.Time) {
				if !swapped && ts.After(reload) {
					store.Swap(testEngine(t, tc.end))
					swapped = true
				}
			})
			evs := rec.all()
			if !swapped || len(evs) != 1 {
				t.Fatalf("swapped %v, events %+v", swapped, evs)
			}
			ev := evs[0]
			if ev.Verdict != tc.verdict || ev.Rule != tc.rule || ev.Name != "tracker.test" || ev.Close != "fin" || ev.BytesIn != 5*11 {
				t.Errorf("event %+v, want %s %q", ev, tc.verdict, tc.rule)
			}
		})
	}
}

// A flow whose client stays silent longer than classifyWait after the
// handshake is decided then, on its address, as the proxy decides on
// what it has when its hello timeout passes; a hello sent later does not
// change the verdict.
func TestClassifyWaitBound(t *testing.T) {
	cli := netip.MustParseAddr("192.0.2.71")
	srv := netip.MustParseAddr("203.0.113.71")
	p := newPcap(t)
	c := &tcpConn{p: p, cli: cli, srv: srv, cport: 42001, sport: 443, cseq: 1, sseq: 1}
	// A handshake that takes 14 s (SYN retries) does not count: the wait
	// starts when the client completes it.
	c.seg(true, "S", c.cseq, nil)
	p.now = p.now.Add(14 * time.Second)
	c.seg(true, "S", c.cseq, nil)
	c.seg(false, "SA", c.sseq, nil)
	c.cseq++
	c.sseq++
	c.seg(true, "A", c.cseq, nil)
	p.now = p.now.Add(5 * time.Second)
	hello := realClientHello(t, "late.allowed.test")
	c.send(true, hello, 1400, nil, nil) // in time: named
	c.close()

	c = &tcpConn{p: p, cli: cli, srv: srv, cport: 42002, sport: 443, cseq: 1, sseq: 1}
	c.handshake()
	p.now = p.now.Add(classifyWait + time.Second)
	c.send(true, hello, 1400, nil, nil) // too late
	c.close()
	facts := factsMap{srv: {"late.allowed.test"}}
	r := synthRun(t, p.close(), testPolicy, facts, Config{})
	got := map[uint16]audit.Event{}
	for _, ev := range r.events {
		got[ev.ClientPort] = ev
	}
	if ev := got[42001]; ev.NameSource != audit.NameSNI || ev.Name != "late.allowed.test" || ev.Verdict != policy.Allow {
		t.Errorf("hello 5 s after a slow handshake: %+v", ev)
	}
	// Decided by address at the wait: named by our DNS, not by the hello.
	if ev := got[42002]; ev.NameSource != audit.NameDNSLearned || ev.Verdict != policy.Allow {
		t.Errorf("hello after the wait: %+v", ev)
	}
}

// TestOpenFlowReport: a flow still open ReportOpenAfter after it started
// is reported then and updated when it ends; a real ledger counts it once,
// with its final bytes. A short flow gets one event.
func TestOpenFlowReport(t *testing.T) {
	cli := netip.MustParseAddr("192.0.2.72")
	srv := netip.MustParseAddr("203.0.113.72")
	p := newPcap(t)
	long := &tcpConn{p: p, cli: cli, srv: srv, cport: 43000, sport: 443, cseq: 1, sseq: 1}
	long.handshake()
	long.send(true, realClientHello(t, "push.allowed.test"), 1400, nil, nil)
	for i := 0; i < 30; i++ { // 5 minutes of keep-alives, 10 s apart
		p.now = p.now.Add(10 * time.Second)
		long.send(false, []byte("ping"), 1400, nil, nil)
		long.send(true, []byte("pong"), 1400, nil, nil)
	}
	short := &tcpConn{p: p, cli: cli, srv: srv, cport: 43001, sport: 443, cseq: 1, sseq: 1}
	short.handshake()
	short.send(true, realClientHello(t, "push.allowed.test"), 1400, nil, nil)
	short.close()
	long.close()
	path := p.close()

	eng := testEngine(t, testPolicy)
	rec := &recorder{}
	ledger := audit.NewLedger(eng, audit.LedgerOptions{})
	capt, err := New(Config{}, Deps{Policy: policy.NewStore(eng), Sink: audit.Tee(rec, ledger), DNS: factsMap{srv: {"push.allowed.test"}}})
	if err != nil {
		t.Fatal(err)
	}
	capt.proc.openReport = time.Minute // what Run sets from Config.ReportOpenAfter
	if _, err := capt.ReadFile(context.Background(), path, nil); err != nil {
		t.Fatal(err)
	}
	var longEvs []audit.Event
	shortEvs := 0
	for _, ev := range rec.all() {
		switch ev.ClientPort {
		case 43000:
			longEvs = append(longEvs, ev)
		case 43001:
			shortEvs++
		}
	}
	if shortEvs != 1 || len(longEvs) != 2 {
		t.Fatalf("short flow: %d events, want 1; long flow: %d, want 2: %+v", shortEvs, len(longEvs), longEvs)
	}
	open, final := longEvs[0], longEvs[1]
	if open.Close != "" || final.Close != "fin" || !open.Time.Equal(final.Time) || open.Verdict != policy.Allow || final.Verdict != policy.Allow || open.Rule != "web" || final.Rule != "web" {
		t.Errorf("open report %+v, final %+v", open, final)
	}
	if open.Duration < 50 || open.Duration > 70 || open.BytesIn >= final.BytesIn || final.BytesIn != 30*4 {
		t.Errorf("open report at %.0f s with %d bytes in, final %d bytes in", open.Duration, open.BytesIn, final.BytesIn)
	}
	if s := capt.Stats(); s.Flows != 2 || s.Updates != 1 {
		t.Errorf("stats: %d flows, %d updates, want 2 and 1", s.Flows, s.Updates)
	}
	rep := ledger.Report(audit.ReportOptions{})
	if rep.Totals.Flows != 2 || rep.Totals.Duplicates != 1 {
		t.Errorf("ledger totals %+v, want 2 flows and 1 duplicate", rep.Totals)
	}
	for _, rr := range rep.Rules {
		// The short flow has no bytes in: the rule's are the long flow's.
		if rr.Name == "web" && (rr.Flows != 2 || rr.BytesIn != final.BytesIn) {
			t.Errorf("rule web: %d flows, %d bytes in", rr.Flows, rr.BytesIn)
		}
	}
}

// handHello builds a TLS record holding a minimal ClientHello with the
// given extensions (type, data).
func handHello(exts ...[]byte) []byte {
	var ext []byte
	for _, e := range exts {
		ext = append(ext, e...)
	}
	body := []byte{3, 3}
	body = append(body, make([]byte, 32)...) // random
	body = append(body, 0)                   // session id
	body = append(body, 0, 2, 0x13, 0x01)    // cipher suites
	body = append(body, 1, 0)                // compression
	body = append(body, byte(len(ext)>>8), byte(len(ext)))
	body = append(body, ext...)
	hs := append([]byte{1, 0, byte(len(body) >> 8), byte(len(body))}, body...)
	return append([]byte{22, 3, 1, byte(len(hs) >> 8), byte(len(hs))}, hs...)
}

// sniExt is a server_name extension listing names as host_name entries.
var sniExt = hellotest.SNIExt

// TestProxyHelloReasons: hellos the proxy refuses before any rule is
// asked are denied by capture with the proxy's reason, even where the name
// read would be allowed and vouched for.
func TestProxyHelloReasons(t *testing.T) {
	cli := netip.MustParseAddr("192.0.2.80")
	srv := netip.MustParseAddr("203.0.113.80")
	good := handHello(sniExt("a.allowed.test"))
	bad := handHello(sniExt("a.allowed.test"))
	bad[len(bad)-len(sniExt("a.allowed.test"))+3]++ // the extension claims one byte more than there is
	cases := []struct {
		what   string
		write  func(c *tcpConn)
		reason string
		name   string
	}{
		{"a well-formed hello (control)", func(c *tcpConn) { c.send(true, good, 1400, nil, nil) }, policy.ReasonAllowed, "a.allowed.test"},
		{"two server_name extensions", func(c *tcpConn) {
			c.send(true, handHello(sniExt("a.allowed.test"), sniExt("evil.test")), 1400, nil, nil)
		}, ReasonDuplicateSNI, ""},
		{"two host names in one extension", func(c *tcpConn) {
			c.send(true, handHello(sniExt("a.allowed.test", "evil.test")), 1400, nil, nil)
		}, ReasonDuplicateSNI, ""},
		{"a malformed extension", func(c *tcpConn) { c.send(true, bad, 1400, nil, nil) }, ReasonHelloBad, ""},
		// crypto/tls refuses an empty host_name and one with a trailing
		// dot (README, Security: "Empty server_name, trailing dot").
		{"an empty host_name", func(c *tcpConn) { c.send(true, handHello(sniExt("")), 1400, nil, nil) }, ReasonHelloBad, ""},
		{"a host_name with a trailing dot", func(c *tcpConn) {
			c.send(true, handHello(sniExt("a.allowed.test.")), 1400, nil, nil)
		}, ReasonHelloBad, "a.allowed.test."},
		{"a hello begun and not finished within the wait", func(c *tcpConn) {
			c.send(true, good[:20], 1400, nil, nil)
			c.p.now = c.p.now.Add(classifyWait + time.Second)
			c.send(true, good[20:], 1400, nil, nil)
		}, ReasonHelloTimeout, ""},
	}
	p := newPcap(t)
	for i, tc := range cases {
		c := &tcpConn{p: p, cli: cli, srv: srv, cport: uint16(44000 + i), sport: 443, cseq: 1, sseq: 1}
		c.handshake()
		tc.write(c)
		c.close()
	}
	r := synthRun(t, p.close(), testPolicy, factsMap{srv: {"a.allowed.test"}}, Config{})
	got := map[uint16]audit.Event{}
	for _, ev := range r.events {
		got[ev.ClientPort] = ev
	}
	for i, tc := range cases {
		ev, ok := got[uint16(44000+i)]
		wantVerdict := policy.Deny
		if tc.reason == policy.ReasonAllowed {
			wantVerdict = policy.Allow
		}
		if !ok || ev.Reason != tc.reason || ev.Verdict != wantVerdict || ev.Name != tc.name {
			t.Errorf("%s: %+v, want %s %q name %q", tc.what, ev, wantVerdict, tc.reason, tc.name)
		}
	}
}

// TestProxyHTTPReasons: the first request head of a plain HTTP flow is
// judged as the proxy judges it in enforce mode (proxy/httphead.go
// looksHTTP, httpwire.ParseHead, decideHTTP): read as HTTP whatever its
// method, named by what the proxy reads, and refused with the proxy's
// reason where the proxy refuses it. The address is our DNS's answer for
// a.allowed.test, so a flow capture did not read as HTTP is allowed by
// address.
func TestProxyHTTPReasons(t *testing.T) {
	cli := netip.MustParseAddr("192.0.2.81")
	srv := netip.MustParseAddr("203.0.113.81")
	cases := []struct {
		what   string
		head   string
		reason string
		name   string
	}{
		{"a GET (control)", "GET / HTTP/1.1\r\nHost: a.allowed.test\r\n\r\n", policy.ReasonAllowed, "a.allowed.test"},
		{"a method outside the common list", "PROPFIND /dav/ HTTP/1.1\r\nHost: evil.test\r\n\r\n", policy.ReasonNoRule, "evil.test"},
		{"a method outside the list, absolute form", "MKCOL http://evil.test/x HTTP/1.1\r\nHost: evil.test\r\n\r\n", policy.ReasonNoRule, "evil.test"},
		// The absolute-form target names the destination, and must agree
		// with Host (THREATS.md A1, C6).
		{"absolute form agreeing with Host (control)", "GET http://A.allowed.test./x HTTP/1.1\r\nHost: a.allowed.test:80\r\n\r\n", policy.ReasonAllowed, "a.allowed.test"},
		{"absolute form without Host", "GET http://evil.test/ HTTP/1.1\r\n\r\n", policy.ReasonNoRule, "evil.test"},
		{"absolute form and Host disagree", "GET http://evil.test/ HTTP/1.1\r\nHost: a.allowed.test\r\n\r\n", ReasonHostMismatch, ""},
		{"absolute form and Host disagree the other way", "GET http://a.allowed.test/ HTTP/1.1\r\nHost: evil.test\r\n\r\n", ReasonHostMismatch, ""},
		{"absolute form and Host ports disagree", "GET http://a.allowed.test:8080/ HTTP/1.1\r\nHost: a.allowed.test:80\r\n\r\n", ReasonHostMismatch, ""},
		{"two Host headers", "GET / HTTP/1.1\r\nHost: a.allowed.test\r\nhost: evil.test\r\n\r\n", ReasonHTTPBad, ""},
		{"userinfo in Host", "GET / HTTP/1.1\r\nHost: a.allowed.test@evil.test\r\n\r\n", ReasonHTTPBad, ""},
		{"userinfo in the absolute form", "GET http://a.allowed.test@evil.test/ HTTP/1.1\r\n\r\n", ReasonHTTPBad, ""},
		{"an empty Host", "GET / HTTP/1.1\r\nHost: \r\n\r\n", ReasonHTTPBad, ""},
		{"another scheme", "GET https://a.allowed.test/ HTTP/1.1\r\nHost: a.allowed.test\r\n\r\n", ReasonHTTPBad, ""},
		{"bare LF line ends", "GET / HTTP/1.1\nHost: a.allowed.test\n\n", ReasonHTTPBad, ""},
		{"CONNECT on the transparent path", "CONNECT a.allowed.test:443 HTTP/1.1\r\nHost: a.allowed.test:443\r\n\r\n", ReasonHTTPBad, ""},
		// The proxy's other refusals of a head: its syntax and ambiguous
		// body framing (THREATS.md C6), whatever the host it names.
		{"a body with Content-Length (control)", "POST /x?q HTTP/1.1\r\nHost: a.allowed.test\r\nContent-Length: 3\r\n\r\nabc", policy.ReasonAllowed, "a.allowed.test"},
		{"Content-Length and Transfer-Encoding", "POST / HTTP/1.1\r\nHost: a.allowed.test\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", ReasonHTTPFraming, ""},
		{"two Content-Lengths that differ", "POST / HTTP/1.1\r\nHost: a.allowed.test\r\nContent-Length: 0\r\nContent-Length: 40\r\n\r\n", ReasonHTTPFraming, ""},
		{"a Transfer-Encoding other than chunked", "POST / HTTP/1.1\r\nHost: a.allowed.test\r\nTransfer-Encoding: gzip\r\n\r\n", ReasonHTTPFraming, ""},
		{"obs-fold", "GET / HTTP/1.1\r\nHost: a.allowed.test\r\nX: y\r\n z\r\n\r\n", ReasonHTTPBad, ""},
		{"a bare CR in a value", "GET / HTTP/1.1\r\nHost: a.allowed.test\r\nX: a\rb\r\n\r\n", ReasonHTTPBad, ""},
		{"a bare LF inside a CRLF head", "GET / HTTP/1.1\nHost: a.allowed.test\r\n\r\n", ReasonHTTPBad, ""},
		{"HTTP/2.0 in the request line", "GET / HTTP/2.0\r\nHost: a.allowed.test\r\n\r\n", ReasonHTTPBad, ""},
		{"a space before the colon", "GET / HTTP/1.1\r\nHost : a.allowed.test\r\n\r\n", ReasonHTTPBad, ""},
		// The proxy reads a head up to its cap (HelloMaxBytes, 64 KiB
		// by default) and judges it whole: a line after 16 KiB counts.
		{"a Host after 16 KiB of header lines", "GET / HTTP/1.1\r\n" + padHeaders(17<<10) + "Host: evil.test\r\n\r\n", policy.ReasonNoRule, "evil.test"},
		{"obs-fold after 16 KiB of header lines", "GET / HTTP/1.1\r\nHost: a.allowed.test\r\n" + padHeaders(17<<10) + "X: y\r\n z\r\n\r\n", ReasonHTTPBad, ""},
		{"a head over the proxy's cap", "GET / HTTP/1.1\r\nHost: a.allowed.test\r\n" + padHeaders(64<<10) + "\r\n", ReasonHelloTooLarge, ""},
		{"a head of 60 KiB (control)", "GET / HTTP/1.1\r\nHost: evil.test\r\n" + padHeaders(60<<10) + "\r\n", policy.ReasonNoRule, "evil.test"},
		// A head the client ends before it is complete: the proxy's head
		// reader refuses it.
		{"an incomplete head the client closes", "GET / HTTP/1.1\r\nHost: a.allowed.test\r\nX-Partial: a", ReasonHTTPBad, ""},
	}
	p := newPcap(t)
	for i, tc := range cases {
		c := &tcpConn{p: p, cli: cli, srv: srv, cport: uint16(45000 + i), sport: 80, cseq: 1, sseq: 1}
		c.handshake()
		c.send(true, []byte(tc.head), 1400, nil, nil)
		c.close()
	}
	// A head the client resets before it is complete: the proxy's read
	// fails, and it refuses the head the same way.
	rst := &tcpConn{p: p, cli: cli, srv: srv, cport: 45900, sport: 80, cseq: 1, sseq: 1}
	rst.handshake()
	rst.send(true, []byte("GET / HTTP/1.1\r\nHost: a.allowed.test\r\nX-Partial: a"), 1400, nil, nil)
	rst.seg(true, "RA", rst.cseq, nil)
	r := synthRun(t, p.close(), testPolicy, factsMap{srv: {"a.allowed.test"}}, Config{})
	got := map[uint16]audit.Event{}
	for _, ev := range r.events {
		got[ev.ClientPort] = ev
	}
	if ev := got[45900]; ev.Reason != ReasonHTTPBad || ev.Verdict != policy.Deny {
		t.Errorf("an incomplete head the client resets: %+v, want deny %s", ev, ReasonHTTPBad)
	}
	for i, tc := range cases {
		ev, ok := got[uint16(45000+i)]
		wantVerdict, wantSrc := policy.Deny, audit.NameHost
		if tc.reason == policy.ReasonAllowed {
			wantVerdict = policy.Allow
		}
		if tc.name == "" {
			wantSrc = audit.NameNone
		}
		if !ok || ev.Reason != tc.reason || ev.Verdict != wantVerdict || ev.Name != tc.name || ev.NameSource != wantSrc {
			t.Errorf("%s: %+v, want %s %q name %q (%s)", tc.what, ev, wantVerdict, tc.reason, tc.name, wantSrc)
		}
	}
}

// padHeaders returns header lines of at least n bytes in all.
func padHeaders(n int) string {
	line := "X-Pad: " + strings.Repeat("a", 100) + "\r\n"
	return strings.Repeat(line, n/len(line)+1)
}

// TestReasonsAreTheProxys: each reason capture gives is the proxy's string
// of the same name, so that the ledger and the reports see one reason
// whichever component reported a flow. Capture may not import the proxy,
// so the test reads the proxy's constants from its source.
func TestReasonsAreTheProxys(t *testing.T) {
	ours := map[string]string{
		"ReasonSNIMismatch":   ReasonSNIMismatch,
		"ReasonHelloTimeout":  ReasonHelloTimeout,
		"ReasonDuplicateSNI":  ReasonDuplicateSNI,
		"ReasonHelloBad":      ReasonHelloBad,
		"ReasonHelloTooLarge": ReasonHelloTooLarge,
		"ReasonHTTPBad":       ReasonHTTPBad,
		"ReasonHostMismatch":  ReasonHostMismatch,
		"ReasonHTTPFraming":   ReasonHTTPFraming,
		"ReasonPathForm":      ReasonPathForm,
	}
	f, err := parser.ParseFile(token.NewFileSet(), filepath.Join("..", "proxy", "decide.go"), nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	theirs := map[string]string{}
	for _, d := range f.Decls {
		g, ok := d.(*ast.GenDecl)
		if !ok || g.Tok != token.CONST {
			continue
		}
		for _, spec := range g.Specs {
			vs := spec.(*ast.ValueSpec)
			for i, n := range vs.Names {
				if i < len(vs.Values) {
					switch v := vs.Values[i].(type) {
					case *ast.BasicLit:
						if v.Kind == token.STRING {
							theirs[n.Name], _ = strconv.Unquote(v.Value)
						}
					case *ast.SelectorExpr:
						// One reason both packages take from policy.
						if x, ok := v.X.(*ast.Ident); ok && x.Name == "policy" && v.Sel.Name == "ReasonPathForm" {
							theirs[n.Name] = policy.ReasonPathForm
						}
					}
				}
			}
		}
	}
	for name, v := range ours {
		if p, ok := theirs[name]; !ok || p != v {
			t.Errorf("%s: capture %q, proxy/decide.go %q (found %v)", name, v, p, ok)
		}
	}
}

// tlsExt is a TLS extension: type, length, data.
func tlsExt(typ uint16, data []byte) []byte {
	return append([]byte{byte(typ >> 8), byte(typ), byte(len(data) >> 8), byte(len(data))}, data...)
}

// helloBody builds a TLS record (version 3.1) holding a ClientHello with
// the given cipher suites, extension block and bytes after it.
func helloBody(suites, exts, after []byte) []byte {
	body := []byte{3, 3}
	body = append(body, make([]byte, 32)...) // random
	body = append(body, 0)                   // session id
	body = append(body, byte(len(suites)>>8), byte(len(suites)))
	body = append(body, suites...)
	body = append(body, 1, 0) // compression
	body = append(body, byte(len(exts)>>8), byte(len(exts)))
	body = append(body, exts...)
	body = append(body, after...)
	hs := append([]byte{1, 0, byte(len(body) >> 8), byte(len(body))}, body...)
	return append([]byte{22, 3, 1, byte(len(hs) >> 8), byte(len(hs))}, hs...)
}

// cryptoTLSHello reports whether crypto/tls, as a server, takes the
// ClientHello at the start of b (reaches GetConfigForClient, where the
// proxy's readClientHelloTLS stops), and the server name it read; more
// reports that it ran out of bytes first.
func cryptoTLSHello(b []byte) (sni string, ok, more bool) {
	errStop := errors.New("stop")
	cfg := &tls.Config{GetConfigForClient: func(info *tls.ClientHelloInfo) (*tls.Config, error) {
		sni, ok = info.ServerName, true
		return nil, errStop
	}}
	err := tls.Server(readOnlyConn{bytes.NewReader(b)}, cfg).Handshake()
	return sni, ok, !ok && (errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF))
}

// readOnlyConn is a net.Conn that reads from r and discards writes.
type readOnlyConn struct{ r io.Reader }

func (c readOnlyConn) Read(p []byte) (int, error)     { return c.r.Read(p) }
func (readOnlyConn) Write(p []byte) (int, error)      { return len(p), nil }
func (readOnlyConn) Close() error                     { return nil }
func (readOnlyConn) LocalAddr() net.Addr              { return &net.TCPAddr{} }
func (readOnlyConn) RemoteAddr() net.Addr             { return &net.TCPAddr{} }
func (readOnlyConn) SetDeadline(time.Time) error      { return nil }
func (readOnlyConn) SetReadDeadline(time.Time) error  { return nil }
func (readOnlyConn) SetWriteDeadline(time.Time) error { return nil }

// TestHelloStrictAsCryptoTLS: a ClientHello crypto/tls refuses (and so
// the proxy, with hello-malformed, or duplicate-sni when it names two
// servers) is denied by capture with the same reason; one crypto/tls takes
// is judged by its name. Each case is first checked against crypto/tls
// itself.
func TestHelloStrictAsCryptoTLS(t *testing.T) {
	cli := netip.MustParseAddr("192.0.2.82")
	srv := netip.MustParseAddr("203.0.113.82")
	sni := sniExt("a.allowed.test")
	suites := []byte{0x13, 0x01}
	alpn := tlsExt(16, []byte{0, 3, 2, 'h', '2'})
	groups := tlsExt(10, []byte{0, 2, 0, 29})
	psk := tlsExt(41, []byte{0, 7, 0, 1, 'x', 0, 0, 0, 0, 0, 2, 1, 'b'})
	cat := func(bs ...[]byte) []byte { return bytes.Join(bs, nil) }
	big := helloBody(suites, cat(sni, tlsExt(21, make([]byte, 16500))), nil) // one record over 16384 bytes
	oldVersion := helloBody(suites, sni, nil)
	oldVersion[1], oldVersion[2] = 0, 2 // record version 0.2: crypto/tls takes anything below 16.0
	cases := []struct {
		what   string
		hello  []byte
		reason string
	}{
		{"a well-formed hello (control)", helloBody(suites, cat(sni, alpn, groups, tlsExt(0x0a0a, nil), tlsExt(0x1a1a, []byte{0}), psk), nil), policy.ReasonAllowed},
		{"a record version below 3.0", oldVersion, policy.ReasonAllowed},
		{"ALPN twice", helloBody(suites, cat(sni, alpn, alpn), nil), ReasonHelloBad},
		{"an unknown extension twice", helloBody(suites, cat(sni, tlsExt(0x1234, nil), tlsExt(0x1234, []byte{1})), nil), ReasonHelloBad},
		{"two server names and another fault", helloBody(suites, cat(sni, alpn, alpn, sniExt("evil.test")), nil), ReasonDuplicateSNI},
		{"an odd cipher suites length", helloBody([]byte{0x13, 0x01, 0x13}, sni, nil), ReasonHelloBad},
		{"bytes after the extensions", helloBody(suites, sni, []byte{0}), ReasonHelloBad},
		{"an empty ALPN name", helloBody(suites, cat(sni, tlsExt(16, []byte{0, 1, 0})), nil), ReasonHelloBad},
		{"an empty supported_groups", helloBody(suites, cat(sni, tlsExt(10, []byte{0, 0})), nil), ReasonHelloBad},
		{"extended_master_secret with a body", helloBody(suites, cat(sni, tlsExt(23, []byte{0})), nil), ReasonHelloBad},
		{"pre_shared_key not last", helloBody(suites, cat(sni, psk, alpn), nil), ReasonHelloBad},
		{"an empty key_exchange", helloBody(suites, cat(sni, tlsExt(51, []byte{0, 4, 0, 29, 0, 0})), nil), ReasonHelloBad},
		{"an ECH extension of unknown type", helloBody(suites, cat(sni, tlsExt(0xfe0d, []byte{5})), nil), ReasonHelloBad},
		{"an outer ECH extension cut short", helloBody(suites, cat(sni, tlsExt(0xfe0d, []byte{0, 0, 1, 0, 1, 7, 0})), nil), ReasonHelloBad},
		{"server_name with bytes after its list", helloBody(suites, tlsExt(0, []byte{0, 4, 0, 0, 1, 'x', 9}), nil), ReasonHelloBad},
		{"an empty server_name list", helloBody(suites, tlsExt(0, []byte{0, 0}), nil), ReasonHelloBad},
		{"an empty name of another type", helloBody(suites, tlsExt(0, []byte{0, 3, 1, 0, 0}), nil), ReasonHelloBad},
		{"a record over 16384 bytes", big, ReasonHelloBad},
	}
	p := newPcap(t)
	for i, tc := range cases {
		_, ok, more := cryptoTLSHello(tc.hello)
		if more || ok != (tc.reason == policy.ReasonAllowed) {
			t.Fatalf("%s: crypto/tls takes it: %v (more %v): the case is wrong", tc.what, ok, more)
		}
		c := &tcpConn{p: p, cli: cli, srv: srv, cport: uint16(46000 + i), sport: 443, cseq: 1, sseq: 1}
		c.handshake()
		c.send(true, tc.hello, 1400, nil, nil)
		c.close()
	}
	r := synthRun(t, p.close(), testPolicy, factsMap{srv: {"a.allowed.test"}}, Config{})
	got := map[uint16]audit.Event{}
	for _, ev := range r.events {
		got[ev.ClientPort] = ev
	}
	for i, tc := range cases {
		ev, ok := got[uint16(46000+i)]
		if !ok || ev.Reason != tc.reason {
			t.Errorf("%s: %+v, want %q", tc.what, ev, tc.reason)
		}
	}
}

// TestHTTPPathRules: a plain HTTP flow is decided with the path of its
// request, as the proxy's decideHTTP decides it (without the query), so a
// host/path rule allows only the paths it names (DESIGN.md: host/path
// rules match HTTP requests by host and path).
func TestHTTPPathRules(t *testing.T) {
	const pol = `version: 1
mode: audit
rules:
  - name: api
    to: ["pathhost.test/api/*"]
    ports: [80/tcp]
`
	cli := netip.MustParseAddr("192.0.2.83")
	srv := netip.MustParseAddr("203.0.113.83")
	cases := []struct {
		what   string
		head   string
		reason string
		path   string
	}{
		{"a path the rule names", "GET /api/v1 HTTP/1.1\r\nHost: pathhost.test\r\n\r\n", policy.ReasonAllowed, "/api/v1"},
		{"the query is not part of the path", "GET /api/v1?next=/admin HTTP/1.1\r\nHost: pathhost.test\r\n\r\n", policy.ReasonAllowed, "/api/v1"},
		{"a path the rule does not name", "GET /admin HTTP/1.1\r\nHost: pathhost.test\r\n\r\n", policy.ReasonPath, "/admin"},
		{"absolute form", "GET http://pathhost.test/admin?x HTTP/1.1\r\nHost: pathhost.test\r\n\r\n", policy.ReasonPath, "/admin"},
		// A path an origin may read as another one is refused where only
		// a host/path rule allows it, as the proxy refuses it.
		{"dot segments", "GET /api/../admin HTTP/1.1\r\nHost: pathhost.test\r\n\r\n", ReasonPathForm, "/api/../admin"},
		{"an encoded dot segment", "GET /api/%2e%2E/admin HTTP/1.1\r\nHost: pathhost.test\r\n\r\n", ReasonPathForm, "/api/%2e%2E/admin"},
		{"a fragment before a dot segment", "GET /api/#/../admin HTTP/1.1\r\nHost: pathhost.test\r\n\r\n", ReasonPathForm, "/api/#/../admin"},
		{"IIS's %u escape of a dot", "GET /api/%u002e%u002e/admin HTTP/1.1\r\nHost: pathhost.test\r\n\r\n", ReasonPathForm, "/api/%u002e%u002e/admin"},
		{"an overlong three-byte dot", "GET /api/%e0%80%ae%e0%80%ae/admin HTTP/1.1\r\nHost: pathhost.test\r\n\r\n", ReasonPathForm, "/api/%e0%80%ae%e0%80%ae/admin"},
		{"a plain path with an encoded space (control)", "GET /api/My%20Page HTTP/1.1\r\nHost: pathhost.test\r\n\r\n", policy.ReasonAllowed, "/api/My%20Page"},
		// The asterisk form names no path under the rule's glob.
		{"OPTIONS *", "OPTIONS * HTTP/1.1\r\nHost: pathhost.test\r\n\r\n", policy.ReasonPath, "*"},
		// Cleartext that shows no HTTP/1 path: the proxy refuses it where
		// only a host/path rule would allow it (path-unseen).
		{"HTTP/2 with prior knowledge", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00", policy.ReasonPathUnseen, ""},
		{"another protocol", "\x00\x01binary", policy.ReasonPathUnseen, ""},
		{"a silent client", "", policy.ReasonPathUnseen, ""},
	}
	p := newPcap(t)
	for i, tc := range cases {
		c := &tcpConn{p: p, cli: cli, srv: srv, cport: uint16(49000 + i), sport: 80, cseq: 1, sseq: 1}
		c.handshake()
		if tc.head != "" {
			c.send(true, []byte(tc.head), 1400, nil, nil)
		}
		c.close()
	}
	r := synthRun(t, p.close(), pol, factsMap{srv: {"pathhost.test"}}, Config{})
	got := map[uint16]audit.Event{}
	for _, ev := range r.events {
		got[ev.ClientPort] = ev
	}
	for i, tc := range cases {
		ev, ok := got[uint16(49000+i)]
		if !ok || ev.Reason != tc.reason || ev.Path != tc.path || ev.Name != "pathhost.test" {
			t.Errorf("%s: %+v, want %q path %q", tc.what, ev, tc.reason, tc.path)
		}
	}
}

// TestHelloAsTheProxy: hellos capture read otherwise than the proxy until
// both read hellos with internal/tlshello: capture's reason is the one the
// proxy gives (its TestReadClientHello has the same shapes).
func TestHelloAsTheProxy(t *testing.T) {
	cli := netip.MustParseAddr("192.0.2.85")
	srv := netip.MustParseAddr("203.0.113.85")
	sni := sniExt("a.allowed.test")
	suites := []byte{0x13, 0x01}
	cat := func(bs ...[]byte) []byte { return bytes.Join(bs, nil) }
	// records cuts the handshake message of a one-record hello into
	// records of at most n bytes.
	records := func(rec []byte, n int) []byte {
		var out []byte
		for hs := rec[5:]; len(hs) > 0; {
			k := min(n, len(hs))
			out = append(out, 22, 3, 1, byte(k>>8), byte(k))
			out = append(out, hs[:k]...)
			hs = hs[k:]
		}
		return out
	}
	// A hello of 65,520 bytes: within crypto/tls's limit on the message,
	// but its four records are 65,540 bytes with their headers, past the
	// proxy's cap on what it reads for a hello (64 KiB).
	pad := 65520 - 4 - len(helloBody(suites, sni, nil)[9:]) - 4
	big := records(helloBody(suites, cat(sni, tlsExt(21, make([]byte, pad))), nil), 16384)
	// A record announcing 10 bytes more than the hello in it: crypto/tls,
	// and so the proxy, waits for them (until its hello timeout).
	long := helloBody(suites, sni, nil)
	n := int(long[3])<<8 | int(long[4]) + 10
	long[3], long[4] = byte(n>>8), byte(n)
	whole := realClientHello(t, "a.allowed.test")
	cases := []struct {
		what   string
		hello  []byte
		end    string // "fin" or "rst": the client ends its stream at once
		skip   map[int]bool
		reason string
	}{
		{"records over 64 KiB", big, "", nil, ReasonHelloTooLarge},
		{"a record longer than its hello", long, "", nil, ReasonHelloTimeout},
		// The proxy reads to the end of stream and refuses the hello.
		{"a hello cut short by the client's FIN", whole[:1000], "fin", nil, ReasonHelloBad},
		{"a record longer than its hello, then FIN", long, "fin", nil, ReasonHelloBad},
		// Or to the reset (TestTransparent/hello-cut-by-reset).
		{"a hello cut short by the client's RST", whole[:1000], "rst", nil, ReasonHelloBad},
		// Capture lost a segment: it cannot tell, and decides by address
		// (here the name egressd's DNS gave out for it).
		{"a hello with a segment lost to capture, then FIN", whole, "fin", map[int]bool{1: true}, policy.ReasonAllowed},
		{"a hello with a segment lost to capture, then RST", whole, "rst", map[int]bool{1: true}, policy.ReasonAllowed},
	}
	p := newPcap(t)
	var conns []*tcpConn
	for i, tc := range cases {
		c := &tcpConn{p: p, cli: cli, srv: srv, cport: uint16(46200 + i), sport: 443, cseq: 1, sseq: 1}
		c.handshake()
		c.send(true, tc.hello, 1400, nil, tc.skip)
		switch tc.end {
		case "fin":
			c.close()
			continue
		case "rst":
			if tc.skip != nil {
				// The server got the segment capture lost: it
				// acknowledges the hello whole.
				c.seg(false, "A", c.sseq, nil)
			}
			c.seg(true, "RA", c.cseq, nil)
			continue
		}
		conns = append(conns, c)
	}
	p.now = p.now.Add(classifyWait + time.Second) // the proxy's hello timeout
	for _, c := range conns {
		c.close()
	}
	r := synthRun(t, p.close(), testPolicy, factsMap{srv: {"a.allowed.test"}}, Config{})
	got := map[uint16]audit.Event{}
	for _, ev := range r.events {
		got[ev.ClientPort] = ev
	}
	for i, tc := range cases {
		if ev, ok := got[uint16(46200+i)]; !ok || ev.Reason != tc.reason {
			t.Errorf("%s: %+v, want %q", tc.what, ev, tc.reason)
		}
	}
}

// TestHelloLiteralSNI: a server name that is an IP literal (RFC 6066
// forbids them) names nothing: the proxy decides such a hello as one
// without SNI (by address, then by the names egressd's DNS gave out for
// the address), and so does capture.
func TestHelloLiteralSNI(t *testing.T) {
	cli := netip.MustParseAddr("192.0.2.86")
	srv := netip.MustParseAddr("203.0.113.86")
	cases := []struct {
		what string
		sni  string
	}{
		{"the destination's address", "203.0.113.86"},
		{"another address", "198.51.100.7"},
		{"an IPv6 literal", "2001:db8::1"},
		{"an IPv6 literal in brackets", "[2001:db8::1]"},
	}
	p := newPcap(t)
	for i, tc := range cases {
		c := &tcpConn{p: p, cli: cli, srv: srv, cport: uint16(46300 + i), sport: 443, cseq: 1, sseq: 1}
		c.handshake()
		c.send(true, helloBody([]byte{0x13, 0x01}, sniExt(tc.sni), nil), 1400, nil, nil)
		c.close()
	}
	r := synthRun(t, p.close(), testPolicy, factsMap{srv: {"a.allowed.test"}}, Config{})
	got := map[uint16]audit.Event{}
	for _, ev := range r.events {
		got[ev.ClientPort] = ev
	}
	for i, tc := range cases {
		ev := got[uint16(46300+i)]
		if ev.Verdict != policy.Allow || ev.Name != "a.allowed.test" || ev.NameSource != audit.NameDNSLearned {
			t.Errorf("%s: %+v, want allowed as a.allowed.test (dns-learned)", tc.what, ev)
		}
	}
}
