package capture

import (
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/gopacket/gopacket/layers"

	"egressd/audit"
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
// audit.MaxOtherNames other hosts; a later connection (its hello kept
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
