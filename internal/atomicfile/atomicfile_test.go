package atomicfile

import (
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
	"time"
)

// entries lists dir's names.
func entries(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

// countSyncs counts syncDir's calls (and still syncs) for the test.
func countSyncs(t *testing.T) *[]string {
	var dirs []string
	orig := syncDir
	syncDir = func(dir string) {
		dirs = append(dirs, dir)
		orig(dir)
	}
	t.Cleanup(func() { syncDir = orig })
	return &dirs
}

func TestWriteFileReplacesAndSyncsDir(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "state.json")
	if err := os.WriteFile(p, []byte("old"), 0o600); err != nil {
		t.Fatal(err)
	}
	syncs := countSyncs(t)
	if err := WriteFile(p, []byte("new"), 0o640, Replace); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(p); err != nil || string(b) != "new" {
		t.Fatalf("content %q, %v; want new", b, err)
	}
	if got := entries(t, dir); !slices.Equal(got, []string{"state.json"}) {
		t.Errorf("directory holds %q, want only state.json (no temporary file)", got)
	}
	if len(*syncs) != 1 || filepath.Clean((*syncs)[0]) != dir {
		t.Errorf("directory syncs %q, want one of %s", *syncs, dir)
	}
}

func TestWriteModeExactWhateverUmask(t *testing.T) {
	old := syscall.Umask(0o077)
	defer syscall.Umask(old)
	dir := t.TempDir()
	for _, perm := range []fs.FileMode{0o600, 0o640, 0o644} {
		p := filepath.Join(dir, "f"+perm.String())
		if err := WriteFile(p, []byte("x"), perm, Replace); err != nil {
			t.Fatal(err)
		}
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != perm {
			t.Errorf("%s: mode %v, want %v", p, fi.Mode().Perm(), perm)
		}
	}
}

func TestWriteFailureRemovesTempKeepsOld(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "state.json")
	if err := os.WriteFile(p, []byte("old"), 0o600); err != nil {
		t.Fatal(err)
	}
	syncs := countSyncs(t)
	boom := errors.New("boom")
	err := Write(p, 0o600, Replace, func(w io.Writer) error {
		io.WriteString(w, "half")
		return boom
	})
	if !errors.Is(err, boom) {
		t.Fatalf("error %v, want the callback's", err)
	}
	if b, _ := os.ReadFile(p); string(b) != "old" {
		t.Errorf("content %q after a failed write, want old", b)
	}
	if got := entries(t, dir); !slices.Equal(got, []string{"state.json"}) {
		t.Errorf("directory holds %q after a failed write, want only state.json", got)
	}
	if len(*syncs) != 0 {
		t.Errorf("directory synced %d times after a failed write", len(*syncs))
	}
}

func TestWriteRenameFailureRemovesTemp(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "state.json")
	// A non-empty directory at the path: the rename fails.
	if err := os.MkdirAll(filepath.Join(p, "x"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := WriteFile(p, []byte("new"), 0o600, Replace); err == nil {
		t.Fatal("no error renaming over a non-empty directory")
	}
	if got := entries(t, dir); !slices.Equal(got, []string{"state.json"}) {
		t.Errorf("directory holds %q, want only state.json", got)
	}
}

func TestExclusiveCreatesAndRefusesExisting(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "ca.key")
	syncs := countSyncs(t)
	if err := WriteFile(p, []byte("first"), 0o600, Exclusive); err != nil {
		t.Fatal(err)
	}
	err := WriteFile(p, []byte("second"), 0o600, Exclusive)
	if !errors.Is(err, fs.ErrExist) {
		t.Fatalf("second exclusive write: %v, want fs.ErrExist", err)
	}
	if b, _ := os.ReadFile(p); string(b) != "first" {
		t.Errorf("content %q, want the first write's", b)
	}
	if got := entries(t, dir); !slices.Equal(got, []string{"ca.key"}) {
		t.Errorf("directory holds %q, want only ca.key", got)
	}
	if len(*syncs) != 1 {
		t.Errorf("directory synced %d times, want once (the link)", len(*syncs))
	}
}

func TestRemoveTemps(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "learned.ndjson")
	for _, name := range []string{"learned.ndjson", "learned.ndjson.tmp", "learned.ndjson.tmp12", "learned.ndjson.tmp34x", "other.tmp56", "learned.ndjson.tmp78"} {
		if err := os.WriteFile(filepath.Join(dir, name), nil, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	// A link with a temporary file's name is not followed or removed.
	if err := os.Symlink("learned.ndjson", filepath.Join(dir, "learned.ndjson.tmp90")); err != nil {
		t.Fatal(err)
	}
	removed := RemoveTemps(p)
	if !slices.Equal(removed, []string{"learned.ndjson.tmp12", "learned.ndjson.tmp78"}) {
		t.Errorf("removed %q", removed)
	}
	want := []string{"learned.ndjson", "learned.ndjson.tmp", "learned.ndjson.tmp34x", "learned.ndjson.tmp90", "other.tmp56"}
	if got := entries(t, dir); !slices.Equal(got, want) {
		t.Errorf("directory holds %q, want %q", got, want)
	}
}

// A killed write's temporary file has the name RemoveTemps removes.
func TestTempNameMatchesRemoveTemps(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "summary.json")
	var tmp string
	Write(p, 0o600, Replace, func(w io.Writer) error {
		tmp = filepath.Base(w.(*os.File).Name())
		// Stand in for a kill: a copy of the temporary file stays.
		return os.WriteFile(filepath.Join(dir, tmp+"0"), nil, 0o600)
	})
	if got := RemoveTemps(p); !slices.Equal(got, []string{tmp + "0"}) {
		t.Errorf("RemoveTemps removed %q, want %q", got, tmp+"0")
	}
}

// RemoveStaleTemps leaves a temporary file modified since before: another
// process's write in progress.
func TestRemoveStaleTemps(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "ca.key")
	now := time.Now()
	for name, age := range map[string]time.Duration{"ca.key.tmp1": time.Hour, "ca.key.tmp2": 0, "ca.key.tmp3": 2 * time.Minute} {
		f := filepath.Join(dir, name)
		if err := os.WriteFile(f, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(f, now.Add(-age), now.Add(-age)); err != nil {
			t.Fatal(err)
		}
	}
	removed := RemoveStaleTemps(p, now.Add(-time.Minute))
	slices.Sort(removed)
	if !slices.Equal(removed, []string{"ca.key.tmp1", "ca.key.tmp3"}) {
		t.Errorf("removed %q, want the two older than a minute", removed)
	}
	if got := entries(t, dir); !slices.Equal(got, []string{"ca.key.tmp2"}) {
		t.Errorf("directory holds %q, want the fresh temporary file", got)
	}
}

// Remove syncs the directory after it removed the file, and reports a
// missing file as os.Remove does (no sync then).
func TestRemoveSyncsDir(t *testing.T) {
	syncs := countSyncs(t)
	dir := t.TempDir()
	p := filepath.Join(dir, "policy.pending.json")
	if err := os.WriteFile(p, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := Remove(p); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(*syncs, []string{dir}) {
		t.Errorf("synced %q, want the directory %q once", *syncs, dir)
	}
	if err := Remove(p); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("second Remove: %v, want ErrNotExist", err)
	}
	if len(*syncs) != 1 {
		t.Errorf("synced %q after a failed remove", *syncs)
	}
}
