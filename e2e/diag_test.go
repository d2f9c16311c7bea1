package e2e

import (
	"fmt"
	"slices"
	"strings"
	"testing"
)

// digGaps explains a dns rule count that is off: of the digs' source
// ports (digBasePort + n), those with no flow of capture to port 53 in
// the event log, each with whether the forwarder recorded the query (the
// query reached it: capture missed the packets) or not (lost before the
// gateway, or dig did not send it), and those with more than one flow;
// then the lookups from other ports (the Go resolver's, drawn at random),
// with capture's flows and the forwarder's queries from each, where the
// two disagree. "" when every dig port has exactly one flow and the
// others agree.
func digGaps(ports []int, evs []flowEvent) string {
	flows, queries := map[int]int{}, map[int][]string{}
	for _, ev := range evs {
		switch {
		case ev.Kind == "flow" && ev.Source == "capture" && ev.DestPort == 53:
			flows[ev.ClientPort]++
		case ev.Kind == "dns":
			queries[ev.ClientPort] = append(queries[ev.ClientPort], ev.Name+" "+ev.QType+" "+ev.RCode)
		}
	}
	var missing, twice []string
	for _, p := range ports {
		switch n := flows[p]; {
		case n == 0 && len(queries[p]) > 0:
			missing = append(missing, fmt.Sprintf("%d (the forwarder answered %s: capture missed it)", p, strings.Join(queries[p], ", ")))
		case n == 0:
			missing = append(missing, fmt.Sprintf("%d (the forwarder recorded no query from it either)", p))
		case n > 1:
			twice = append(twice, fmt.Sprintf("%d (%d flows)", p, n))
		}
	}
	var others []string
	ports2 := map[int]bool{}
	for p := range flows {
		ports2[p] = true
	}
	for p := range queries {
		ports2[p] = true
	}
	var rest []int
	for p := range ports2 {
		if !slices.Contains(ports, p) && flows[p] != 1 {
			rest = append(rest, p)
		}
	}
	slices.Sort(rest)
	for _, p := range rest {
		others = append(others, fmt.Sprintf("%d: %d capture flows, forwarder queries [%s]", p, flows[p], strings.Join(queries[p], ", ")))
	}
	var b strings.Builder
	if len(others) > 0 {
		fmt.Fprintf(&b, "other ports (not digs) whose capture flows and forwarder queries disagree: %s", strings.Join(others, "; "))
	}
	if len(missing) > 0 {
		if b.Len() > 0 {
			b.WriteString("; ")
		}
		fmt.Fprintf(&b, "dig source ports with no capture flow to port 53: %s", strings.Join(missing, "; "))
	}
	if len(twice) > 0 {
		if b.Len() > 0 {
			b.WriteString("; ")
		}
		fmt.Fprintf(&b, "dig source ports with more than one: %s", strings.Join(twice, "; "))
	}
	return b.String()
}

// TestDigGaps: the diagnosis of TestGateway's dns flow count names the
// dig whose flow capture did not record, and says whether the forwarder
// saw its query.
func TestDigGaps(t *testing.T) {
	evs := []flowEvent{
		{Kind: "flow", Source: "capture", ClientPort: 20001, DestPort: 53},
		{Kind: "dns", Source: "dnsfilter", ClientPort: 20001, Name: "a.test", QType: "A", RCode: "NOERROR"},
		{Kind: "dns", Source: "dnsfilter", ClientPort: 20002, Name: "b.test", QType: "A", RCode: "NOERROR"},
		{Kind: "flow", Source: "capture", ClientPort: 20004, DestPort: 53},
		{Kind: "flow", Source: "capture", ClientPort: 20004, DestPort: 53},
		{Kind: "flow", Source: "capture", ClientPort: 20005, DestPort: 443},
		// A Go resolver's lookups: one recorded by both, one by the
		// forwarder only.
		{Kind: "flow", Source: "capture", ClientPort: 41000, DestPort: 53},
		{Kind: "dns", Source: "dnsfilter", ClientPort: 41000, Name: "c.test", QType: "A", RCode: "NOERROR"},
		{Kind: "dns", Source: "dnsfilter", ClientPort: 42000, Name: "d.test", QType: "A", RCode: "NOERROR"},
	}
	got := digGaps([]int{20001, 20002, 20003, 20004}, evs)
	for _, want := range []string{"20002 (the forwarder answered b.test A NOERROR: capture missed it)", "20003 (the forwarder recorded no query from it either)", "20004 (2 flows)", "42000: 0 capture flows, forwarder queries [d.test A NOERROR]"} {
		if !strings.Contains(got, want) {
			t.Errorf("digGaps: %q lacks %q", got, want)
		}
	}
	if strings.Contains(got, "20001") || strings.Contains(got, "20005") || strings.Contains(got, "41000") {
		t.Errorf("digGaps names a port that is fine: %q", got)
	}
	if got := digGaps([]int{20001}, evs[:2]); got != "" {
		t.Errorf("digGaps with nothing missing: %q", got)
	}
}
