package dnsfilter

import (
	"log/slog"
	"strings"
	"testing"

	"github.com/miekg/dns"
)

// TestTruncateUndecodable: an answer too big for the client's UDP size
// that does not unpack (here the rendered answer cut short by
// truncatedWire), so that it cannot be truncated, is SERVFAIL to the
// question asked, logged at Error with why; it sent nothing, and the
// client waited out its timeout while the line said NOERROR. UDP's miss
// and hit (the fast path's query, never unpacked); TCP's answer is whole.
func TestTruncateUndecodable(t *testing.T) {
	up := newFakeUpstream(t, labZone+bigTXT(80))
	logs := &syncBuffer{}
	s, err := New(Config{Listen: []string{"127.0.0.1:0"}, UDPReaders: 2, ClientRate: -1, Upstreams: []string{up.Addr}},
		Deps{Policy: compile(t, enforcePolicy), Sink: &recSink{}, Logger: slog.New(slog.NewJSONHandler(logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	s.truncatedWire = func(w []byte) []byte { return w[:len(w)-1] }
	runServer(t, s, nil)
	addr := s.Addrs()[0].String()
	const name = "BiG.allowed.test."
	for i := range 2 { // a miss, then a hit
		r, err := tryAsk("udp", addr, name, dns.TypeTXT, true)
		if err != nil {
			t.Errorf("udp #%d, its answer undecodable: %v; want SERVFAIL", i, err)
			continue
		}
		if r.Rcode != dns.RcodeServerFailure || len(r.Answer) != 0 || len(r.Question) != 1 || r.Question[0].Name != name {
			t.Errorf("udp #%d: rcode %s, %d records, question %v; want SERVFAIL to the question asked", i, dns.RcodeToString[r.Rcode], len(r.Answer), r.Question)
		}
	}
	if r := ask(t, "tcp", addr, name, dns.TypeTXT, true); r.Rcode != dns.RcodeSuccess || len(r.Answer) != 80 {
		t.Errorf("tcp: rcode %s, %d records; want the 80", dns.RcodeToString[r.Rcode], len(r.Answer))
	}
	// Each line is written after its answer is sent, by the goroutine
	// that answered: the client may have its next answer before the
	// last line is out, so the lines are told apart by proto and
	// cache_hit, not by their order.
	waitFor(t, func() bool { return len(nameLines(logs, "big.allowed.test")) >= 3 })
	lines := nameLines(logs, "big.allowed.test")
	udp, tcp := linesWith(lines, `"proto":"udp"`), linesWith(lines, `"proto":"tcp"`)
	if len(udp) != 2 || len(tcp) != 1 || len(linesWith(udp, `"cache_hit":false`)) != 1 {
		t.Errorf("%d udp lines (want a miss and a hit), %d tcp (want 1):\n%s", len(udp), len(tcp), strings.Join(lines, "\n"))
	}
	for _, l := range udp {
		if !strings.Contains(l, `"level":"ERROR"`) || !strings.Contains(l, `cannot be truncated`) || !strings.Contains(l, `"rcode":"SERVFAIL"`) {
			t.Errorf("line %s\nwant ERROR, SERVFAIL, why", l)
		}
	}
	for _, l := range tcp {
		if !strings.Contains(l, `"level":"INFO"`) || !strings.Contains(l, `"rcode":"NOERROR"`) {
			t.Errorf("line %s\nwant INFO, NOERROR", l)
		}
	}
}

// linesWith are the lines that hold s, in the order given.
func linesWith(lines []string, s string) (out []string) {
	for _, l := range lines {
		if strings.Contains(l, s) {
			out = append(out, l)
		}
	}
	return out
}

// nameLines are the canonical lines logs holds for name.
func nameLines(logs *syncBuffer, name string) (out []string) {
	for _, l := range strings.Split(logs.String(), "\n") {
		if strings.Contains(l, `"name":"`+name+`"`) {
			out = append(out, l)
		}
	}
	return out
}
