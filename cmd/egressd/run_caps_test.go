package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"egressd/internal/netutil"
	"egressd/internal/sysmon"
	"egressd/internal/testnet"
)

// TestRunWithoutCapabilities runs the real binary as an unprivileged user
// with no capabilities: `egressd run` must say which capability each part
// lacks, and run the parts it can (the event log, the proxy on a high port,
// the admin API).
func TestRunWithoutCapabilities(t *testing.T) {
	dir, bin := buildForNobody(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
		bin, "run", "--mode", "enforce", "--lan", "lo", "--wan", "lo", "--state-dir", filepath.Join(dir, "state"),
		"--admin", "127.0.0.1:0", "--proxy-listen", "127.0.0.1:0", "--explicit-proxy-listen", "off",
		"--dns-listen", "127.0.0.1:53", "--upstream-dns", "127.0.0.1:9")
	cmd.Env = slices.DeleteFunc(os.Environ(), func(kv string) bool { return strings.HasPrefix(kv, "GOMAXPROCS=") })
	var out lockedBuffer
	cmd.Stdout, cmd.Stderr = &out, &lockedBuffer{}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	wants := []string{
		"NOT RUNNING: capture: needs CAP_NET_RAW",
		"NOT RUNNING: firewall: needs CAP_NET_ADMIN",
		"needs CAP_NET_BIND_SERVICE",
		"event log: " + filepath.Join(dir, "state"),
		"proxy: transparent on 127.0.0.1:", // the bound port
		"admin: http://127.0.0.1:",
		// Go's default processors; GOMAXPROCS unset here
		fmt.Sprintf("go: %d processors\n", runtime.GOMAXPROCS(0)),
	}
	// Wait (at most 30 s) for every line: the NOT RUNNING lines come
	// after the admin line.
	all := func(got string) bool {
		for _, want := range wants {
			if !strings.Contains(got, want) {
				return false
			}
		}
		return true
	}
	deadline := time.Now().Add(30 * time.Second)
	for !all(out.String()) && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
	}
	got := out.String()
	for _, want := range wants {
		if !strings.Contains(got, want) {
			t.Errorf("output lacks %q after 30 s:\n%s", want, got)
		}
	}
}

// TestRunAuditWithoutNetAdmin: a start in audit mode removes a table an
// earlier enforce run left; without CAP_NET_ADMIN it cannot (nor see
// whether there is one), and a table left there would go on enforcing
// while egressd says audit. It must say so at start and in /readyz, and
// name the command that lifts it.
func TestRunAuditWithoutNetAdmin(t *testing.T) {
	dir, bin := buildForNobody(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
		bin, "run", "--mode", "audit", "--lan", "lo", "--wan", "lo", "--state-dir", filepath.Join(dir, "state"),
		"--admin", "127.0.0.1:0", "--proxy-listen", "127.0.0.1:0", "--explicit-proxy-listen", "off",
		"--dns-listen", "127.0.0.1:0", "--upstream-dns", "127.0.0.1:9")
	var out lockedBuffer
	cmd.Stdout, cmd.Stderr = &out, &lockedBuffer{}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	adminRe := regexp.MustCompile(`admin: http://(127\.0\.0\.1:\d+)/`)
	deadline := time.Now().Add(30 * time.Second)
	for adminRe.FindStringSubmatch(out.String()) == nil && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
	}
	got := out.String()
	m := adminRe.FindStringSubmatch(got)
	if m == nil {
		t.Fatalf("no admin address:\n%s", got)
	}
	if !strings.Contains(got, "NOT RUNNING: firewall:") || !strings.Contains(got, "CAP_NET_ADMIN") || !strings.Contains(got, "`egressd firewall remove` as root") {
		t.Errorf("start-up output does not say a leftover table cannot be removed:\n%s", got)
	}
	resp, err := http.Get("http://" + m[1] + "/readyz")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(string(body), "egressd firewall remove") {
		t.Errorf("/readyz: %d %s", resp.StatusCode, body)
	}
}

// buildForNobody builds the binary into a directory the unprivileged user
// can reach (t.TempDir's parent is root's alone), after checking that the
// test can drop to that user with setpriv.
func buildForNobody(t *testing.T) (dir, bin string) {
	t.Helper()
	testnet.RequireRoot(t) // to drop to nobody with setpriv
	if _, err := exec.LookPath("setpriv"); err != nil {
		t.Fatalf("setpriv (util-linux) is missing: %v", err)
	}
	dir, err := os.MkdirTemp("/tmp", "egressd-caps-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o777)
	bin = filepath.Join(dir, "egressd")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v: %s", err, out)
	}
	return dir, bin
}

// TestRunKeepsAmbientCapabilities runs the real binary as the systemd unit
// does: an unprivileged user whose only privilege is an ambient capability
// (here CAP_NET_BIND_SERVICE). egressd run executes itself again at start
// (internal/sysmon); the capability must survive that, so the DNS
// forwarder binds a privileged port, and the process must be the same one
// (systemd's main PID) with the GODEBUG setting in its environment.
func TestRunKeepsAmbientCapabilities(t *testing.T) {
	dir, bin := buildForNobody(t)
	// A free privileged port on loopback.
	var port int
	for p := 600; p < 1000 && port == 0; p++ {
		if c, err := net.ListenPacket("udp", fmt.Sprintf("127.0.0.1:%d", p)); err == nil {
			if l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p)); err == nil {
				port = p
				l.Close()
			}
			c.Close()
		}
	}
	if port == 0 {
		t.Fatal("no free port below 1024 on 127.0.0.1")
	}
	dnsAddr := fmt.Sprintf("127.0.0.1:%d", port)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
		"--inh-caps=-all,+net_bind_service", "--ambient-caps=+net_bind_service",
		bin, "run", "--mode", "audit", "--lan", "lo", "--wan", "lo", "--state-dir", filepath.Join(dir, "state"),
		"--admin", "127.0.0.1:0", "--proxy-listen", "127.0.0.1:0", "--explicit-proxy-listen", "off",
		"--dns-listen", dnsAddr, "--upstream-dns", "127.0.0.1:9")
	// GOMAXPROCS set: egressd run keeps it, and says so.
	cmd.Env = append(slices.DeleteFunc(os.Environ(), func(kv string) bool {
		return strings.HasPrefix(kv, "GODEBUG=") || strings.HasPrefix(kv, "GOMAXPROCS=")
	}), "GOMAXPROCS=3")
	var out, errb lockedBuffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cmd.Process.Kill(); cmd.Wait() }()
	want := "dns: listening on " + dnsAddr
	for deadline := time.Now().Add(30 * time.Second); !strings.Contains(out.String(), want) && time.Now().Before(deadline); {
		time.Sleep(100 * time.Millisecond)
	}
	if got := out.String(); !strings.Contains(got, want) || strings.Contains(got, "needs CAP_NET_BIND_SERVICE") {
		t.Fatalf("want %q and no missing CAP_NET_BIND_SERVICE:\n%s\nstderr:\n%s", want, got, errb.String())
	}
	if want := "go: 3 processors (GOMAXPROCS)\n"; !strings.Contains(out.String(), want) {
		t.Errorf("GOMAXPROCS=3 in the environment: output lacks %q:\n%s", want, out.String())
	}
	pid := cmd.Process.Pid
	env, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(strings.Split(string(env), "\x00"), "GODEBUG="+sysmon.Setting) {
		t.Errorf("process %d (the one started) has no GODEBUG=%s: it did not execute itself again in place", pid, sysmon.Setting)
	}
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for l := range strings.Lines(string(status)) {
		if v, ok := strings.CutPrefix(l, "CapAmb:"); ok && strings.Trim(strings.TrimSpace(v), "0") == "" {
			t.Errorf("no ambient capability left after the re-execution: %s", strings.TrimSpace(l))
		}
	}
}

// TestRedirectMisses: listeners the firewall's redirect cannot reach are
// named, the defaults and specific LAN addresses are not.
func TestRedirectMisses(t *testing.T) {
	for addr, bad := range map[string]bool{
		"[::]:15001": false, ":53": false, "192.168.50.1:15001": false, "[fd00::1]:53": false,
		"127.0.0.1:15001": true, "[::1]:53": true, "0.0.0.0:15001": true, "localhost:53": false,
	} {
		if got := redirectMisses(addr) != ""; got != bad {
			t.Errorf("redirectMisses(%q) = %q", addr, redirectMisses(addr))
		}
	}
}

// TestListenCapHint: the capability a failed listener's line names is the
// one it lacked. Before, every permission error of the proxy or the DNS
// forwarder was said to need CAP_NET_BIND_SERVICE: on a kernel that asks
// CAP_NET_ADMIN for the WAN socket filter (SO_ATTACH_FILTER), `egressd
// run` without root said "listen tcp 0.0.0.0:15001: ... socket filter:
// operation not permitted: needs CAP_NET_BIND_SERVICE for a listen port
// below 1024", and for --dns-listen 198.18.1.1:5353 "needs
// CAP_NET_BIND_SERVICE to listen on port 53 (or give --dns-listen a port
// above 1023)", which the operator had done.
func TestListenCapHint(t *testing.T) {
	listen := func(addr net.Addr, err error) error {
		return fmt.Errorf("proxy: transparent listener: %w", &net.OpError{Op: "listen", Net: addr.Network(), Addr: addr, Err: err})
	}
	filterErr := fmt.Errorf("proxy: %w", fmt.Errorf("%w: %w", netutil.ErrSocketFilter, syscall.EPERM))
	bindErr := os.NewSyscallError("bind", syscall.EACCES)
	high := &net.TCPAddr{IP: net.IPv4zero, Port: 15001}
	low := &net.UDPAddr{IP: net.IPv4zero, Port: 53}
	none := capabilities{}
	for _, c := range []struct {
		name      string
		err       error
		caps      capabilities
		want, not string
	}{
		{"filter refused on a high port", listen(high, filterErr), none, "needs CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE"},
		{"filter refused on a low port", listen(low, filterErr), none, "needs CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE"},
		{"bind refused on a low port", listen(low, bindErr), none, "needs CAP_NET_BIND_SERVICE", "CAP_NET_ADMIN"},
		{"bind refused on a high port", listen(high, bindErr), none, "", "needs"},
		{"filter refused with CAP_NET_ADMIN", listen(high, filterErr), capabilities{netAdmin: true}, "", "needs"},
		{"bind refused with CAP_NET_BIND_SERVICE", listen(low, bindErr), capabilities{bindService: true}, "", "needs"},
		{"not a permission error", listen(low, syscall.EADDRINUSE), none, "", "needs"},
	} {
		got := listenCapHint(c.err, c.caps, "CAP_NET_BIND_SERVICE for a listen port below 1024")
		if !strings.HasPrefix(got, c.err.Error()) || (c.want != "" && !strings.Contains(got, c.want)) || strings.Contains(got, c.not) {
			t.Errorf("%s: %q; want the error with %q and without %q", c.name, got, c.want, c.not)
		}
	}
}
