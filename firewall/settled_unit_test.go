package firewall

import "testing"

// TestMarksSettled: the marks carry the installed ruleset's tags alone
// once since holds it alone (a look at the connections went through);
// not while rulesets before it are still in play.
func TestMarksSettled(t *testing.T) {
	a, b := renderEnforce(t, "  - {name: a, to: [192.0.2.1/32], ports: [9/udp]}\n"), renderEnforce(t, "  - {name: b, to: [192.0.2.2/32], ports: [9/udp]}\n")
	f := &Firewall{}
	if !f.MarksSettled() {
		t.Error("nothing installed: not settled")
	}
	f.rs, f.since = b, []*Ruleset{a, b}
	if f.MarksSettled() {
		t.Error("settled with the ruleset before still in play")
	}
	f.since = []*Ruleset{b}
	if !f.MarksSettled() {
		t.Error("not settled with the installed ruleset alone")
	}
}
