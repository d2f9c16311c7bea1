package audit

import (
	"net"
	"strings"
	"testing"
)

var macForms = []string{
	"02:00:5e:10:00:01", "02-00-5E-10-00-01", "aA:bB:cC:dD:eE:fF", "00:00:00:00:00:00", "ff:ff:ff:ff:ff:ff",
	"02:00:5e:10:00:0g", "02:00:5e:10:00:1", "02:00:5e:10:00:011", "02.00.5e.10.00.01", "02:00-5e:10:00:01",
	"0200.5e10.0001", "+2:00:5e:10:00:01", "02:00:5e:10:00: 1", "", "02:00:5e:10:00:01:02:03",
}

// checkParseMAC6: parseMAC6 reads what net.ParseMAC reads of a 6-byte
// MAC in colon form, either case, with any of its colons a dash, and
// refuses the rest.
func checkParseMAC6(t *testing.T, s string) {
	m, ok := parseMAC6(s)
	hw, err := net.ParseMAC(strings.ReplaceAll(s, "-", ":"))
	want := err == nil && len(s) == 17 // not net.ParseMAC's dotted nor bare forms
	if ok != want || ok && string(m[:]) != string(hw) {
		t.Errorf("parseMAC6(%q) = %v, %v; net.ParseMAC: %v, %v", s, m, ok, hw, err)
	}
}

// TestParseMAC6: the forms of checkParseMAC6, and no allocation, read
// or refused.
func TestParseMAC6(t *testing.T) {
	for _, s := range macForms {
		checkParseMAC6(t, s)
	}
	for _, s := range []string{"02:00:5e:10:00:01", "02:00:5e:10:00:0g"} {
		if n := testing.AllocsPerRun(100, func() { parseMAC6(s) }); n != 0 {
			t.Errorf("parseMAC6(%q): %v allocations, want none", s, n)
		}
	}
}

func FuzzParseMAC6(f *testing.F) {
	for _, s := range macForms {
		f.Add(s)
	}
	f.Fuzz(checkParseMAC6)
}
