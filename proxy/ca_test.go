package proxy

import (
	"bytes"
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"testing"
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
