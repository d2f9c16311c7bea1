package dnsfilter

import (
	"encoding/json"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"

	"egressd/audit"
)

// TestDecisionLineBoundsName: a question name of binary labels reads as
// up to 1,004 bytes (each octet as \DDD). The event log cuts it to 255
// bytes, with name_len; the decision line must show the same value, as
// the proxy's and capture's lines do (README, "The event log").
func TestDecisionLineBoundsName(t *testing.T) {
	var logs syncBuffer
	ts := startServer(t, gatePolicy, Config{}, Deps{Logger: slog.New(slog.NewJSONHandler(&logs, nil))})
	lab := func(n int) string { return strings.Repeat(`\001`, n) }
	name := lab(63) + "." + lab(63) + "." + lab(63) + "." + lab(61) + "."
	if r := ask(t, "udp", ts.Addr, name, dns.TypeA, false); r.Rcode != dns.RcodeRefused {
		t.Fatalf("a binary name: %s, want REFUSED", dns.RcodeToString[r.Rcode])
	}
	var ev audit.Event
	deadline := time.Now().Add(10 * time.Second)
	for {
		if evs := ts.Sink.Events(); len(evs) > 0 {
			ev = evs[len(evs)-1]
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no event")
		}
		time.Sleep(10 * time.Millisecond)
	}
	ev.Bound()
	var line struct {
		Name    string `json:"name"`
		NameLen int    `json:"name_len"`
	}
	for l := range strings.Lines(logs.String()) {
		if strings.Contains(l, `"kind":"dns"`) {
			if err := json.Unmarshal([]byte(l), &line); err != nil {
				t.Fatal(err)
			}
		}
	}
	if ev.NameLen == 0 {
		t.Fatalf("the event's name of %d bytes was not cut", len(ev.Name))
	}
	if line.Name != ev.Name || line.NameLen != ev.NameLen {
		t.Errorf("the decision line's name: %d bytes, name_len %d; the event log's: %d bytes, name_len %d",
			len(line.Name), line.NameLen, len(ev.Name), ev.NameLen)
	}
}
