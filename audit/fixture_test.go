package audit

import (
	"flag"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"egressd/policy"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/")

// t0 is the start of the fixed event stream.
var t0 = time.Date(2026, 11, 24, 10, 0, 0, 0, time.UTC)

// reportNow is when the golden reports are generated: after every event.
var reportNow = time.Date(2026, 11, 24, 12, 0, 0, 0, time.UTC)

func loadPolicy(t testing.TB, name string) *policy.Engine {
	t.Helper()
	src, err := os.ReadFile(filepath.Join("testdata", name))
	if err != nil {
		t.Fatal(err)
	}
	eng, err := policy.Compile("testdata/"+name, src)
	if err != nil {
		t.Fatal(err)
	}
	return eng
}

// fev builds one event and stamps it with eng's decision, as a component
// would.
type fev struct {
	kind     Kind
	src      Source
	at       time.Duration
	client   string
	mac      string // the client's MAC, when the component knew it
	cport    uint16
	dest     string
	dport    uint16
	proto    string
	name     string
	nsrc     NameSource
	out, in  uint64
	dur      float64
	qtype    string
	enforced bool // override: the flow was blocked (enforce-mode run)
}

func (f fev) event(eng *policy.Engine) Event {
	ev := Event{
		Kind: f.kind, Source: f.src, Time: t0.Add(f.at),
		Client: netip.MustParseAddr(f.client), ClientPort: f.cport, ClientMAC: f.mac,
		DestPort: f.dport, Proto: f.proto, Name: f.name, NameSource: f.nsrc,
		BytesOut: f.out, BytesIn: f.in, Duration: f.dur, QType: f.qtype,
	}
	if f.dest != "" {
		ev.Dest = netip.MustParseAddr(f.dest)
	}
	pr, _ := policy.ParseProto(f.proto)
	in := policy.Input{Client: ev.Client, Dest: ev.Dest, Port: f.dport, Proto: pr, Name: f.name, Now: ev.Time}
	if f.kind == KindDNS {
		ev.Stamp(eng.DecideName(in))
	} else {
		ev.Stamp(eng.Decide(in))
	}
	if f.enforced && ev.Verdict == policy.Deny {
		ev.Enforced = true
	}
	return ev
}

// fixtureEvents is the fixed event stream of the golden tests: proxy and
// capture both reporting some flows, UDP exchanges, DNS queries allowed
// and denied, every denial reason the ledger groups.
func fixtureEvents(t testing.TB, eng *policy.Engine) []Event {
	t.Helper()
	const (
		flow = KindFlow
		dns  = KindDNS
		px   = SourceProxy
		cap  = SourceCapture
		df   = SourceDNS
	)
	fs := []fev{
		// One TCP connection seen by capture (at the SYN, no bytes yet) and by
		// the proxy (at close, with bytes): one flow.
		{kind: flow, src: cap, at: 0, client: "192.168.10.5", cport: 40001, dest: "198.51.100.10", dport: 443, proto: "tcp", name: "api.nirovision.com", nsrc: NameSNI},
		{kind: flow, src: px, at: 5 * time.Millisecond, client: "192.168.10.5", cport: 40001, dest: "198.51.100.10", dport: 443, proto: "tcp", name: "api.nirovision.com", nsrc: NameSNI, out: 5120, in: 90210, dur: 30},
		{kind: flow, src: px, at: time.Minute, client: "192.168.10.6", cport: 40002, dest: "198.51.100.11", dport: 443, proto: "tcp", name: "registry-1.docker.io", nsrc: NameSNI, out: 1000, in: 2000, dur: 2},
		{kind: flow, src: px, at: 90 * time.Second, client: "192.168.10.5", cport: 40004, dest: "198.51.100.10", dport: 443, proto: "tcp", name: "api.nirovision.com", nsrc: NameSNI, out: 100, in: 200, dur: 1},
		{kind: flow, src: cap, at: 2 * time.Minute, client: "192.168.10.5", cport: 40003, dest: "17.1.2.3", dport: 5223, proto: "tcp", nsrc: NameNone, out: 300, in: 400},
		// NTP: two packets 30 s apart are one exchange; 7 minutes later a new one.
		{kind: flow, src: cap, at: 3 * time.Minute, client: "192.168.10.7", cport: 123, dest: "203.0.113.123", dport: 123, proto: "udp", out: 48, in: 48},
		{kind: flow, src: cap, at: 3*time.Minute + 30*time.Second, client: "192.168.10.7", cport: 123, dest: "203.0.113.123", dport: 123, proto: "udp", out: 96, in: 96},
		{kind: flow, src: cap, at: 10 * time.Minute, client: "192.168.10.7", cport: 123, dest: "203.0.113.123", dport: 123, proto: "udp", out: 48, in: 48},
		// DNS: an allowed query for a name no flow reached (the rule is used),
		// the same query seen by capture too (counted once), a denied query.
		{kind: dns, src: df, at: 4 * time.Minute, client: "192.168.10.5", cport: 5353, dest: "192.168.10.1", dport: 53, proto: "udp", name: "updates.example.org.", qtype: "A"},
		{kind: dns, src: cap, at: 4*time.Minute + time.Millisecond, client: "192.168.10.5", cport: 5353, dest: "192.168.10.1", dport: 53, proto: "udp", name: "updates.example.org", qtype: "A"},
		{kind: dns, src: df, at: 5 * time.Minute, client: "192.168.10.8", cport: 5354, dest: "192.168.10.1", dport: 53, proto: "udp", name: "tracker.example", qtype: "A"},
		// Would-be-dropped flows.
		{kind: flow, src: cap, at: 5*time.Minute + time.Second, client: "192.168.10.8", cport: 40010, dest: "203.0.113.9", dport: 443, proto: "tcp", name: "tracker.example", nsrc: NameSNI},
		{kind: flow, src: px, at: 5*time.Minute + time.Second + 3*time.Millisecond, client: "192.168.10.8", cport: 40010, dest: "203.0.113.9", dport: 443, proto: "tcp", name: "tracker.example", nsrc: NameSNI, out: 517, in: 0},
		{kind: flow, src: px, at: 6 * time.Minute, client: "192.168.10.9", cport: 40011, dest: "203.0.113.9", dport: 443, proto: "tcp", name: "tracker.example", nsrc: NameSNI, out: 517},
		{kind: flow, src: px, at: 7 * time.Minute, client: "192.168.20.4", cport: 40012, dest: "198.51.100.10", dport: 443, proto: "tcp", name: "api.nirovision.com", nsrc: NameSNI},
		{kind: flow, src: px, at: 8 * time.Minute, client: "192.168.10.5", cport: 40013, dest: "198.51.100.20", dport: 443, proto: "tcp", name: "legacy.example.net", nsrc: NameSNI},
		{kind: flow, src: cap, at: 9 * time.Minute, client: "192.168.10.5", cport: 40014, dest: "198.51.100.77", dport: 8443, proto: "tcp"},
		{kind: flow, src: px, at: 11 * time.Minute, client: "192.168.10.5", cport: 40015, dest: "198.51.100.30", dport: 443, proto: "tcp", name: "bucket1.s3.amazonaws.com", nsrc: NameSNI},
		{kind: flow, src: px, at: 12 * time.Minute, client: "192.168.10.5", cport: 40016, dest: "198.51.100.31", dport: 443, proto: "tcp", name: "bucket2.s3.amazonaws.com", nsrc: NameSNI},
		{kind: flow, src: px, at: 13 * time.Minute, client: "192.168.10.6", cport: 40017, dest: "198.51.100.40", dport: 443, proto: "tcp", name: "a.metrics.example.co.uk", nsrc: NameSNI},
		{kind: flow, src: px, at: 14 * time.Minute, client: "192.168.10.6", cport: 40018, dest: "198.51.100.41", dport: 443, proto: "tcp", name: "b.metrics.example.co.uk", nsrc: NameSNI},
		{kind: flow, src: px, at: 15 * time.Minute, client: "192.168.10.6", cport: 40019, dest: "198.51.100.42", dport: 443, proto: "tcp", name: "www.example.com", nsrc: NameHost, enforced: true},
		{kind: flow, src: px, at: 16 * time.Minute, client: "192.168.10.6", cport: 40020, dest: "198.51.100.43", dport: 80, proto: "tcp", name: "example.com", nsrc: NameHost},
	}
	// MACs: capture saw 192.168.10.5's (its proxy reports came without:
	// the flow's first report has it, or a later one adds it), the proxy
	// 192.168.10.6's; 192.168.10.8 and .9 are one device's two addresses.
	macs := map[string]string{"192.168.10.5/" + string(cap): "02:00:00:00:10:05", "192.168.10.6/" + string(px): "02:00:00:00:10:06",
		"192.168.10.8/" + string(cap): "02:00:00:00:10:08", "192.168.10.9/" + string(px): "02:00:00:00:10:08"}
	evs := make([]Event, len(fs))
	for i, f := range fs {
		f.mac = macs[f.client+"/"+string(f.src)]
		evs[i] = f.event(eng)
	}
	return evs
}
