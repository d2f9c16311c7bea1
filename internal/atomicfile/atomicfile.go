// Package atomicfile writes a state file so that a crash or a power cut
// leaves the old file or the new one at its path, never a torn or empty
// one: the bytes go to a temporary file beside it (NAME.tmp and digits,
// os.CreateTemp's names), given its mode and synced, which is then
// renamed over the path (or, to create only, linked to it), and the
// directory is synced so that the rename itself is durable. A write that
// fails removes its temporary file; one a kill interrupts leaves it, for
// RemoveTemps at the next start.
//
// It sits at the end of each state file's save: the policy's copy and
// its firewall record, the learned addresses' table, the ledger's
// summary and the inspection CA's key and certificate. Errors are the os
// package's, naming the file; callers add what was being written.
package atomicfile

import (
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// How says how the written file goes into place.
type How int

const (
	// Replace renames the file over whatever is at the path.
	Replace How = iota
	// Exclusive links the file to the path, failing (fs.ErrExist) when
	// something is there already: of two processes racing to create the
	// file, one wins and the other sees the winner's whole file.
	Exclusive
)

// tempSuffix is what a temporary file's name adds to the file's, before
// os.CreateTemp's digits.
const tempSuffix = ".tmp"

// Write writes the file at path with what write writes to it, with mode
// perm exactly (the umask does not apply), placed as how says. The
// directory must exist.
func Write(path string, perm fs.FileMode, how How, write func(io.Writer) error) error {
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	f, err := os.CreateTemp(dir, base+tempSuffix+"*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	// After the rename nothing is there; after the link the file stays at
	// path.
	defer os.Remove(tmp)
	err = f.Chmod(perm)
	if err == nil {
		err = write(f)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	if how == Exclusive {
		err = os.Link(tmp, path)
	} else {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		return err
	}
	syncDir(dir)
	return nil
}

// syncDir syncs the directory dir, making a rename or link in it durable;
// best effort: the file is in place whether or not this succeeds. A
// variable for the tests to count its calls.
var syncDir = func(dir string) {
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
}

// WriteFile writes data as the file at path, as Write does.
func WriteFile(path string, data []byte, perm fs.FileMode, how How) error {
	return Write(path, perm, how, func(w io.Writer) error {
		_, err := w.Write(data)
		return err
	})
}

// Remove removes the file at path and syncs its directory, so that a
// power cut does not bring the file back. Its error is os.Remove's.
func Remove(path string) error {
	if err := os.Remove(path); err != nil {
		return err
	}
	dir := filepath.Dir(path)
	syncDir(dir)
	return nil
}

// RemoveTemps removes the temporary files of path's writes that a kill
// interrupted (regular files only: it follows no links) and returns the
// names it removed, without the directory. Only for a file that one
// process writes: another's write in progress would lose its temporary
// file (RemoveStaleTemps).
func RemoveTemps(path string) []string {
	return removeTemps(path, time.Time{})
}

// RemoveStaleTemps is RemoveTemps for a file that several processes may
// write at once (the inspection CA: egressd run and egressd ca export):
// it removes only the temporary files last modified before before, which
// no write in progress can have (a write takes milliseconds).
func RemoveStaleTemps(path string, before time.Time) []string {
	return removeTemps(path, before)
}

// removeTemps removes path's temporary files, those modified before
// before if it is not zero.
func removeTemps(path string, before time.Time) []string {
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil
	}
	var removed []string
	for _, e := range ents {
		rest, ok := strings.CutPrefix(e.Name(), base+tempSuffix)
		if !ok || rest == "" || strings.Trim(rest, "0123456789") != "" || !e.Type().IsRegular() {
			continue
		}
		if !before.IsZero() {
			if fi, err := e.Info(); err != nil || !fi.ModTime().Before(before) {
				continue
			}
		}
		if os.Remove(filepath.Join(dir, e.Name())) == nil {
			removed = append(removed, e.Name())
		}
	}
	return removed
}
