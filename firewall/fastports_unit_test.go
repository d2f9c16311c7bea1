package firewall

import (
	"slices"
	"testing"

	"egressd/policy"
)

// TestFastPorts: the SYNs queued are those of Config.FastPathPorts (443
// when none) that the proxy would get; a fast port not redirected (a
// TCPPorts list without it) is forwarded by address and never queued.
func TestFastPorts(t *testing.T) {
	p := func(lo, hi uint16) policy.PortRange { return policy.PortRange{Lo: lo, Hi: hi, Proto: policy.TCP} }
	all := []policy.PortRange{{}}
	for _, tc := range []struct {
		name       string
		fast       []policy.PortRange
		redirected []policy.PortRange
		want       []policy.PortRange
	}{
		{"default, every port redirected", nil, all, []policy.PortRange{p(443, 443)}},
		{"default, 443 redirected", nil, []policy.PortRange{p(80, 80), p(443, 443)}, []policy.PortRange{p(443, 443)}},
		{"default, 443 not redirected", nil, []policy.PortRange{p(80, 80)}, nil},
		{"listed, inside a redirected range", []policy.PortRange{p(8443, 8443), p(443, 443)}, []policy.PortRange{p(8000, 9000)}, []policy.PortRange{p(8443, 8443)}},
		{"a range only partly redirected", []policy.PortRange{p(440, 450)}, []policy.PortRange{p(443, 443)}, nil},
		{"listed, every port redirected", []policy.PortRange{p(8443, 8443)}, all, []policy.PortRange{p(8443, 8443)}},
	} {
		got := Config{FastPathPorts: tc.fast}.fastPorts(tc.redirected)
		if !slices.Equal(got, tc.want) {
			t.Errorf("%s: fastPorts = %v, want %v", tc.name, got, tc.want)
		}
	}
}
