package capture

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"github.com/gopacket/gopacket/pcapgo"

	"egressd/audit"
	"egressd/policy"
)

// fwdPolicy: two groups of clients reach NTP names by UDP, which nftables
// forwards by the rules' learned sets (firewall/render.go).
const fwdPolicy = `version: 1
mode: audit
rules:
  - name: office
    from: [192.0.2.0/28]
    to: ["*.time.test"]
    ports: [123/udp]
  - name: lab
    from: [192.0.2.16/28]
    to: ["ntp.time.test"]
    ports: [123/udp]
`

// grantFacts is a DNSFacts that knows which client each name was given to,
// as dnsfilter's table does.
type grantFacts map[netip.Addr][]DNSGrant

func (m grantFacts) NamesFor(client, addr netip.Addr) []string {
	var out []string
	for _, g := range m[addr] {
		if (!client.IsValid() || g.Client == client) && !slices.Contains(out, g.Name) {
			out = append(out, g.Name)
		}
	}
	return out
}

func (m grantFacts) Given(addr netip.Addr) []DNSGrant { return m[addr] }

// fwdVerdicts returns "client verdict rule name source" per flow to port 123.
func fwdVerdicts(evs []audit.Event) map[netip.Addr]string {
	got := map[netip.Addr]string{}
	for _, ev := range evs {
		if ev.DestPort == 123 {
			got[ev.Client] = fmt.Sprintf("%s %s %s %s", ev.Verdict, ev.Rule, ev.Name, ev.NameSource)
		}
	}
	return got
}

// TestForwardedLearnedSetPerRule: nftables' learned set belongs to a rule
// and admits every client the rule covers, whichever of them asked
// egressd's forwarder (dnsfilter's gate feeds the set of every rule that
// lets the asker resolve the name). Capture judges forwarded traffic so:
// a client that did not resolve the address itself is allowed when
// another client of the same rule did; a client of a rule the asker is
// not covered by is not, although its own rule allows the name. Before,
// capture asked only for names given to the flow's own client: office2
// was reported denied (nftables forwards it).
func TestForwardedLearnedSetPerRule(t *testing.T) {
	office1 := netip.MustParseAddr("192.0.2.1")
	office2 := netip.MustParseAddr("192.0.2.2")
	lab := netip.MustParseAddr("192.0.2.17")
	outsider := netip.MustParseAddr("192.0.2.100")
	srv := netip.MustParseAddr("203.0.113.123")
	p := newPcap(t)
	for i, c := range []netip.Addr{office1, office2, lab, outsider} {
		p.udp(true, c, srv, uint16(40000+i), 123, []byte("ntp"))
	}
	path := p.close()
	// Only office1 asked, for ntp.time.test: office's set holds srv; lab's
	// does not (office1 is not lab's client), although lab allows the name.
	facts := grantFacts{srv: {{Client: office1, Name: "ntp.time.test"}}}
	r := synthRun(t, path, fwdPolicy, facts, Config{})
	got := fwdVerdicts(r.events)
	want := map[netip.Addr]string{
		office1:  "allow office ntp.time.test dns-learned",
		office2:  "allow office ntp.time.test dns-learned",
		lab:      "deny  ntp.time.test dns-learned",
		outsider: "deny  ntp.time.test dns-learned",
	}
	for c, w := range want {
		if got[c] != w {
			t.Errorf("%v: got %q, want %q", c, got[c], w)
		}
	}
}

// TestForwardedWireAnswers: in live capture a DNS answer seen on the wire
// stands for the one egressd's forwarder would have given in enforce mode,
// and teaches what the forwarder would have taught the firewall, no more:
// only rules that let the asker resolve the name, and only for the
// answer's TTL (as the firewall keeps it, policy.LearnedLifetime). Offline, with
// no forwarder, the answers are kept as long as for names (minLearnedTTL).
// Before, any wire answer, to any client, kept 30 minutes, made the
// address allowed for every client whose rule allows the name: lab was
// reported allowed by the answer to an outsider (nftables drops it), and
// office1 two minutes after a 30 s answer (the set let it go at 60 s).
func TestForwardedWireAnswers(t *testing.T) {
	office1 := netip.MustParseAddr("192.0.2.1")
	office2 := netip.MustParseAddr("192.0.2.2")
	lab := netip.MustParseAddr("192.0.2.17")
	outsider := netip.MustParseAddr("192.0.2.100")
	res := netip.MustParseAddr("198.51.100.53")
	srvA := netip.MustParseAddr("203.0.113.10") // office1 asked
	srvB := netip.MustParseAddr("203.0.113.11") // the outsider asked
	p := newPcap(t)
	p.udp(true, office1, res, 5000, 53, dnsQuery(t, "a.time.test"))
	p.udp(false, res, office1, 53, 5000, dnsResponse(t, "a.time.test", []netip.Addr{srvA}))
	p.udp(true, outsider, res, 5001, 53, dnsQuery(t, "ntp.time.test"))
	p.udp(false, res, outsider, 53, 5001, dnsResponse(t, "ntp.time.test", []netip.Addr{srvB}))
	p.now = p.now.Add(time.Second)
	p.udp(true, office2, srvA, 40001, 123, []byte("ntp")) // office's set: allowed
	p.udp(true, lab, srvB, 40002, 123, []byte("ntp"))     // nobody lab covers asked
	p.now = p.now.Add(2 * time.Minute)
	p.udp(true, office1, srvA, 40003, 123, []byte("ntp")) // the 30 s answer is gone live
	path := p.close()

	type row = string
	check := func(t *testing.T, evs []audit.Event, want map[row]string) {
		t.Helper()
		got := map[row]string{}
		for _, ev := range evs {
			if ev.DestPort == 123 {
				got[fmt.Sprintf("%v:%d", ev.Client, ev.ClientPort)] = fmt.Sprintf("%s %s %s %s", ev.Verdict, ev.Rule, ev.Name, ev.NameSource)
			}
		}
		for k, w := range want {
			if got[k] != w {
				t.Errorf("%v: got %q, want %q", k, got[k], w)
			}
		}
	}
	t.Run("live", func(t *testing.T) {
		rec := &recorder{}
		capt, err := New(Config{}, Deps{Policy: policy.NewStore(testEngine(t, fwdPolicy)), Sink: rec})
		if err != nil {
			t.Fatal(err)
		}
		feed(t, capt, path, func(time.Time) {})
		check(t, rec.all(), map[row]string{
			"192.0.2.2:40001":  "allow office a.time.test dns-answer",
			"192.0.2.17:40002": "deny  ntp.time.test dns-answer",
			"192.0.2.1:40003":  "deny   none",
		})
	})
	t.Run("offline", func(t *testing.T) {
		rec := &recorder{}
		capt, err := New(Config{}, Deps{Policy: policy.NewStore(testEngine(t, fwdPolicy)), Sink: rec})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := capt.ReadFile(context.Background(), path, nil); err != nil {
			t.Fatal(err)
		}
		check(t, rec.all(), map[row]string{
			"192.0.2.2:40001":  "allow office a.time.test dns-answer",
			"192.0.2.17:40002": "deny  ntp.time.test dns-answer",
			"192.0.2.1:40003":  "allow office a.time.test dns-answer",
		})
	})
}

// TestForwardedWireAnswerLifetime: a wire answer stands for the
// forwarder's, which the enforce firewall keeps for its TTL, at least
// policy.LearnedMinTTL and at most policy.LearnedMaxTTL (a day). Before,
// capture kept it for its TTL however long: a flow 25 h after a two-day
// answer was reported allowed, which nftables drops; and a shorter answer
// after a longer one cut the longer one short.
func TestForwardedWireAnswerLifetime(t *testing.T) {
	office1 := netip.MustParseAddr("192.0.2.1")
	res := netip.MustParseAddr("198.51.100.53")
	srv := netip.MustParseAddr("203.0.113.10")
	p := newPcap(t)
	p.udp(true, office1, res, 5000, 53, dnsQuery(t, "a.time.test"))
	p.udp(false, res, office1, 53, 5000, dnsResponseTTL(t, "a.time.test", []netip.Addr{srv}, 2*24*3600))
	p.now = p.now.Add(23 * time.Hour)
	p.udp(true, office1, srv, 40001, 123, []byte("ntp")) // within the day
	p.now = p.now.Add(2 * time.Hour)
	p.udp(true, office1, srv, 40002, 123, []byte("ntp")) // the set let it go
	// A 300 s answer, then a 10 s one: the set keeps the address until
	// the first one's end (it never shortens an element). (After the
	// flow before has ended: capture decides a UDP flow after its first
	// packet, and an answer later than that would count for it.)
	p.now = p.now.Add(2 * time.Minute)
	p.udp(true, office1, res, 5001, 53, dnsQuery(t, "a.time.test"))
	p.udp(false, res, office1, 53, 5001, dnsResponseTTL(t, "a.time.test", []netip.Addr{srv}, 300))
	p.now = p.now.Add(100 * time.Second)
	p.udp(true, office1, res, 5002, 53, dnsQuery(t, "a.time.test"))
	p.udp(false, res, office1, 53, 5002, dnsResponseTTL(t, "a.time.test", []netip.Addr{srv}, 10))
	p.now = p.now.Add(100 * time.Second)
	p.udp(true, office1, srv, 40003, 123, []byte("ntp"))
	path := p.close()
	rec := &recorder{}
	capt, err := New(Config{}, Deps{Policy: policy.NewStore(testEngine(t, fwdPolicy)), Sink: rec})
	if err != nil {
		t.Fatal(err)
	}
	feed(t, capt, path, func(time.Time) {})
	got := map[uint16]string{}
	for _, ev := range rec.all() {
		if ev.DestPort == 123 {
			got[ev.ClientPort] = fmt.Sprintf("%s %s %s %s", ev.Verdict, ev.Rule, ev.Name, ev.NameSource)
		}
	}
	want := map[uint16]string{40001: "allow office a.time.test dns-answer", 40002: "deny   none", 40003: "allow office a.time.test dns-answer"}
	for k, w := range want {
		if got[k] != w {
			t.Errorf("port %d: got %q, want %q", k, got[k], w)
		}
	}
}

// TestForwardedQUICByAddress: QUIC is UDP, which nftables forwards or
// drops by destination address alone; its SNI reaches no proxy. A QUIC
// flow whose SNI a UDP rule allows, to an address no DNS answer gave out
// for that rule, is dropped in enforce mode: capture reports it denied,
// with the SNI for the record, and allowed once egressd's forwarder gave
// the address out for the rule. Before, capture judged it by the SNI, and
// with no answer for the name on the wire vouched for it: allowed.
func TestForwardedQUICByAddress(t *testing.T) {
	const pol = `version: 1
mode: audit
rules:
  - name: q
    to: ["test"]
    ports: [443/udp]
`
	// A real QUIC v2 exchange, moved from ::1 port 4443 to a LAN client
	// and a remote server on 443.
	cli, srv := netip.MustParseAddr("2001:db8:1::10"), netip.MustParseAddr("2001:db8:113::443")
	f, err := os.Open(filepath.Join(pcapDir, "ndpi/quic-v2.pcapng"))
	if err != nil {
		t.Fatalf("real capture missing: %v", err)
	}
	defer f.Close()
	r, err := pcapgo.NewNgReader(f, pcapgo.DefaultNgReaderOptions)
	if err != nil {
		t.Fatal(err)
	}
	p := newPcap(t)
	for n := 0; n < 1000; n++ {
		data, ci, err := r.ReadPacketData()
		if err != nil {
			break
		}
		u, _ := gopacket.NewPacket(data, r.LinkType(), gopacket.Default).Layer(layers.LayerTypeUDP).(*layers.UDP)
		if u == nil {
			continue
		}
		p.now = ci.Timestamp
		if u.DstPort == 4443 {
			p.udp(true, cli, srv, uint16(u.SrcPort), 443, u.Payload)
		} else {
			p.udp(false, srv, cli, 443, uint16(u.DstPort), u.Payload)
		}
	}
	path := p.close()
	first := runFile(t, path, pol, nil)
	if len(first.events) != 1 {
		t.Fatalf("events: %+v", first.events)
	}
	ev := first.events[0]
	if ev.Name != "test" || ev.NameSource != audit.NameQUIC || ev.Verdict != policy.Deny || ev.Reason != policy.ReasonNoRule {
		t.Errorf("no answer: %s %s %s %s, want test quic-sni deny no-rule", ev.Name, ev.NameSource, ev.Verdict, ev.Reason)
	}
	vouched := runFile(t, path, pol, grantFacts{ev.Dest: {{Client: ev.Client, Name: "test"}}})
	if len(vouched.events) != 1 {
		t.Fatalf("events: %+v", vouched.events)
	}
	ev = vouched.events[0]
	if ev.Name != "test" || ev.NameSource != audit.NameQUIC || ev.Verdict != policy.Allow || ev.Rule != "q" {
		t.Errorf("address given out: %s %s %s %s, want test quic-sni allow q", ev.Name, ev.NameSource, ev.Verdict, ev.Rule)
	}
}

// httpsResponse is a DNS answer to an HTTPS query for name: one record,
// with an ech SvcParam when ech.
func httpsResponse(t testing.TB, name string, ech bool) []byte {
	t.Helper()
	d := &layers.DNS{ID: 9, QR: true, RD: true, RA: true, ResponseCode: layers.DNSResponseCodeNoErr,
		Questions: []layers.DNSQuestion{{Name: []byte(name), Type: layers.DNSTypeHTTPS, Class: layers.DNSClassIN}}}
	params := []layers.DNSSvcParam{{Key: layers.DNSSvcParamKeyAlpn, Value: []byte("\x02h2")}}
	if ech {
		params = append(params, layers.DNSSvcParam{Key: layers.DNSSvcParamKeyECH, Value: []byte("\x00\x04test")})
	}
	d.Answers = append(d.Answers, layers.DNSResourceRecord{Name: []byte(name), Type: layers.DNSTypeHTTPS, Class: layers.DNSClassIN, TTL: 300,
		SVCB: layers.DNSSVCB{Priority: 1, Target: []byte(""), Params: params}})
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true}, d); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// TestWireAnswerECH (THREATS.md B1): in enforce mode every LAN query goes
// to egressd's forwarder, which strips the ech SvcParam from HTTPS/SVCB
// answers; in audit mode clients may ask another resolver, whose answers
// keep it. Capture marks the DNS flow whose answer carried ech
// (Filtered "ech": what the forwarder would have removed), so that the
// report shows it before the switch; an answer without ech is not
// marked. Before, nothing recorded it.
func TestWireAnswerECH(t *testing.T) {
	cli := netip.MustParseAddr("192.0.2.1")
	res := netip.MustParseAddr("198.51.100.53")
	p := newPcap(t)
	p.udp(true, cli, res, 5000, 53, dnsQuery(t, "ech.time.test"))
	p.udp(false, res, cli, 53, 5000, httpsResponse(t, "ech.time.test", true))
	p.udp(true, cli, res, 5001, 53, dnsQuery(t, "plain.time.test"))
	p.udp(false, res, cli, 53, 5001, httpsResponse(t, "plain.time.test", false))
	r := synthRun(t, p.close(), fwdPolicy, nil, Config{})
	got := map[uint16]string{}
	for _, ev := range r.events {
		if ev.DestPort == 53 {
			got[ev.ClientPort] = ev.Filtered
		}
	}
	if got[5000] != "ech" || got[5001] != "" || len(got) != 2 {
		t.Errorf("filtered by client port: %v, want 5000 ech and 5001 nothing", got)
	}
}
