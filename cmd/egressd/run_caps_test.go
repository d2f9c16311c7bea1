package main

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"egressd/internal/testnet"
)

// TestRunWithoutCapabilities runs the real binary as an unprivileged user
// with no capabilities: `egressd run` must say which capability each part
// lacks, and run the parts it can (the event log, the proxy on a high port,
// the admin API).
func TestRunWithoutCapabilities(t *testing.T) {
	testnet.RequireRoot(t) // to drop to nobody with setpriv
	if _, err := exec.LookPath("setpriv"); err != nil {
		t.Fatalf("setpriv (util-linux) is missing: %v", err)
	}
	// A directory the unprivileged user can reach (t.TempDir's parent is
	// root's alone).
	dir, err := os.MkdirTemp("/tmp", "egressd-caps-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o777)
	bin := filepath.Join(dir, "egressd")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v: %s", err, out)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
		bin, "run", "--mode", "enforce", "--lan", "lo", "--wan", "lo", "--state-dir", filepath.Join(dir, "state"),
		"--admin", "127.0.0.1:0", "--proxy-listen", "127.0.0.1:0", "--explicit-proxy-listen", "off",
		"--dns-listen", "127.0.0.1:53", "--upstream-dns", "127.0.0.1:9")
	var out lockedBuffer
	cmd.Stdout, cmd.Stderr = &out, &lockedBuffer{}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(out.String(), "admin: http://") && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
	}
	time.Sleep(500 * time.Millisecond) // the DNS listener's failure comes from its own goroutine
	got := out.String()
	for _, want := range []string{
		"NOT RUNNING: capture: needs CAP_NET_RAW",
		"NOT RUNNING: firewall: needs CAP_NET_ADMIN",
		"needs CAP_NET_BIND_SERVICE",
		"event log: " + filepath.Join(dir, "state"),
		"proxy: transparent on 127.0.0.1:0",
		"admin: http://127.0.0.1:",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("output lacks %q:\n%s", want, got)
		}
	}
}
