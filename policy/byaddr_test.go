package policy

import (
	"net/netip"
	"testing"
)

// TestDecideLearnedReason: a flow without a name of its own, to an address
// DNS gave out for a name whose rule does not allow it, is denied with the
// name's reason where the address's is only no-rule, so the report says
// what policy explain says of the name (a silent connection to an allowed
// name's address on a port its rule lacks said no-rule, the same name's
// request with a Host port-not-allowed). An address's own reason (a CIDR
// rule's port) stands, and the first name's no-rule changes nothing.
func TestDecideLearnedReason(t *testing.T) {
	e := mustCompile(t, `version: 1
rules:
  - name: api
    to: [api.example.com]
    ports: [443/tcp]
  - name: lab
    from: [192.0.2.99]
    to: [lab.example.com]
    ports: [443/tcp]
  - name: net
    to: [203.0.113.0/24]
    ports: [22/tcp]
`)
	for _, tc := range []struct {
		dest   string
		port   uint16
		names  []string
		reason string
		i      int
	}{
		{"198.51.100.7", 5229, []string{"api.example.com"}, ReasonPort, 0},
		{"198.51.100.7", 443, []string{"lab.example.com"}, ReasonClient, 0},
		{"198.51.100.7", 443, []string{"other.example.com", "api.example.com"}, ReasonNoRule, 1},
		{"198.51.100.7", 5229, []string{"other.example.com", "api.example.com"}, ReasonNoRule, 0},
		{"203.0.113.5", 5229, []string{"api.example.com"}, ReasonPort, 0},
		{"198.51.100.7", 5229, nil, ReasonNoRule, -1},
	} {
		in := Input{Client: netip.MustParseAddr("192.0.2.10"), Dest: netip.MustParseAddr(tc.dest), Port: tc.port, Proto: TCP}
		d, i := e.DecideLearned(in, e.Decide(in), tc.names)
		if tc.i == 1 {
			// the second name allows it
			if !d.Allowed() || i != 1 {
				t.Errorf("%s:%d %v: %+v %d, want allowed by the second name", tc.dest, tc.port, tc.names, d, i)
			}
			continue
		}
		if d.Allowed() || d.Reason != tc.reason || i != tc.i {
			t.Errorf("%s:%d %v: %+v index %d, want denied %s index %d", tc.dest, tc.port, tc.names, d, i, tc.reason, tc.i)
		}
	}
}
