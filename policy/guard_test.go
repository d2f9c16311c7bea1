package policy

import (
	"net/netip"
	"testing"
)

// TestGuardRefuses: the special-range guard the proxy, capture, audit
// --replay and policy explain call refuses a guarded destination no CIDR
// rule for the flow names from inside its range, and says which range;
// it lets through no destination, an unguarded one, a named one, a
// configured exception, and guards the gateway's own addresses.
func TestGuardRefuses(t *testing.T) {
	e := mustCompile(t, `version: 1
rules:
  - {name: all, to: ["*", "0.0.0.0/0", "::/0"], ports: [443/tcp, 443/udp]}
  - {name: meta, to: [169.254.169.254/32], ports: [80/tcp]}
  - {name: local, to: ["64:ff9b:1::/48"], ports: [8443/tcp]}
`)
	own := []netip.Addr{netip.MustParseAddr("198.18.0.1")}
	allow := []netip.Prefix{netip.MustParsePrefix("100.64.1.0/24")}
	local := e.WithNAT64([]netip.Prefix{netip.MustParsePrefix("64:ff9b:1::/96")})
	for _, c := range []struct {
		eng   *Engine
		dest  string
		port  uint16
		proto Proto
		want  string // the range refused by, "" for none
	}{
		{e, "", 443, TCP, ""},
		{e, "198.51.100.1", 443, TCP, ""},
		{e, "169.254.169.254", 443, TCP, "169.254.0.0/16"},
		{e, "169.254.169.254", 443, UDP, "169.254.0.0/16"},
		{e, "169.254.169.254", 80, TCP, ""},
		{e, "::ffff:169.254.169.254", 80, TCP, ""},
		{e, "::ffff:169.254.169.254", 443, TCP, "169.254.0.0/16"},
		{e, "127.0.0.1", 443, TCP, "127.0.0.0/8"},
		{e, "2002:a9fe:a9fe::1", 443, TCP, "2002::/16"},
		{e, "100.64.1.5", 443, TCP, ""},
		{e, "100.64.2.5", 443, TCP, "100.64.0.0/10"},
		{e, "198.18.0.1", 443, TCP, "198.18.0.1/32"},
		{e, "64:ff9b:1:1::10", 8443, TCP, ""},
		{local, "64:ff9b:1:1::10", 8443, TCP, "64:ff9b:1::/48"},
		{local, "64:ff9b:1::a9fe:a9fe", 443, TCP, "64:ff9b:1::a9fe:0/112"},
		{local, "64:ff9b:1::a9fe:a9fe", 80, TCP, ""},
	} {
		in := Input{Port: c.port, Proto: c.proto}
		if c.dest != "" {
			in.Dest = netip.MustParseAddr(c.dest)
		}
		g, refused := c.eng.GuardRefuses(in, own, allow)
		got := ""
		if refused {
			got = g.String()
		}
		if got != c.want {
			t.Errorf("%s %d/%v nat64 %v: refused by %q, want %q", c.dest, c.port, c.proto, c.eng.NAT64(), got, c.want)
		}
	}
}

// TestLANRefuses: what a LAN host sends to loopback is refused on every
// port and protocol, a rule naming it too (enforce's antispoof chain
// drops 127.0.0.0/8 from the LAN, Linux ::1), DNS to loopback included;
// other DNS is the forwarder's; the rest is GuardRefuses's, the mapped
// form of loopback too (no loopback destination in an IPv6 header).
func TestLANRefuses(t *testing.T) {
	e := mustCompile(t, `version: 1
rules:
  - {name: loop, to: ["127.0.0.1/32", "::1/128"], ports: [9902/tcp, 7780/udp, 53/udp]}
  - {name: all, to: ["0.0.0.0/0"], ports: [443/tcp]}
  - {name: zero, to: ["0.0.0.0/32", "::/128"], ports: [80/tcp, 81/udp, 53/udp, icmp]}
  - {name: five, to: ["0.0.0.5/32"], ports: [82/tcp, 82/udp]}
`)
	for _, c := range []struct {
		dest  string
		port  uint16
		proto Proto
		want  string // the range refused by, "" for none
	}{
		// "This host", which a rule names: the transparent proxy
		// refuses it as loopback (TCP, redirected; dialled, it is the
		// gateway), the kernel forwards it nowhere (a martian); DNS is
		// the forwarder's.
		{"0.0.0.0", 80, TCP, "0.0.0.0/32"},
		{"::", 80, TCP, "::/128"},
		{"0.0.0.0", 81, UDP, "0.0.0.0/32"},
		{"0.0.0.0", 0, ICMP, "0.0.0.0/32"},
		{"0.0.0.0", 53, UDP, ""},
		// The rest of 0.0.0.0/8, and :: over UDP, Linux routes like any
		// address (LANThisHost): the special-range guard's, which a
		// CIDR rule naming it opens.
		{"0.0.0.5", 80, TCP, "0.0.0.0/8"},
		{"0.0.0.5", 81, UDP, "0.0.0.0/8"},
		{"0.0.0.5", 82, TCP, ""},
		{"0.0.0.5", 82, UDP, ""},
		{"0.255.255.255", 0, ICMP, "0.0.0.0/8"},
		{"::", 81, UDP, ""},
		{"127.0.0.1", 9902, TCP, "127.0.0.0/8"},
		{"127.0.0.1", 7780, UDP, "127.0.0.0/8"},
		{"127.0.0.1", 53, UDP, "127.0.0.0/8"},
		{"127.0.0.2", 443, TCP, "127.0.0.0/8"},
		{"::1", 7780, UDP, "::1/128"},
		{"::ffff:127.0.0.1", 9902, TCP, ""},
		{"::ffff:127.0.0.1", 443, TCP, "127.0.0.0/8"},
		{"169.254.169.254", 53, UDP, ""},
		{"169.254.169.254", 443, TCP, "169.254.0.0/16"},
		{"198.51.100.1", 443, TCP, ""},
	} {
		g, refused := e.LANRefuses(Input{Dest: netip.MustParseAddr(c.dest), Port: c.port, Proto: c.proto}, nil, nil)
		got := ""
		if refused {
			got = g.String()
		}
		if got != c.want {
			t.Errorf("%s %d/%v: refused by %q, want %q", c.dest, c.port, c.proto, got, c.want)
		}
	}
}
