package main

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"egressd/internal/testnet"
	"egressd/proxy"
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

// TestCAExportAsRootForServiceUser: the operator runs `egressd ca export`
// as root before the daemon first inspects, in the state directory
// dist/egressd.service gives its dynamic user. The CA it makes must be
// that user's, as the directory is: else the daemon, running as that user,
// cannot read the key, and every inspected connection fails.
func TestCAExportAsRootForServiceUser(t *testing.T) {
	dir, bin := buildForNobody(t)
	state := filepath.Join(dir, "state")
	if err := os.Mkdir(state, 0o750); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(state, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	asRoot, err := exec.Command(bin, "ca", "export", "--state-dir", state).Output()
	if err != nil {
		t.Fatalf("ca export as root: %v", err)
	}
	// The daemon's user loads the same files (proxy.LoadOrCreateCA).
	cmd := exec.Command("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
		bin, "ca", "export", "--state-dir", state)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	asUser, err := cmd.Output()
	if err != nil {
		t.Fatalf("ca export as the state directory's user after root made the CA: %v: %s", err, stderr.String())
	}
	if string(asUser) != string(asRoot) {
		t.Error("the service user sees another CA than root exported")
	}
	for _, f := range []string{"ca.pem", "ca-key.pem"} {
		st, err := os.Stat(filepath.Join(state, f))
		if err != nil {
			t.Fatal(err)
		}
		if s := st.Sys().(*syscall.Stat_t); s.Uid != 65534 || s.Gid != 65534 {
			t.Errorf("%s is %d:%d, want the state directory's 65534:65534", f, s.Uid, s.Gid)
		}
	}
}

// TestCAExportAsRootRefusesLinkedFile: the state directory's owner (the
// service's user) put a hard link to a file of root's under the CA's
// name; root's export must not give that file away.
func TestCAExportAsRootRefusesLinkedFile(t *testing.T) {
	dir, bin := buildForNobody(t)
	state := filepath.Join(dir, "state")
	if err := os.Mkdir(state, 0o750); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(state, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	if _, err := exec.Command(bin, "ca", "export", "--state-dir", state).Output(); err != nil {
		t.Fatalf("ca export as root: %v", err)
	}
	// A root-owned file elsewhere, linked under the certificate's name.
	secret := filepath.Join(dir, "root-secret")
	if err := os.WriteFile(secret, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	cert := filepath.Join(state, "ca.pem")
	pemBytes, err := os.ReadFile(cert)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(secret, pemBytes, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(cert); err != nil {
		t.Fatal(err)
	}
	if err := os.Link(secret, cert); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(bin, "ca", "export", "--state-dir", state).CombinedOutput()
	if err == nil {
		t.Errorf("ca export as root with ca.pem hard-linked to a root file: no error (%s)", out)
	}
	st, err := os.Stat(secret)
	if err != nil {
		t.Fatal(err)
	}
	if s := st.Sys().(*syscall.Stat_t); s.Uid != 0 {
		t.Errorf("root's file linked under ca.pem was given to %d", s.Uid)
	}
}

// TestCAExportAsRootChownRace: the state directory's owner swaps the key
// for a hard link to a file of root's between root's checks of the key
// and its chown (the owner may rename and link in its directory at any
// time; here at the worst one, deterministically). Root must give away
// the file it checked, never what the name holds by then.
func TestCAExportAsRootChownRace(t *testing.T) {
	testnet.RequireRoot(t)
	base := t.TempDir()
	state := filepath.Join(base, "state")
	if err := os.Mkdir(state, 0o750); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(state, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	if _, _, err := proxy.LoadOrCreateCA(state); err != nil {
		t.Fatal(err)
	}
	secret := filepath.Join(base, "root-secret") // same file system as state
	if err := os.WriteFile(secret, []byte("root's\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	key, aside := filepath.Join(state, proxy.CAKeyFile), filepath.Join(state, "key-aside")
	swapped := false
	caChownHook = func(path string) {
		if path != key || swapped {
			return
		}
		swapped = true
		if err := os.Rename(key, aside); err != nil {
			t.Error(err)
		}
		if err := os.Link(secret, key); err != nil {
			t.Error(err)
		}
	}
	defer func() { caChownHook = nil }()
	_ = caToDirOwner(state)
	if !swapped {
		t.Fatal("the key was never about to be chowned")
	}
	owner := func(p string) uint32 {
		st, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		return st.Sys().(*syscall.Stat_t).Uid
	}
	if u := owner(secret); u != 0 {
		t.Errorf("root's file, linked under %s after the checks, was given to %d", proxy.CAKeyFile, u)
	}
	if u := owner(aside); u != 65534 {
		t.Errorf("the key root made and checked is %d's, want the state directory's 65534", u)
	}
}

// TestCAExportAsRootPrintsOnlyTheCertificate: the state directory's owner
// (a compromised daemon) points the CA's names at a file of root's that
// holds a certificate and its private key in one (as TLS servers keep
// them). Root's export reads through the links and the pair loads; what
// it prints, which operators copy to every client, must be the
// certificate alone, never the key beside it.
func TestCAExportAsRootPrintsOnlyTheCertificate(t *testing.T) {
	testnet.RequireRoot(t)
	base := t.TempDir()
	other := filepath.Join(base, "other")
	if _, _, err := proxy.LoadOrCreateCA(other); err != nil {
		t.Fatal(err)
	}
	var combined []byte
	for _, f := range []string{proxy.CACertFile, proxy.CAKeyFile} {
		b, err := os.ReadFile(filepath.Join(other, f))
		if err != nil {
			t.Fatal(err)
		}
		combined = append(combined, b...)
	}
	secret := filepath.Join(base, "server.pem")
	if err := os.WriteFile(secret, combined, 0o600); err != nil {
		t.Fatal(err)
	}
	state := filepath.Join(base, "state")
	if err := os.Mkdir(state, 0o750); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{proxy.CACertFile, proxy.CAKeyFile} {
		p := filepath.Join(state, f)
		if err := os.Symlink(secret, p); err != nil {
			t.Fatal(err)
		}
		if err := os.Lchown(p, 65534, 65534); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chown(state, 65534, 65534); err != nil {
		t.Fatal(err)
	}
	_, out, _ := runCmd(t, "ca", "export", "--state-dir", state)
	if strings.Contains(out, "PRIVATE KEY") {
		t.Errorf("ca export printed a private key:\n%s", out)
	}
}

// TestCAExportWarnsOfExpiredCA: a CA an older egressd made while the
// clock said 1970 (a gateway without a real-time clock, before NTP set
// it) is valid 1970 to 1980. The export still prints it (clients trust
// it), but says on standard error that it is expired and what to do.
func TestCAExportWarnsOfExpiredCA(t *testing.T) {
	dir := t.TempDir()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "egressd inspection CA old"},
		NotBefore: time.Unix(0, 0), NotAfter: time.Unix(0, 0).AddDate(10, 0, 0),
		KeyUsage: x509.KeyUsageCertSign, BasicConstraintsValid: true, IsCA: true}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "ca.pem"), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "ca-key.pem"), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), 0o600); err != nil {
		t.Fatal(err)
	}
	code, out, stderr := runCmd(t, "ca", "export", "--state-dir", dir)
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	if blk, _ := pem.Decode([]byte(out)); blk == nil || !bytes.Equal(blk.Bytes, der) {
		t.Error("the export did not print the CA in the state directory")
	}
	if !strings.Contains(stderr, "expired") || !strings.Contains(stderr, "remove ca.pem (keep ca-key.pem)") {
		t.Errorf("no warning of the expired CA: %q", stderr)
	}
	// A CA made now draws no warning.
	if _, _, stderr := runCmd(t, "ca", "export", "--state-dir", filepath.Join(t.TempDir(), "s")); stderr != "" {
		t.Errorf("a new CA drew: %q", stderr)
	}
}

// TestCAExportEmptyStateDir: `egressd ca export --state-dir ""` is a
// usage error (exit 2, naming the flag), before any file is read or
// made, as `egressd run --inspect --state-dir ""` is since session 36.
// Before, it read the CA files of the working directory ("" joined with
// ca.pem): it printed a CA found there, which no egressd run with
// --inspect can load, or failed with exit 1 (as root, on the state
// directory's owner: stat ""; with none there, on mkdir "").
func TestCAExportEmptyStateDir(t *testing.T) {
	cwd := t.TempDir()
	if _, _, err := proxy.LoadOrCreateCA(cwd); err != nil {
		t.Fatal(err)
	}
	t.Chdir(cwd)
	for _, args := range [][]string{{"ca", "export", "--state-dir", ""}, {"ca", "export", "--state-dir="}} {
		code, out, stderr := runCmd(t, args...)
		if code != exitUsage || out != "" || !strings.Contains(stderr, `egressd ca export: --state-dir "": `) {
			t.Errorf("%q: exit %d, want %d with a line naming --state-dir\nstdout:\n%s\nstderr:\n%s", args, code, exitUsage, out, stderr)
		}
	}
}
