package capture

import (
	"net/netip"
	"testing"

	"egressd/audit"
	"egressd/policy"
)

// rerecord re-frames the handshake bytes of TLS records b into records of
// at most n bytes of payload each.
func rerecord(b []byte, n int) []byte {
	var hs []byte
	for len(b) >= 5 {
		l := int(b[3])<<8 | int(b[4])
		hs = append(hs, b[5:5+l]...)
		b = b[5+l:]
	}
	var out []byte
	for len(hs) > 0 {
		k := min(n, len(hs))
		out = append(out, 22, 3, 1, byte(k>>8), byte(k))
		out = append(out, hs[:k]...)
		hs = hs[k:]
	}
	return out
}

// TestHelloAcrossRecords (THREATS.md C2): a ClientHello split across TLS
// records of 1, 3 and 100 bytes (crypto/tls, and so the proxy, takes it)
// is read by capture with its name, in TCP segments of several sizes.
func TestHelloAcrossRecords(t *testing.T) {
	cli := netip.MustParseAddr("192.0.2.86")
	srv := netip.MustParseAddr("203.0.113.86")
	hello := realClientHello(t, "a.allowed.test")
	cases := []struct{ record, mss int }{{1, 1400}, {3, 7}, {100, 1400}, {100, 1}, {16384, 5}}
	p := newPcap(t)
	for i, c := range cases {
		b := rerecord(hello, c.record)
		if name, ok, _ := cryptoTLSHello(b); !ok || name != "a.allowed.test" {
			t.Fatalf("crypto/tls does not take the hello in %d-byte records: %q %v", c.record, name, ok)
		}
		conn := &tcpConn{p: p, cli: cli, srv: srv, cport: uint16(48100 + i), sport: 443, cseq: 1, sseq: 1}
		conn.handshake()
		conn.send(true, b, c.mss, nil, nil)
		conn.close()
	}
	r := synthRun(t, p.close(), testPolicy, factsMap{srv: {"a.allowed.test"}}, Config{})
	got := map[uint16]audit.Event{}
	for _, ev := range r.events {
		got[ev.ClientPort] = ev
	}
	for i, c := range cases {
		ev, ok := got[uint16(48100+i)]
		if !ok || ev.Verdict != policy.Allow || ev.Name != "a.allowed.test" || ev.NameSource != audit.NameSNI {
			t.Errorf("%d-byte records, %d-byte segments: %+v", c.record, c.mss, ev)
		}
	}
}
