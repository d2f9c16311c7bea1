package main

import (
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"testing"
)

func TestCAExport(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	code, out, stderr := runCmd(t, "ca", "export", "--state-dir", dir)
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	blk, _ := pem.Decode([]byte(out))
	if blk == nil {
		t.Fatalf("not PEM: %q", out)
	}
	cert, err := x509.ParseCertificate(blk.Bytes)
	if err != nil || !cert.IsCA {
		t.Fatalf("not a CA certificate: %v", err)
	}
	if st, err := os.Stat(filepath.Join(dir, "ca-key.pem")); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("key file: %v %v", st, err)
	}
	// A second export prints the same CA.
	_, out2, _ := runCmd(t, "ca", "export", "--state-dir", dir)
	if out2 != out {
		t.Error("the CA changed between exports")
	}
	if code, _, _ := runCmd(t, "ca", "--state-dir", dir); code != exitUsage {
		t.Errorf("no subcommand: exit %d", code)
	}
}
