package e2e

import (
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// TestHostileUpstreamAnswers (THREATS.md E2, E3, A2): the attacker holds a
// LAN client and the authoritative server of a name under an allowed
// wildcard (stuffed.nirovision.com under vendor-cloud's *.nirovision.com).
// Its answers carry address records of OTHER allowed names (notion.so of
// vendor-docs, time.google.com of ntp's UDP set), in other case, with an
// escaped dot, and the largest TTL the wire allows. None of it may vouch
// the attacker's address for those names (the proxy's SNI↔address check),
// open ntp's learned nftables set to it, or be credited to the name asked;
// the client is told no TTL over the forwarder's cap.
func TestHostileUpstreamAnswers(t *testing.T) {
	tp := newTopo(t)
	u := tp.startUpstream(t)
	const (
		stuffed = "stuffed.nirovision.com"
		forever = "forever.nirovision.com"
		ownIP   = "203.0.113.67" // the attacker's name's own address
	)
	u.answerVerbatim(stuffed,
		stuffed+". 300 IN A "+ownIP,
		notionName+". 300 IN A "+spoofIP4,
		"NOTION.SO. 300 IN A "+spoofIP4,
		`notion\.so. 300 IN A `+spoofIP4,
		ntpName+". 300 IN A "+spoofIP4,
		"nirovision.com. 300 IN DNAME notion.so.")
	u.answerVerbatim(forever, forever+". 2147483647 IN A "+ownIP)
	w := tp.newWitness(t, []string{spoofIP4 + ":443", ownIP + ":443"}, []string{spoofIP4 + ":123"})
	if !tp.dialOK(spoofIP4 + ":443") {
		t.Fatalf("without egressd, %s:443 is not reachable from the LAN: the test would prove nothing", spoofIP4)
	}
	if err := udpExchange(tp, spoofIP4+":123", []byte("ntp?")); err != nil {
		t.Fatalf("without egressd, UDP %s:123 does not answer: %v", spoofIP4, err)
	}
	w.settleAfter(t, 1, 1)
	base := w.hits(spoofIP4 + ":443")
	baseUDP := w.hits("udp:" + spoofIP4 + ":123")

	d := hardeningDaemon(t, tp, u, "")
	rcode, addrs := tp.dig(t, stuffed, "A")
	if rcode != "NOERROR" || !strings.Contains(strings.Join(addrs, " "), ownIP) {
		t.Fatalf("dig %s: %s %v", stuffed, rcode, addrs)
	}
	t.Logf("dig %s through egressd: %v", stuffed, addrs)

	// The attacker's address with another rule's name as SNI: not vouched.
	o := tp.sendHello(spoofIP4+":443", buildHello(helloSpec{sni: [][]string{{notionName}}}), 0, 0)
	if !o.denied {
		t.Errorf("SNI %s to %s (an address only another name's answer gave out): %v", notionName, spoofIP4, o)
	}
	wantEvent(t, d, "SNI of another rule to the stuffed address", byClientPort(o.port), "deny", "sni-mismatch")
	// Nor for the name asked: the record's owner was another name.
	o = tp.sendHello(spoofIP4+":443", buildHello(helloSpec{sni: [][]string{{stuffed}}}), 0, 0)
	if !o.denied {
		t.Errorf("SNI %s to %s (a record of another owner in its answer): %v", stuffed, spoofIP4, o)
	}
	wantEvent(t, d, "SNI of the name asked to another owner's address", byClientPort(o.port), "deny", "sni-mismatch")
	// The name's own address is its own (control: the harness can allow).
	o = tp.sendHello(ownIP+":443", buildHello(helloSpec{sni: [][]string{{stuffed}}}), 0, 0)
	if o.denied { // the witness answers "hit", not TLS: o.err is set
		t.Errorf("SNI %s to its own address %s: %v", stuffed, ownIP, o)
	}
	// ntp's name-only UDP rule: its learned set must not hold the address.
	if err := udpExchange(tp, spoofIP4+":123", []byte("ntp?")); err == nil {
		t.Errorf("UDP %s:123 answered: ntp's set took an address the answer gave another name", spoofIP4)
	}
	time.Sleep(200 * time.Millisecond)
	if n := w.hits(spoofIP4+":443") - base; n != 0 {
		t.Errorf("%d connections reached the attacker's %s:443", n, spoofIP4)
	}
	if n := w.hits("udp:"+spoofIP4+":123") - baseUDP; n != 0 {
		t.Errorf("%d datagrams reached the attacker's %s:123", n, spoofIP4)
	}

	// A TTL of 2^31-1 (68 years) is told as the cap (1h).
	m, err := tp.dnsQuery(forever, dns.TypeA, 3*time.Second)
	if err != nil || m.Rcode != dns.RcodeSuccess || len(m.Answer) != 1 {
		t.Fatalf("%s: %v %v", forever, m, err)
	}
	if ttl := m.Answer[0].Header().Ttl; ttl > 3600 {
		t.Errorf("%s: the client is told TTL %d, over the forwarder's 1h cap", forever, ttl)
	}
}
