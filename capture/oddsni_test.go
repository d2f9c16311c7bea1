package capture

import (
	"net/netip"
	"testing"

	"egressd/audit"
	"egressd/policy"
)

// TestOddSNIAsProxy (THREATS.md A5): odd server names are judged as the
// proxy judges them in enforce mode. The proxy reads the name crypto/tls
// reads; an IP literal, or no host_name entry, is no name (the flow is
// decided by its address, here our DNS's answer for a.allowed.test); a
// name that is not ASCII letters, digits, '-', '_' and dots matches no
// name rule.
func TestOddSNIAsProxy(t *testing.T) {
	cli := netip.MustParseAddr("192.0.2.84")
	srv := netip.MustParseAddr("203.0.113.84")
	type1 := func(n string) []byte { return append([]byte{1, byte(len(n) >> 8), byte(len(n))}, n...) }
	host := func(n string) []byte { return append([]byte{0, byte(len(n) >> 8), byte(len(n))}, n...) }
	list := func(entries ...[]byte) []byte {
		var l []byte
		for _, e := range entries {
			l = append(l, e...)
		}
		return tlsExt(0, append([]byte{byte(len(l) >> 8), byte(len(l))}, l...))
	}
	cases := []struct {
		what    string
		ext     []byte
		verdict policy.Verdict
		reason  string
		name    string
		src     audit.NameSource
	}{
		{"upper case", sniExt("A.Allowed.TEST"), policy.Allow, policy.ReasonAllowed, "a.allowed.test", audit.NameSNI},
		{"a Cyrillic homograph", sniExt("a.\u0430llowed.test"), policy.Deny, policy.ReasonInvalidName, "", audit.NameSNI},
		{"a NUL byte", sniExt("a.allowed.test\x00.evil.test"), policy.Deny, policy.ReasonInvalidName, "", audit.NameSNI},
		{"the address as an IP literal", sniExt("203.0.113.84"), policy.Allow, policy.ReasonAllowed, "a.allowed.test", audit.NameDNSLearned},
		{"an IP literal of another address", sniExt("198.18.9.9"), policy.Allow, policy.ReasonAllowed, "a.allowed.test", audit.NameDNSLearned},
		{"a bracketed IPv6 literal", sniExt("[2001:db8::1]"), policy.Allow, policy.ReasonAllowed, "a.allowed.test", audit.NameDNSLearned},
		{"a name of another type only", list(type1("evil.test")), policy.Allow, policy.ReasonAllowed, "a.allowed.test", audit.NameDNSLearned},
		{"a host name and a name of another type", list(host("evil.test"), type1("a.allowed.test")), policy.Deny, policy.ReasonNoRule, "evil.test", audit.NameSNI},
	}
	p := newPcap(t)
	for i, tc := range cases {
		h := handHello(tc.ext)
		name, ok, _ := cryptoTLSHello(h)
		t.Logf("%s: crypto/tls ok=%v name=%q", tc.what, ok, name)
		c := &tcpConn{p: p, cli: cli, srv: srv, cport: uint16(47000 + i), sport: 443, cseq: 1, sseq: 1}
		c.handshake()
		c.send(true, h, 1400, nil, nil)
		c.close()
	}
	r := synthRun(t, p.close(), testPolicy, factsMap{srv: {"a.allowed.test"}}, Config{})
	got := map[uint16]audit.Event{}
	for _, ev := range r.events {
		got[ev.ClientPort] = ev
	}
	for i, tc := range cases {
		ev, ok := got[uint16(47000+i)]
		if !ok || ev.Verdict != tc.verdict || ev.Reason != tc.reason || (tc.name != "" && ev.Name != tc.name) || ev.NameSource != tc.src {
			t.Errorf("%s: %+v, want %s %q name %q (%s)", tc.what, ev, tc.verdict, tc.reason, tc.name, tc.src)
		}
	}
}
