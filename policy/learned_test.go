package policy

import (
	"slices"
	"testing"
)

// TestKeepsLearned: a rule of the same name keeps a connection its learned
// addresses let out while it holds every name it had (a port or a name
// added), not once it drops one, nor where it had none (a CIDR rule).
// LearnedNames takes the names and host/path hosts, sorted, once each.
func TestKeepsLearned(t *testing.T) {
	names := func(to string) []string {
		t.Helper()
		e, err := Compile("t.yaml", []byte("version: 1\nmode: audit\nrules:\n  - name: r\n    to: "+to+"\n    ports: [443/tcp]\n"))
		if err != nil {
			t.Fatal(err)
		}
		return LearnedNames(e.Rules()[0])
	}
	bc := names("[c.example.test, b.example.test, b.example.test/api/*, 203.0.113.0/24]")
	if want := []string{"b.example.test", "c.example.test"}; !slices.Equal(bc, want) {
		t.Fatalf("LearnedNames %q, want %q", bc, want)
	}
	for _, tc := range []struct {
		was, now []string
		want     bool
	}{
		{bc, bc, true},
		{bc, names("[b.example.test, c.example.test, d.example.test]"), true},
		{bc, names("[b.example.test]"), false},
		{names("[203.0.113.0/24]"), names("[203.0.113.0/24]"), false},
	} {
		if got := KeepsLearned(tc.was, tc.now); got != tc.want {
			t.Errorf("KeepsLearned(%q, %q) = %v, want %v", tc.was, tc.now, got, tc.want)
		}
	}
}
