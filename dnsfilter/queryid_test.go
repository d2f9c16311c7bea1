package dnsfilter

import (
	"net"
	"slices"
	"testing"
	"time"

	"github.com/miekg/dns"

	"egressd/audit"
)

// TestEventQueryID: every query's event carries the query's DNS message
// ID, whichever path answered it (a miss, a cache hit, a local refusal
// on the fast path; the general path over TCP), so that the ledger tells
// queries from one socket apart (audit.Event.QueryID) and counts a
// retransmission, which keeps its ID, once.
func TestEventQueryID(t *testing.T) {
	up := newFakeUpstream(t, labZone)
	ts := startServer(t, enforcePolicy, Config{Upstreams: []string{up.Addr}}, Deps{})
	c, err := net.Dial("udp", ts.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	asks := []struct {
		name string
		id   uint16
	}{
		{"www.allowed.test.", 4101}, // a miss
		{"www.allowed.test.", 4102}, // a cache hit
		{"www.denied.test.", 4103},  // refused
		{"www.allowed.test.", 4102}, // the hit's retransmission
	}
	var want []uint16
	buf := make([]byte, 4096)
	for _, a := range asks {
		m := new(dns.Msg)
		m.SetQuestion(a.name, dns.TypeA)
		m.Id = a.id
		b, _ := m.Pack()
		if _, err := c.Write(b); err != nil {
			t.Fatal(err)
		}
		c.SetReadDeadline(time.Now().Add(6 * time.Second))
		n, err := c.Read(buf)
		if err != nil {
			t.Fatalf("%s id %d: %v", a.name, a.id, err)
		}
		r := new(dns.Msg)
		if err := r.Unpack(buf[:n]); err != nil || r.Id != a.id {
			t.Fatalf("%s id %d: answer id %d, %v", a.name, a.id, r.Id, err)
		}
		want = append(want, a.id)
	}
	m := new(dns.Msg)
	m.SetQuestion("api.allowed.test.", dns.TypeA)
	m.Id = 4104
	if _, _, err := (&dns.Client{Net: "tcp", Timeout: 6 * time.Second}).Exchange(m, ts.Addr); err != nil {
		t.Fatal(err)
	}
	want = append(want, 4104)
	var got []uint16
	for i := 0; i < 100 && len(got) < len(want); i++ { // events of misses come from their goroutine
		got = got[:0]
		for _, ev := range ts.Sink.Events() {
			if ev.Kind == audit.KindDNS {
				got = append(got, ev.QueryID)
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Errorf("events' query IDs %v, want %v", got, want)
	}
}
