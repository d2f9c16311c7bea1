package capture

import (
	"slices"
	"testing"

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
