package audit

import (
	"log/slog"
	"net/netip"
	"strings"
	"testing"
)

// TestAppendFlowAttrs: with every optional field set (a name, path and
// front over their bounds, so with their lengths), a flow line has
// FlowAttrsMax attributes (the callers' arrays are sized by it), appended
// after what the slice held.
func TestAppendFlowAttrs(t *testing.T) {
	ev := Event{Kind: KindFlow, Client: netip.MustParseAddr("192.0.2.10"), ClientMAC: "aa:bb:cc:dd:ee:ff",
		Dest: netip.MustParseAddr("198.51.100.7"), DestPort: 443, Proto: "tcp", Name: strings.Repeat("n", 300),
		NameSource: NameSNI, Path: strings.Repeat("/x", 2000), Front: strings.Repeat("f", 256), Verdict: "allow", Rule: "r", Mode: "audit", BytesOut: 1, BytesIn: 2,
		Duration: 0.5, Close: "eof"}
	first := slog.String("first", "kept")
	got := ev.AppendFlowAttrs([]slog.Attr{first})
	if len(got) != 1+FlowAttrsMax {
		t.Fatalf("%d attributes, want 1 + FlowAttrsMax (%d): %v", len(got), FlowAttrsMax, got)
	}
	// The kind comes first: a flow's line and a request's read alike
	// otherwise (DESIGN.md, Events: every event has its kind).
	if !got[0].Equal(first) || got[1].Key != LogKind || got[1].Value.String() != "flow" || got[2].Key != LogClient || got[2].Value.String() != "192.0.2.10" || got[len(got)-1].Key != LogClose {
		t.Fatalf("attributes: %v", got)
	}
	seen := map[string]bool{}
	for _, a := range got[1:] {
		if seen[a.Key] {
			t.Fatalf("key %q twice: %v", a.Key, got)
		}
		seen[a.Key] = true
	}
	ev.ClientMAC, ev.Name, ev.Path, ev.Front = "", "www.allowed.test", "", ""
	if n := len(ev.AppendFlowAttrs(nil)); n != FlowAttrsMax-6 {
		t.Fatalf("without MAC, path and front, a short name: %d attributes, want %d", n, FlowAttrsMax-6)
	}
}

// TestAppendFlowAttrsNoDest: a flow decided before it had an address (the
// explicit proxy's request whose name did not resolve, resolve-failed) has
// an empty dest on its line, as its event has none; before, the line said
// "dest":"invalid IP" (netip.Addr's String of the zero address).
func TestAppendFlowAttrsNoDest(t *testing.T) {
	ev := Event{Kind: KindFlow, Client: netip.MustParseAddr("192.0.2.10"), DestPort: 80, Proto: "tcp", Name: "example.com",
		NameSource: NameHost, Verdict: "deny", Mode: "audit", Reason: "resolve-failed"}
	for _, a := range ev.AppendFlowAttrs(nil) {
		if a.Key == LogDest && a.Value.String() != "" {
			t.Errorf("dest %q for a flow with no address; want empty", a.Value.String())
		}
	}
}
