package proxy

import (
	"bytes"
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func caPublicKey(t *testing.T, certPEM []byte) []byte {
	t.Helper()
	b, _ := pem.Decode(certPEM)
	if b == nil {
		t.Fatal("no PEM certificate")
	}
	c, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c.RawSubjectPublicKeyInfo
}

// TestLoadOrCreateCAFiles: the CA is made once, with its key 0600, and no
// temporary file is left beside it; a key left without its certificate (a
// creation cut short) gets a certificate for that key instead of a start
// that fails until someone deletes the key; a certificate without its key,
// or a key that does not parse, is a clear error.
func TestLoadOrCreateCAFiles(t *testing.T) {
	dir := t.TempDir()
	_, first, err := LoadOrCreateCA(dir)
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(filepath.Join(dir, CAKeyFile)); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("key file: %v, %v; want mode 0600", fi, err)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 2 {
		t.Errorf("state directory holds %d files, want the certificate and the key", len(ents))
	}
	if _, again, err := LoadOrCreateCA(dir); err != nil || !bytes.Equal(again, first) {
		t.Fatalf("second load: %v; same certificate %v", err, bytes.Equal(again, first))
	}

	// The key alone: a certificate is made for it.
	if err := os.Remove(filepath.Join(dir, CACertFile)); err != nil {
		t.Fatal(err)
	}
	c, remade, err := LoadOrCreateCA(dir)
	if err != nil {
		t.Fatalf("key without certificate: %v", err)
	}
	if !bytes.Equal(caPublicKey(t, remade), caPublicKey(t, first)) || len(c.Certificate) == 0 {
		t.Error("the certificate made for a lone key is not for that key")
	}

	// The certificate alone: its key is lost.
	if err := os.Remove(filepath.Join(dir, CAKeyFile)); err != nil {
		t.Fatal(err)
	}
	if _, _, err := LoadOrCreateCA(dir); err == nil || !strings.Contains(err.Error(), "exists without its key") {
		t.Errorf("certificate without key: %v", err)
	}

	// A torn key alone.
	other := t.TempDir()
	if err := os.WriteFile(filepath.Join(other, CAKeyFile), []byte("-----BEGIN EC PRIV"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, _, err := LoadOrCreateCA(other); err == nil || !strings.Contains(err.Error(), "remove it to make a new CA") {
		t.Errorf("torn key: %v", err)
	}
}

// TestLoadOrCreateCAOddFiles: what stands under the CA's names in the
// state directory may be anything its owner put there (`egressd ca export`
// runs as root there): a FIFO, or a link to /dev/zero, is an error at
// once, not a hang or an exhausted memory; a link to a regular file (a CA
// kept elsewhere) is still read.
func TestLoadOrCreateCAOddFiles(t *testing.T) {
	made := t.TempDir()
	if _, _, err := LoadOrCreateCA(made); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name  string
		plant func(dir string) error
	}{
		{"fifo-cert", func(dir string) error { return syscall.Mkfifo(filepath.Join(dir, CACertFile), 0o600) }},
		{"fifo-key", func(dir string) error { return syscall.Mkfifo(filepath.Join(dir, CAKeyFile), 0o600) }},
		{"dev-zero-key", func(dir string) error { return os.Symlink("/dev/zero", filepath.Join(dir, CAKeyFile)) }},
		{"dev-zero-cert", func(dir string) error { return os.Symlink("/dev/zero", filepath.Join(dir, CACertFile)) }},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			if err := c.plant(dir); err != nil {
				t.Fatal(err)
			}
			done := make(chan error, 1)
			go func() { _, _, err := LoadOrCreateCA(dir); done <- err }()
			select {
			case err := <-done:
				if err == nil || !strings.Contains(err.Error(), "not a regular file") {
					t.Errorf("LoadOrCreateCA: %v, want a not-a-regular-file error", err)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("LoadOrCreateCA still reading after 10 s")
			}
		})
	}
	t.Run("links-to-regular-files", func(t *testing.T) {
		dir := t.TempDir()
		for _, f := range []string{CACertFile, CAKeyFile} {
			if err := os.Symlink(filepath.Join(made, f), filepath.Join(dir, f)); err != nil {
				t.Fatal(err)
			}
		}
		_, a, err := LoadOrCreateCA(dir)
		if err != nil {
			t.Fatal(err)
		}
		want, _ := os.ReadFile(filepath.Join(made, CACertFile))
		if string(a) != string(want) {
			t.Error("a linked CA read as another certificate")
		}
	})
}

// TestLoadOrCreateCAOpensOnlyRegularFiles: root's export must not open
// what the state directory's owner links under the CA's names unless it
// is a regular file: opening a device is an act of its own (a watchdog
// starts counting, a serial line raises DTR, a tape rewinds), done as
// root, however soon it is closed again. A FIFO elsewhere stands in for
// the device here: inotify reports each open of it.
func TestLoadOrCreateCAOpensOnlyRegularFiles(t *testing.T) {
	for _, name := range []string{CACertFile, CAKeyFile} {
		t.Run(name, func(t *testing.T) {
			base := t.TempDir()
			dev := filepath.Join(base, "device")
			if err := unix.Mkfifo(dev, 0o600); err != nil {
				t.Fatal(err)
			}
			state := filepath.Join(base, "state")
			if err := os.Mkdir(state, 0o700); err != nil {
				t.Fatal(err)
			}
			if err := os.Symlink(dev, filepath.Join(state, name)); err != nil {
				t.Fatal(err)
			}
			in, err := unix.InotifyInit1(unix.IN_NONBLOCK | unix.IN_CLOEXEC)
			if err != nil {
				t.Fatal(err)
			}
			defer unix.Close(in)
			if _, err := unix.InotifyAddWatch(in, dev, unix.IN_OPEN); err != nil {
				t.Fatal(err)
			}
			if _, _, err := LoadOrCreateCA(state); err == nil || !strings.Contains(err.Error(), "not a regular file") {
				t.Errorf("LoadOrCreateCA: %v, want a not-a-regular-file error", err)
			}
			buf := make([]byte, 4096)
			if n, err := unix.Read(in, buf); n > 0 {
				t.Errorf("the FIFO linked under %s was opened (%d bytes of inotify events)", name, n)
			} else if err != unix.EAGAIN {
				t.Fatalf("inotify: %v", err)
			}
		})
	}
}

// The temporary files of a CA creation a kill cut short are removed at the
// next load, but not a fresh one, which may be another process's creation
// in progress (egressd ca export beside egressd run).
func TestLoadOrCreateCARemovesStaleTemps(t *testing.T) {
	dir := t.TempDir()
	old := time.Now().Add(-time.Hour)
	for _, name := range []string{CAKeyFile + ".tmp123", CACertFile + ".tmp456", CAKeyFile + ".tmp789"} {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte("partial"), 0o600); err != nil {
			t.Fatal(err)
		}
		if name != CAKeyFile+".tmp789" {
			if err := os.Chtimes(p, old, old); err != nil {
				t.Fatal(err)
			}
		}
	}
	if _, _, err := LoadOrCreateCA(dir); err != nil {
		t.Fatal(err)
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	want := []string{CACertFile, CAKeyFile, CAKeyFile + ".tmp789"}
	slices.Sort(want)
	if !slices.Equal(names, want) {
		t.Errorf("state directory holds %q, want %q", names, want)
	}
}
