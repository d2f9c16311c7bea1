package capture

import (
	"net"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/gopacket/gopacket/layers"

	"egressd/audit"
	"egressd/internal/fakemac"
	"egressd/policy"
)

// TestQUICOtherNames: a QUIC flow (one client port to one server address
// and port) whose later connections' hellos name other hosts the policy
// allows by themselves (quic-go's shared Transport) is decided by its
// first hello, as UDP is forwarded by address, and its event names the
// others in OtherNames, each once, in the order the hellos came: a
// report reading the record sees every host the flow reached. Before
// session 30 only the first hello's name was recorded: the second
// appeared nowhere.
func TestQUICOtherNames(t *testing.T) {
	hello := handHello(sniExt(decoyName))[5:]
	again := handHello(sniExt(decoyName))[5:]
	again[10] ^= 0xff
	other := handHello(sniExt("b.allowed.test"))[5:]
	third := handHello(sniExt("C.Allowed.Test"))[5:] // recorded as the policy reads it
	d1, d2, d3, d4 := []byte{1, 2, 3, 4, 5, 6, 7, 8}, []byte{9, 9, 9, 9}, []byte{3, 3, 3, 3}, []byte{4, 4, 4, 4}
	cases := []quicCase{
		{"one connection", []quicDgram{
			{true, clientInitialV(t, quicV1, d1, nil, 0, 0, hello)},
		}, policy.ReasonAllowed},
		{"a second connection of the same name", []quicDgram{
			{true, clientInitialV(t, quicV1, d1, nil, 0, 0, hello)},
			{true, clientInitialV(t, quicV1, d2, nil, 0, 0, again)},
		}, policy.ReasonAllowed},
		{"a second connection naming another allowed host", []quicDgram{
			{true, clientInitialV(t, quicV1, d1, nil, 0, 0, hello)},
			{true, clientInitialV(t, quicV1, d2, nil, 0, 0, other)},
		}, policy.ReasonAllowed},
		{"three more connections, two hosts, one twice", []quicDgram{
			{true, clientInitialV(t, quicV1, d1, nil, 0, 0, hello)},
			{true, clientInitialV(t, quicV1, d2, nil, 0, 0, other)},
			{true, clientInitialV(t, quicV1, d3, nil, 0, 0, third)},
			{true, clientInitialV(t, quicV1, d4, nil, 0, 0, other)},
		}, policy.ReasonAllowed},
	}
	want := [][]string{nil, nil, {"b.allowed.test"}, {"b.allowed.test", "c.allowed.test"}}
	got := quicCases(t, cases)
	for i, c := range cases {
		ev := got[uint16(47000+i)]
		if ev.Name != decoyName || ev.NameSource != audit.NameQUIC || !slices.Equal(ev.OtherNames, want[i]) {
			t.Errorf("%s: named %q (%s), others %q; want %q, others %q", c.what, ev.Name, ev.NameSource, ev.OtherNames, decoyName, want[i])
		}
	}
}

// TestQUICOtherNamesBounded: a QUIC flow records at most
// maxOtherNames other hosts; a later connection (its hello kept
// once the first ones' gave way, past heldWait) naming one more host is
// stream-conflict, not a host the record hides. One naming a host
// recorded already stays allowed.
func TestQUICOtherNamesBounded(t *testing.T) {
	names := []string{decoyName, "b.allowed.test", "c.allowed.test", "d.allowed.test"}
	for _, c := range []struct {
		last   string
		reason string
		others []string
	}{
		{"e.allowed.test", ReasonStreamConflict, nil},
		{"c.allowed.test", policy.ReasonAllowed, names[1:]},
	} {
		rec := &recorder{}
		srv := netip.MustParseAddr("203.0.113.10")
		capt, err := New(Config{}, Deps{Policy: policy.NewStore(testEngine(t, testPolicy)), Sink: rec, DNS: factsMap{srv: {decoyName}}})
		if err != nil {
			t.Fatal(err)
		}
		cli, dst := netip.AddrPortFrom(netip.MustParseAddr("192.0.2.10"), 47000), netip.AddrPortFrom(srv, 443)
		now := time.Unix(1e9, 0)
		send := func(i int, name string) {
			now = now.Add(time.Millisecond)
			dg := clientInitialV(t, quicV1, []byte{byte(i + 1), 1, 1, 1}, nil, 0, 0, handHello(sniExt(name))[5:])
			capt.proc.packet(udpFrame(t, macClient, macGW, cli, dst, dg), now, layers.LinkTypeEthernet)
		}
		for i, n := range names {
			send(i, n)
		}
		now = now.Add(heldWait + time.Second)
		send(len(names), c.last)
		capt.proc.flush("end-of-capture")
		evs := rec.all()
		if len(evs) != 1 || evs[0].Reason != c.reason || !slices.Equal(evs[0].OtherNames, c.others) {
			t.Errorf("last %s: events %+v, want one %s, others %q", c.last, evs, c.reason, c.others)
		}
	}
}

// TestQUICOtherNamesCharged: the other names a QUIC flow keeps (up to
// maxOtherNames of up to 255 bytes each, for as long as the flow
// lives) are counted in the capture buffers' bound (MaxStreamBytes), as
// its kept hellos and keys are, and given back when the flow ends. Before
// session 31 (Q4) they were not: about 50 MB at 65,536 flows held
// outside it.
func TestQUICOtherNamesCharged(t *testing.T) {
	srv := netip.MustParseAddr("203.0.113.10")
	capt, err := New(Config{}, Deps{Policy: policy.NewStore(testEngine(t, testPolicy)), Sink: &recorder{}, DNS: factsMap{srv: {decoyName}}})
	if err != nil {
		t.Fatal(err)
	}
	p := capt.proc
	cli, dst := netip.AddrPortFrom(netip.MustParseAddr("192.0.2.10"), 47000), netip.AddrPortFrom(srv, 443)
	now := time.Unix(1e9, 0)
	names := []string{decoyName, "b.allowed.test", "c.allowed.test"}
	for i, n := range names {
		now = now.Add(time.Millisecond)
		dg := clientInitialV(t, quicV1, []byte{byte(i + 1), 1, 1, 1}, nil, 0, 0, handHello(sniExt(n))[5:])
		p.packet(udpFrame(t, macClient, macGW, cli, dst, dg), now, layers.LinkTypeEthernet)
	}
	// Past heldWait the kept hellos give way to their digests: what the
	// flow holds then is mostly its keys and its names.
	p.now = now.Add(heldWait + time.Second)
	p.sweep()
	if len(p.flows) != 1 {
		t.Fatalf("%d flows, want 1", len(p.flows))
	}
	for _, f := range p.flows {
		if !slices.Equal(f.otherNames, names[1:]) {
			t.Fatalf("other names %q, want %q", f.otherNames, names[1:])
		}
		with := f.held
		keep := f.otherNames
		f.otherNames = nil
		p.charge(f)
		without := f.held
		f.otherNames = keep
		p.charge(f)
		if n := len(names[1]) + len(names[2]); with-without < n {
			t.Errorf("the flow's other names are charged %d bytes, want at least their %d", with-without, n)
		}
		if p.streamBytes != f.held {
			t.Errorf("streamBytes %d, the one flow holds %d", p.streamBytes, f.held)
		}
		// Its events carry the names without a copy each.
		if a := testing.AllocsPerRun(100, func() { _ = f.eventOthers() }); a != 0 {
			t.Errorf("eventOthers allocates %.0f times an event, want none", a)
		}
	}
	p.flush("end-of-capture")
	if p.streamBytes != 0 {
		t.Errorf("the flow ended holding %d bytes", p.streamBytes)
	}
}

// TestQUICOtherNameBound: a later connection's hello naming another
// allowed host that would take the capture buffers past MaxStreamBytes
// (the hello and keys it brings, and the name the flow would hold for its
// life) is stream-conflict, as a hello that does not fit is: the bound
// holds. Before session 31 (Q4) the name was kept past it.
func TestQUICOtherNameBound(t *testing.T) {
	p, rec, send := quicNamesProc(t)
	send(0, decoyName)
	send(1, "b.allowed.test")
	// Room for the next datagram's bytes, not for what its hello keeps.
	dg := clientInitialV(t, quicV1, []byte{3, 1, 1, 1}, nil, 0, 0, handHello(sniExt("c.allowed.test"))[5:])
	p.c.cfg.MaxStreamBytes = p.streamBytes + len(dg)
	limited := p.stats.streamLimited.Load()
	send(2, "c.allowed.test")
	if p.streamBytes > p.c.cfg.MaxStreamBytes {
		t.Errorf("capture holds %d bytes, past the bound %d", p.streamBytes, p.c.cfg.MaxStreamBytes)
	}
	if p.stats.streamLimited.Load() != limited+1 {
		t.Errorf("streamLimited %d, want %d", p.stats.streamLimited.Load(), limited+1)
	}
	p.flush("end-of-capture")
	if evs := rec.all(); len(evs) != 1 || evs[0].Reason != ReasonStreamConflict {
		t.Errorf("events %+v, want one stream-conflict", evs)
	}
}

// TestQUICOtherNameFrameMAC: a QUIC flow's later connection naming
// another host is judged with the client MAC the flow is judged with
// everywhere else, the frame's source address (flowInput): the forward
// chain matches it, the flow's events carry it, and the ledger credits
// the flow's other names and a replay judges them with it. Here the
// neighbour table has no entry for the client (it is behind a router, or
// the entry expired) and the rule of the second name names the frame's
// MAC: the second connection is allowed and recorded, and the report
// credits its rule. Before session 31 (Q4) it was judged with the
// neighbour table's MAC (the proxy's, which never sees UDP): a false
// stream-conflict.
func TestQUICOtherNameFrameMAC(t *testing.T) {
	const pol = `version: 1
mode: audit
groups:
  kiosks: ["02:00:00:00:00:01"]
rules:
  - name: web
    to: [a.allowed.test]
    ports: [443/udp]
  - name: kiosk
    from: [kiosks]
    to: [c.allowed.test]
    ports: [443/udp]
`
	srv := netip.MustParseAddr("203.0.113.10")
	rec := &recorder{}
	store := policy.NewStore(testEngine(t, pol))
	ledger := audit.NewLedger(store.Load(), audit.LedgerOptions{})
	macs := fakemac.New(map[netip.Addr]net.HardwareAddr{})
	capt, err := New(Config{}, Deps{Policy: store, Sink: audit.Tee(rec, ledger), DNS: factsMap{srv: {decoyName}}, MACs: macs})
	if err != nil {
		t.Fatal(err)
	}
	cli, dst := netip.AddrPortFrom(netip.MustParseAddr("192.0.2.10"), 47000), netip.AddrPortFrom(srv, 443)
	now := time.Unix(1e9, 0)
	for i, n := range []string{decoyName, "c.allowed.test"} {
		now = now.Add(time.Millisecond)
		dg := clientInitialV(t, quicV1, []byte{byte(i + 1), 1, 1, 1}, nil, 0, 0, handHello(sniExt(n))[5:])
		capt.proc.packet(udpFrame(t, macClient, macGW, cli, dst, dg), now, layers.LinkTypeEthernet)
	}
	capt.proc.flush("end-of-capture")
	evs := rec.all()
	if len(evs) != 1 || evs[0].Verdict != policy.Allow || evs[0].ClientMAC != macClient.String() || !slices.Equal(evs[0].OtherNames, []string{"c.allowed.test"}) {
		t.Fatalf("events %+v; want one allowed, MAC %s, others c.allowed.test", evs, macClient)
	}
	r := ledger.Report(audit.ReportOptions{})
	credited := false
	for _, rr := range r.Rules {
		credited = credited || rr.Name == "kiosk" && rr.Flows == 1
	}
	if !credited {
		t.Errorf("report rules %+v: want kiosk credited the flow", r.Rules)
	}
}

// quicNamesProc is a capture of testPolicy whose DNS gave 203.0.113.10
// out for decoyName, and send, which hands it the i-th QUIC connection's
// Initial from one client port to that address, its hello naming name.
func quicNamesProc(t *testing.T) (*proc, *recorder, func(i int, name string) []byte) {
	srv := netip.MustParseAddr("203.0.113.10")
	rec := &recorder{}
	capt, err := New(Config{}, Deps{Policy: policy.NewStore(testEngine(t, testPolicy)), Sink: rec, DNS: factsMap{srv: {decoyName}}})
	if err != nil {
		t.Fatal(err)
	}
	p := capt.proc
	cli, dst := netip.AddrPortFrom(netip.MustParseAddr("192.0.2.10"), 47000), netip.AddrPortFrom(srv, 443)
	now := time.Unix(1e9, 0)
	return p, rec, func(i int, name string) []byte {
		now = now.Add(time.Millisecond)
		dg := clientInitialV(t, quicV1, []byte{byte(i + 1), 1, 1, 1}, nil, 0, 0, handHello(sniExt(name))[5:])
		p.packet(udpFrame(t, macClient, macGW, cli, dst, dg), now, layers.LinkTypeEthernet)
		return dg
	}
}
