package capture

import (
	"bytes"
	"net/netip"
	"slices"
	"testing"

	"egressd/audit"
	"egressd/policy"
)

// versionNegotiation is a server's Version Negotiation packet (RFC 9000
// §17.2.1) to a client Initial to dcid, listing versions.
func versionNegotiation(dcid []byte, versions ...uint32) []byte {
	b := []byte{0x80, 0, 0, 0, 0, 0, byte(len(dcid))} // version 0; no DCID (the client sent no SCID)
	b = append(b, dcid...)
	for _, v := range versions {
		b = append(b, byte(v>>24), byte(v>>16), byte(v>>8), byte(v))
	}
	return b
}

// retryPacket is a server's Retry (RFC 9000 §17.2.5) giving the client
// the new DCID scid and a token (the integrity tag is not checked here).
func retryPacket(scid, token []byte) []byte {
	b := []byte{0xf0, 0, 0, 0, 1, 0, byte(len(scid))}
	b = append(append(b, scid...), token...)
	return append(b, make([]byte, 16)...)
}

// TestQUICNewAttempt: a QUIC client's legitimate second Initial is no
// stream-conflict. After a Version Negotiation packet (RFC 9000 §6.2) a
// client starts again in another version, with a new ClientHello at
// offset 0: the server reads that one only, so capture reads it too, and
// keeps the flow allowed where it names the same host; one naming
// another host is a conflict (which hello a server read is not known: a
// decoy in the first version must not make a denied name look allowed),
// and the first version's hello stays watched. After a Retry the client
// sends the same hello to the new DCID with the token: a retransmission.
// Before session 29 the new version's hello read as a stream-conflict.
func TestQUICNewAttempt(t *testing.T) {
	cases := newAttemptCases(t)
	got := quicCases(t, cases)
	for i, c := range cases {
		ev := got[uint16(47000+i)]
		// An allowed flow is decided on its hello, not by address (the
		// server's address has the name too: factsMap).
		if c.reason == policy.ReasonAllowed && (ev.NameSource != audit.NameQUIC || ev.Name != decoyName) {
			t.Errorf("%s: named %q (%s), want %q from the QUIC SNI", c.what, ev.Name, ev.NameSource, decoyName)
		}
	}
}

// newAttemptCases are TestQUICNewAttempt's flows (FuzzQUICFlow's seeds
// too).
func newAttemptCases(t testing.TB) []quicCase {
	hello := handHello(sniExt(decoyName))[5:] // CRYPTO carries no record header
	again := bytes.Clone(hello)
	again[10] ^= 0xff // a new hello: another random
	denied := handHello(sniExt(realName))[5:]
	other := handHello(sniExt("b.allowed.test"))[5:] // allowed by testPolicy's rule too
	dcid1, dcid2 := []byte{1, 2, 3, 4, 5, 6, 7, 8}, []byte{9, 9, 9, 9, 9, 9, 9, 9}
	dcid3 := []byte{7, 7, 7, 7} // the server's chosen connection ID
	token := []byte("a retry token")
	type dgram = quicDgram
	// newConn: the hello, then a new connection's second, in two Initials.
	newConn := func(second []byte) []dgram {
		return []dgram{
			{true, clientInitialV(t, quicV1, dcid1, nil, 0, 0, hello)},
			{true, clientInitialV(t, quicV1, dcid2, nil, 0, 0, second[:20])},
			{true, clientInitialV(t, quicV1, dcid2, nil, 1, 20, second[20:])},
		}
	}
	// retryRest: the Retry after the first of the hello's Initials; the
	// client's first Initial after it carries part of the hello, the
	// others go to the server's chosen DCID, sealed with the Retry's keys.
	retryRest := []dgram{
		{true, clientInitialV(t, quicV1, dcid1, nil, 0, 0, hello[:20])},
		{false, retryPacket(dcid2, token)},
		{true, clientInitialV(t, quicV1, dcid2, token, 1, 15, hello[15:30])},
		{true, clientInitialKeyed(t, quicV1, dcid2, dcid3, token, 2, 0, hello[:15])},
		{true, clientInitialKeyed(t, quicV1, dcid2, dcid3, token, 3, 30, hello[30:])},
	}
	// retryAfter: the Retry after the whole hello (decided), the hello
	// again, to the Retry's DCID and then to the server's, and last
	// there.
	retryAfter := func(last []byte) []dgram {
		return []dgram{
			{true, clientInitialV(t, quicV1, dcid1, nil, 0, 0, hello)},
			{false, retryPacket(dcid2, token)},
			{true, clientInitialV(t, quicV1, dcid2, token, 1, 0, hello[:15])},
			{true, clientInitialKeyed(t, quicV1, dcid2, dcid3, token, 2, 15, hello[15:])},
			{true, clientInitialKeyed(t, quicV1, dcid2, dcid3, token, 3, 0, last)},
		}
	}
	cases := []quicCase{
		{"version negotiation, a new hello of the same name", []dgram{
			{true, clientInitialV(t, quicV1, dcid1, nil, 0, 0, hello)},
			{false, versionNegotiation(dcid1, quicV2)},
			{true, clientInitialV(t, quicV2, dcid2, nil, 0, 0, again)},
			{true, clientInitialV(t, quicV2, dcid2, nil, 1, 0, again)},
		}, policy.ReasonAllowed},
		{"version negotiation, a new hello in two Initials", []dgram{
			{true, clientInitialV(t, quicV1, dcid1, nil, 0, 0, hello)},
			{false, versionNegotiation(dcid1, quicV2)},
			{true, clientInitialV(t, quicV2, dcid2, nil, 0, 0, again[:20])},
			{true, clientInitialV(t, quicV2, dcid2, nil, 1, 20, again[20:])},
		}, policy.ReasonAllowed},
		{"version negotiation, a new hello naming another host", []dgram{
			{true, clientInitialV(t, quicV1, dcid1, nil, 0, 0, hello)},
			{false, versionNegotiation(dcid1, quicV2)},
			{true, clientInitialV(t, quicV2, dcid2, nil, 0, 0, denied)},
		}, ReasonStreamConflict},
		{"a new version's hello of the same name, then a different copy in the first", []dgram{
			{true, clientInitialV(t, quicV1, dcid1, nil, 0, 0, hello)},
			{true, clientInitialV(t, quicV2, dcid2, nil, 0, 0, again)},
			{true, clientInitialV(t, quicV1, dcid2, nil, 0, 0, denied)},
		}, ReasonStreamConflict},
		{"a new version's hello of the same name, then a different copy in it", []dgram{
			{true, clientInitialV(t, quicV1, dcid1, nil, 0, 0, hello)},
			{true, clientInitialV(t, quicV2, dcid2, nil, 0, 0, again)},
			{true, clientInitialV(t, quicV2, dcid1, nil, 0, 0, denied)},
		}, ReasonStreamConflict},
		{"retry, the same hello with the token", []dgram{
			{true, clientInitialV(t, quicV1, dcid1, nil, 0, 0, hello)},
			{false, retryPacket(dcid2, token)},
			{true, clientInitialV(t, quicV1, dcid2, token, 0, 0, hello)},
		}, policy.ReasonAllowed},
		// The server's Retry came after the first of the hello's two
		// Initials: the client sends the whole hello again to the new
		// DCID, split elsewhere (the token takes room). e2e TestHTTP3
		// met it with an ML-KEM hello (session 29's final CI).
		{"retry after the first of two Initials, the whole hello again", []dgram{
			{true, clientInitialV(t, quicV1, dcid1, nil, 0, 0, hello[:20])},
			{false, retryPacket(dcid2, token)},
			{true, clientInitialV(t, quicV1, dcid2, token, 1, 0, hello[:15])},
			{true, clientInitialV(t, quicV1, dcid2, token, 2, 15, hello[15:])},
		}, policy.ReasonAllowed},
		{"retry after the first of two Initials, the first's rest sent late", []dgram{
			{true, clientInitialV(t, quicV1, dcid1, nil, 0, 0, hello[:20])},
			{false, retryPacket(dcid2, token)},
			{true, clientInitialV(t, quicV1, dcid1, nil, 1, 20, hello[20:])},
			{true, clientInitialV(t, quicV1, dcid2, token, 2, 0, hello[:15])},
			{true, clientInitialV(t, quicV1, dcid2, token, 3, 15, hello[15:])},
		}, policy.ReasonAllowed},
		// The server answered the client's first Initial after the
		// Retry before its second: the client's later Initials go to
		// the server's chosen DCID, still under the Retry's keys
		// (RFC 9001 §5.2). quic-go's chaos protection sends a hello's
		// CRYPTO data out of order, so the first after the Retry may
		// carry only part of it. Before session 30 capture opened them
		// with the keys of the flow's first DCID or their own only: the
		// hello never completed and the flow was decided by address
		// (e2e TestHTTP3, "allowed, Retry": dns-learned).
		{"retry after the first of two Initials, the rest to the server's DCID under the Retry's keys", retryRest, policy.ReasonAllowed},
		{"retry after the first of two Initials, the rest to the server's DCID, then a different copy there",
			append(slices.Clone(retryRest), dgram{true, clientInitialKeyed(t, quicV1, dcid2, dcid3, token, 4, 0, denied)}), ReasonStreamConflict},
		{"retry after the first of two Initials, another name to the server's DCID under the Retry's keys", []dgram{
			{true, clientInitialV(t, quicV1, dcid1, nil, 0, 0, hello[:len(hello)-4])},
			{false, retryPacket(dcid2, token)},
			{true, clientInitialV(t, quicV1, dcid2, token, 1, 0, hello[:15])},
			{true, clientInitialKeyed(t, quicV1, dcid2, dcid3, token, 2, 0, denied)},
		}, ReasonStreamConflict},
		// The Retry after the whole hello (decided): the client's hello
		// again, to the Retry's DCID and then to the server's.
		{"retry after the decision, the hello again in two Initials, the second to the server's DCID", retryAfter(hello), policy.ReasonAllowed},
		{"retry after the decision, the hello again in two Initials, then a different copy to the server's DCID", retryAfter(denied), ReasonStreamConflict},
		{"retry after the first of two Initials, another name in the hello again", []dgram{
			{true, clientInitialV(t, quicV1, dcid1, nil, 0, 0, hello[:len(hello)-4])},
			{false, retryPacket(dcid2, token)},
			{true, clientInitialV(t, quicV1, dcid2, token, 1, 0, denied)},
		}, ReasonStreamConflict},
		// One client socket, many connections (quic-go's Transport, an
		// HTTP/3 client's pool, a 0-RTT resumption): each new DCID
		// carries a new hello of the same name (e2e TestHTTP3).
		{"a new connection from the same port: a new DCID, a new hello of the same name", newConn(again), policy.ReasonAllowed},
		{"five connections from the same port, each a new hello of the same name", []dgram{
			{true, clientInitialV(t, quicV1, dcid1, nil, 0, 0, hello)},
			{true, clientInitialV(t, quicV1, dcid2, nil, 0, 0, again)},
			{true, clientInitialV(t, quicV1, []byte{3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3}, nil, 0, 0, again)},
			{true, clientInitialV(t, quicV1, []byte{4, 4, 4, 4}, nil, 0, 0, again)},
			{true, clientInitialV(t, quicV1, []byte{5, 5, 5, 5, 5, 5, 5, 5}, nil, 0, 0, hello)},
		}, ReasonStreamConflict}, // past maxQUICAttempts within heldWait
		// Two connections from one socket to two names the policy
		// allows by name, at one server address (quic-go's shared
		// Transport; a CDN): the second is a connection of its own,
		// decided the same (UDP is forwarded by address), and its
		// name is allowed on its own. Before session 30 (H4) it was
		// stream-conflict. The first hello's name is recorded.
		{"a new connection from the same port naming another allowed host", newConn(other), policy.ReasonAllowed},
		{"a new connection naming another allowed host, then a different copy of its hello", []dgram{
			{true, clientInitialV(t, quicV1, dcid1, nil, 0, 0, hello)},
			{true, clientInitialV(t, quicV1, dcid2, nil, 0, 0, other)},
			{true, clientInitialKeyed(t, quicV1, dcid2, dcid3, nil, 1, 0, denied)},
		}, ReasonStreamConflict},
		{"a new connection naming another allowed host, then one naming a host no rule names", []dgram{
			{true, clientInitialV(t, quicV1, dcid1, nil, 0, 0, hello)},
			{true, clientInitialV(t, quicV1, dcid2, nil, 0, 0, other)},
			{true, clientInitialV(t, quicV1, []byte{3, 3, 3, 3}, nil, 0, 0, denied)},
		}, ReasonStreamConflict},
		{"a new connection naming another host", []dgram{
			{true, clientInitialV(t, quicV1, dcid1, nil, 0, 0, hello)},
			{true, clientInitialV(t, quicV1, dcid2, nil, 0, 0, denied)},
		}, ReasonStreamConflict},
		{"retry, another hello with the token", []dgram{
			{true, clientInitialV(t, quicV1, dcid1, nil, 0, 0, hello)},
			{false, retryPacket(dcid2, token)},
			{true, clientInitialV(t, quicV1, dcid2, token, 0, 0, denied)},
		}, ReasonStreamConflict},
	}
	return cases
}

// quicDgram is a UDP datagram of a QUIC flow, from the client or to it.
type quicDgram struct {
	fromClient bool
	b          []byte
}

// quicCase is a QUIC flow's datagrams and the reason its event must carry.
type quicCase struct {
	what   string
	dgrams []quicDgram
	reason string
}

// quicCases runs cases (quicRun) and checks each one's reason; it
// returns the events by client port.
func quicCases(t *testing.T, cases []quicCase) map[uint16]audit.Event {
	t.Helper()
	var runs [][]quicDgram
	for _, c := range cases {
		runs = append(runs, c.dgrams)
	}
	got := quicRun(t, runs...)
	for i, c := range cases {
		if ev := got[uint16(47000+i)]; ev.Reason != c.reason || ev.Proto != "udp" {
			t.Errorf("%s: %s %s %q (%s), want %s", c.what, ev.Verdict, ev.Reason, ev.Name, ev.NameSource, c.reason)
		}
	}
	return got
}

// quicRun runs each of runs, the datagrams of one flow from 192.0.2.10
// port 47000+i to port 443 of 203.0.113.10 (which DNS gave out for
// decoyName), and returns the events by client port.
func quicRun(t *testing.T, runs ...[]quicDgram) map[uint16]audit.Event {
	t.Helper()
	p := newPcap(t)
	cli, srv := netip.MustParseAddr("192.0.2.10"), netip.MustParseAddr("203.0.113.10")
	for i, ds := range runs {
		for _, d := range ds {
			if d.fromClient {
				p.udp(true, cli, srv, uint16(47000+i), 443, d.b)
			} else {
				p.udp(false, srv, cli, 443, uint16(47000+i), d.b)
			}
		}
	}
	r := synthRun(t, p.close(), testPolicy, factsMap{srv: {decoyName}}, Config{})
	return eventsByPort(r.events)
}
