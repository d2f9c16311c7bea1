package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"egressd/audit"
	"egressd/firewall"
	"egressd/internal/testnet"
	"egressd/policy"
	"egressd/proxy"
)

// TestReloadRefusedInFirewallUndone: a reload the firewall refuses
// changes nothing, for connections the proxy decided while the refused
// policy was swapped in too (the proxy decides with the store's policy,
// which the reload swaps before it hands the policy to the firewall): a
// CONNECT tunnel only the refused policy allows, opened in that window,
// is closed once the running policy is back. nftables refuses the
// Replace for real: the reload runs on a thread without CAP_NET_ADMIN,
// and the firewall's seeding of the refused policy's new name rule, which
// asks the forwarder's answers (Deps.Given) in the window, opens the
// tunnel.
func TestReloadRefusedInFirewallUndone(t *testing.T) {
	ns := testnet.New(t, "refu")
	echo, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { echo.Close() })
	go func() {
		for {
			c, err := echo.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
	port := echo.Addr().(*net.TCPAddr).Port
	running := "version: 1\nmode: enforce\nrules:\n  - name: other\n    to: [192.0.2.1/32]\n    ports: [443/tcp]\n"
	// A new rule with names: the Replace asks the forwarder's answers,
	// to seed its sets, before its transaction.
	refused := fmt.Sprintf("version: 1\nmode: enforce\nrules:\n  - name: loop\n    to: [127.0.0.1/32]\n    ports: [%d/tcp]\n  - {name: ntp, to: [ntp.test], ports: [123/udp]}\n", port)

	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	var (
		store  *policy.Store
		eng    *policy.Engine
		ln     net.Listener
		tunnel net.Conn
	)
	given := func() []firewall.Given {
		if tunnel == nil && store.Load() != eng {
			// The refused policy is in the store: a CONNECT it allows
			// gets through.
			tunnel = connectVia(t, ln.Addr().String(), fmt.Sprintf("127.0.0.1:%d", port))
		}
		return nil
	}
	d, eng := firewallDaemon(t, ns, running, firewall.Config{}, firewall.Deps{Logger: log, Given: given})
	store = d.store
	p, err := proxy.New(proxy.Config{OwnAddrs: []netip.Addr{}}, proxy.Deps{Policy: store, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	d.proxy = p
	ln, err = net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go p.ServeExplicit(ln)

	pol := d.source
	if err := os.WriteFile(pol, []byte(refused), 0o644); err != nil {
		t.Fatal(err)
	}
	var ok bool
	testnet.WithoutNetAdmin(t, func() { ok = d.reloadPolicy() })
	if ok {
		t.Fatal("reloadPolicy took a policy the firewall refused")
	}
	if tunnel == nil {
		t.Fatal("the refused Replace did not ask the forwarder's answers")
	}
	if out := ns.MustRun("nft", "list", "table", "inet", "egressd"); strings.Contains(out, "dns4_ntp") {
		t.Errorf("the refused policy's ruleset is in the kernel:\n%s", out)
	}
	if store.Load() != eng {
		t.Fatal("the running policy is not back in the store")
	}
	// The state directory's copy is still the running policy's: the next
	// start reads the marks of the ruleset in the kernel as its rules'
	// (firewall.Deps.Previous), and egressd report lists its unused rules.
	if b, err := os.ReadFile(filepath.Join(d.cfg.stateDir, runningPolicyFile)); err != nil || string(b) != running {
		t.Errorf("the state directory's copy after the refused reload (%v):\n%s\nwant the running policy's:\n%s", err, b, running)
	}
	tunnel.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(tunnel, "x"); err == nil {
		var b [1]byte
		n, err := tunnel.Read(b[:])
		var ne net.Error
		if err == nil || errors.As(err, &ne) && ne.Timeout() {
			t.Fatalf("a tunnel only the refused policy allows is still open (read %d: %v)", n, err)
		}
	}
}

// firewallDaemon is the set-up of the tests that run the daemon's
// firewall paths by hand: the policy src in a file of a temporary
// directory, compiled; a real firewall in ns (fc, with the LAN lan0, the
// WAN wan0, the proxy's port 3129 and DNS's 53), installed with it; a
// daemon over them (no proxy, the fast path as fc says) whose state
// directory has the start's copy of the policy (savePolicy). It returns
// the daemon and the policy's engine.
func firewallDaemon(t *testing.T, ns *testnet.NS, src string, fc firewall.Config, deps firewall.Deps) (*daemon, *policy.Engine) {
	t.Helper()
	dir := t.TempDir()
	pol := filepath.Join(dir, "p.yaml")
	if err := os.WriteFile(pol, []byte(src), 0o644); err != nil {
		t.Fatal(err)
	}
	eng, err := policy.Compile(pol, []byte(src))
	if err != nil {
		t.Fatal(err)
	}
	fc.NetNS, fc.LANs, fc.WAN, fc.ProxyPort, fc.DNSPort = "/var/run/netns/"+ns.Name, []string{"lan0"}, "wan0", 3129, 53
	fw, err := firewall.New(fc, deps)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fw.Close() })
	if err := fw.Install(eng); err != nil {
		t.Fatal(err)
	}
	d := &daemon{cfg: runConfig{stateDir: filepath.Join(dir, "state"), fastPath: fc.FastPath}, log: deps.Logger, store: policy.NewStore(eng), source: pol,
		ledger: audit.NewLedger(eng, audit.LedgerOptions{}), fw: fw, degraded: map[string]string{}}
	d.src, d.srcEnforce = []byte(src), eng.Mode() == policy.ModeEnforce
	d.savePolicy(true)
	return d, eng
}

// connectVia opens a CONNECT tunnel to authority through the explicit
// proxy at proxyAddr.
func connectVia(t *testing.T, proxyAddr, authority string) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", proxyAddr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", authority, authority)
	resp, err := http.ReadResponse(bufio.NewReader(c), &http.Request{Method: http.MethodConnect})
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("CONNECT %s: %v %v", authority, resp, err)
	}
	c.SetDeadline(time.Time{})
	return c
}
