package audit

import (
	"bytes"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"egressd/policy"
)

// TestSuggestFromMAC: a suggestion names a client by its MAC when the
// report knows it (every address of the device seen with that one MAC),
// so that it still holds when the DHCP lease changes; an address seen
// with no MAC, or with several (a lease that changed hands), stays an
// address. The snippet passes policy check (compiles, and warns only
// that clients are named by MAC), allows the device at a new address, and
// not another device at the old one.
func TestSuggestFromMAC(t *testing.T) {
	const camMAC, oldMAC, newMAC = "aa:bb:cc:00:00:0a", "aa:bb:cc:00:00:0b", "aa:bb:cc:00:00:0c"
	l := NewLedger(nil, LedgerOptions{})
	deny := captureDenials(l)
	deny("cam.example", "192.168.50.23", camMAC) // a dual-stack camera: one device
	deny("cam.example", "fd00::23", camMAC)
	deny("nomac.example", "192.168.50.30", "")      // seen without a MAC
	deny("shared.example", "192.168.50.40", oldMAC) // a lease that changed hands
	deny("shared.example", "192.168.50.40", newMAC)
	deny("mixed.example", "192.168.50.23", camMAC)
	deny("mixed.example", "192.168.50.31", "")
	r := l.Report(ReportOptions{Now: reportNow})
	sugs, _ := r.Suggest()
	from := map[string][]string{}
	for _, s := range sugs {
		from[s.To[0]] = s.From
	}
	for to, want := range map[string][]string{
		"cam.example":    {camMAC},
		"nomac.example":  {"192.168.50.30"},
		"shared.example": {"192.168.50.40"},
		"mixed.example":  {"192.168.50.31", camMAC},
	} {
		if !slices.Equal(from[to], want) {
			t.Errorf("%s: from %q, want %q", to, from[to], want)
		}
	}

	var snip bytes.Buffer
	if err := r.WriteSuggestions(&snip); err != nil {
		t.Fatal(err)
	}
	eng, err := policy.Compile("pasted.yaml", []byte(suggestBase+snip.String()))
	if err != nil {
		t.Fatalf("the pasted suggestions do not compile: %v\n%s", err, snip.String())
	}
	for _, w := range eng.Warnings() {
		if !strings.Contains(w.Msg, "clients by MAC address") {
			t.Errorf("warning: %s", w.Msg)
		}
	}
	if !strings.Contains(snip.String(), `from: ["`+camMAC+`"]`) {
		t.Errorf("the snippet does not name the camera by MAC:\n%s", snip.String())
	}
	decide := func(client, mac string) policy.Decision {
		in := policy.Input{Client: netip.MustParseAddr(client), Dest: netip.MustParseAddr("203.0.113.9"), Port: 443, Proto: policy.TCP,
			Name: "cam.example", Now: t0}
		if mac != "" {
			in.ClientMAC, _ = net.ParseMAC(mac)
		}
		return eng.Decide(in)
	}
	if d := decide("192.168.50.77", camMAC); !d.Allowed() {
		t.Errorf("the camera at its next lease's address is denied (%s)", d.Reason)
	}
	if d := decide("192.168.50.23", oldMAC); d.Allowed() {
		t.Errorf("another device at the camera's old address is allowed (rule %s)", d.Rule)
	}
	if t.Failed() {
		t.Logf("suggestions:\n%s", snip.String())
	}
}

// captureDenials returns a function that adds to l capture's audit-mode
// record of a denied flow from client (with mac, "" for none) to name's
// 203.0.113.9:443, each a second after the last.
func captureDenials(l *Ledger) func(name, client, mac string) {
	n := 0
	return func(name, client, mac string) {
		n++
		ev := Event{Kind: KindFlow, Source: SourceCapture, Time: t0.Add(time.Duration(n) * time.Second),
			Client: netip.MustParseAddr(client), ClientPort: uint16(40000 + n), ClientMAC: mac,
			Dest: netip.MustParseAddr("203.0.113.9"), DestPort: 443, Proto: "tcp", Name: name,
			Verdict: policy.Deny, Reason: policy.ReasonNoRule, Mode: policy.ModeAudit}
		l.add(&ev)
	}
}
