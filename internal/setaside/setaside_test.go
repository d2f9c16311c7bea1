package setaside

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

// TestKeepEachBounded: every refusal is kept under a name of its own,
// the newest Max of them; an older egressd's unnumbered .refused and
// other files beside it are left alone.
func TestKeepEachBounded(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "state.json")
	for _, other := range []string{"state.json.refused", "state.json.refused.x", "other.json.refused.1"} {
		if err := os.WriteFile(filepath.Join(dir, other), []byte(other), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	const n = Max + 3
	for i := 1; i <= n; i++ {
		if err := os.WriteFile(p, []byte(fmt.Sprint(i)), 0o600); err != nil {
			t.Fatal(err)
		}
		name, err := Keep(p)
		if err != nil {
			t.Fatal(err)
		}
		if want := fmt.Sprintf("state.json.refused.%d", i); name != want {
			t.Errorf("refusal %d kept as %q, want %q", i, name, want)
		}
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("refusal %d: the file is still in place: %v", i, err)
		}
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, e := range ents {
		got = append(got, e.Name())
	}
	want := []string{"other.json.refused.1", "state.json.refused", "state.json.refused.x"}
	for i := n - Max + 1; i <= n; i++ {
		want = append(want, fmt.Sprintf("state.json.refused.%d", i))
	}
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Errorf("files:\n%q\nwant:\n%q", got, want)
	}
	for i := n - Max + 1; i <= n; i++ {
		if b, _ := os.ReadFile(filepath.Join(dir, fmt.Sprintf("state.json.refused.%d", i))); string(b) != fmt.Sprint(i) {
			t.Errorf("state.json.refused.%d holds %q, want refusal %d's", i, b, i)
		}
	}
}
