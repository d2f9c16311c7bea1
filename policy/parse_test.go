package policy

import "testing"

// TestCheckTarget: CheckTarget takes what a rule's "to" takes.
func TestCheckTarget(t *testing.T) {
	for s, ok := range map[string]bool{
		"example.com": true, "*.example.com": true, "198.51.100.7": true, "2001:db8::/32": true,
		"0": false, "1.2.3": false, "*.nip.io": false, "fe80::1%eth0": false, "a..b": false, "": false,
	} {
		if err := CheckTarget(s); (err == nil) != ok {
			t.Errorf("CheckTarget(%q) = %v, want ok %v", s, err, ok)
		}
	}
}
