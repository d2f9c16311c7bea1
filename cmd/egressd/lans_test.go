package main

import (
	"context"
	"io"
	"net/http"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"egressd/internal/testnet"
)

// TestParseLANs: --lan is one interface or a comma-separated list (VLANs
// kept apart); an empty item, a name given twice or one the kernel would
// refuse is an error naming the value.
func TestParseLANs(t *testing.T) {
	for _, c := range []struct {
		in   string
		want []string
		err  string
	}{
		{"", nil, ""},
		{"eth1", []string{"eth1"}, ""},
		{"eth1.10,eth1.20", []string{"eth1.10", "eth1.20"}, ""},
		{" cams , office ", []string{"cams", "office"}, ""},
		{"eth1,,eth2", nil, `"eth1,,eth2": an empty interface name`},
		{",eth1", nil, `",eth1": an empty interface name`},
		{"eth1,", nil, `"eth1,": an empty interface name`},
		{",", nil, `",": an empty interface name`},
		{"eth1,eth2,eth1", nil, `"eth1,eth2,eth1": eth1 is named twice`},
		{"eth1,abcdefghijklmnop", nil, `"abcdefghijklmnop" is longer than 15 bytes`},
		{"eth1,a/b", nil, `"a/b" is not a valid interface name`},
	} {
		got, err := parseLANs(c.in)
		switch {
		case c.err == "" && (err != nil || !slices.Equal(got, c.want)):
			t.Errorf("parseLANs(%q) = %q, %v; want %q", c.in, got, err, c.want)
		case c.err != "" && (err == nil || !strings.Contains(err.Error(), c.err)):
			t.Errorf("parseLANs(%q) = %q, %v; want an error with %q", c.in, got, err, c.err)
		}
	}
}

// TestLANsNameWAN: the WAN interface in a list of several LANs is an
// error, whether --wan named it or the default route chose it; one LAN
// that is the WAN is the one-armed box, as before.
func TestLANsNameWAN(t *testing.T) {
	for _, c := range []struct {
		lans     []string
		wan, how string
		err      string
	}{
		{[]string{"eth1", "eth2"}, "eth0", "", ""},
		{[]string{"eth0"}, "eth0", "", ""},
		{nil, "eth0", "", ""},
		{[]string{"eth1", "eth2"}, "", "", ""},
		{[]string{"eth1", "eth0"}, "eth0", " (--wan)", "eth0 is the WAN interface (--wan)"},
		{[]string{"eth0", "eth1"}, "eth0", " (the default route's; --wan names another)", "eth0 is the WAN interface (the default route's; --wan names another)"},
	} {
		err := lansNameWAN(c.lans, c.wan, c.how)
		switch {
		case c.err == "" && err != nil:
			t.Errorf("lansNameWAN(%q, %q): %v", c.lans, c.wan, err)
		case c.err != "" && (err == nil || !strings.Contains(err.Error(), c.err)):
			t.Errorf("lansNameWAN(%q, %q) = %v; want %q", c.lans, c.wan, err, c.err)
		}
	}
}

// TestRunLANFlag: a malformed --lan stops `egressd run` at start, exit 2,
// with one line naming the flag, before anything listens.
func TestRunLANFlag(t *testing.T) {
	base := []string{"--profile", "nirovision", "--mode", "audit", "--wan", "lo", "--no-firewall",
		"--dns-listen", "127.0.0.1:0", "--proxy-listen", "127.0.0.1:0", "--explicit-proxy-listen", "off",
		"--admin", "127.0.0.1:0", "--upstream-dns", "127.0.0.1:9"}
	for _, c := range []struct{ value, want string }{
		{"eth1,,eth2", `--lan: "eth1,,eth2": an empty interface name`},
		{"eth1,", `--lan: "eth1,": an empty interface name`},
		{"eth1,eth2,eth1", `--lan: "eth1,eth2,eth1": eth1 is named twice`},
		{"eth1,lo", `--lan: lo is the WAN interface (--wan)`},
		{"eth1,abcdefghijklmnop", `--lan: "eth1,abcdefghijklmnop": firewall: LAN interface: "abcdefghijklmnop" is longer than 15 bytes`},
	} {
		t.Run(c.value, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			var out, errb lockedBuffer
			code := cmdRun(ctx, append(slices.Clone(base), "--lan", c.value, "--state-dir", filepath.Join(t.TempDir(), "state")), &out, &errb)
			if ctx.Err() != nil || code != exitUsage || !strings.Contains(errb.String(), "egressd: "+c.want) || strings.Contains(out.String(), "listening") {
				t.Errorf("--lan %s: exit %d (context: %v), want %d at once with %q\nstdout:\n%s\nstderr:\n%s", c.value, code, ctx.Err(), exitUsage, c.want, out.String(), errb.String())
			}
			if n := strings.Count(strings.TrimSpace(errb.String()), "\n"); n != 0 {
				t.Errorf("--lan %s: %d lines on stderr, want one:\n%s", c.value, n+1, errb.String())
			}
		})
	}
}

// TestRunLANMissingAtStart: of two LAN interfaces, one that does not exist
// at start is treated as a single one is: the ruleset names it (nftables
// matches names: its rules apply once it appears), capture runs on the
// other and says, in the summary and /readyz, that it does not listen on
// the missing one, and the explicit proxy listens on the address of the
// one that has an address. Once the interface appears, capture listens on
// it and /readyz says every part runs.
func TestRunLANMissingAtStart(t *testing.T) {
	ns, p, _ := runInNS(t, "version: 1\nmode: enforce\nrules:\n  - name: ntp\n    to: [pool.ntp.test]\n    ports: [123/udp]\n",
		"--lan", "lan0,nosuch0", "--explicit-proxy-listen", "")
	defer p.Stop()
	wants := []string{
		"capture: listening on lan0; not on nosuch0 (below)\n",
		"NOT RUNNING: capture: capture: nosuch0 does not exist (yet) (listening on lan0 meanwhile; capture listens on each once it appears)\n",
		"capture: ring ",
		"explicit on 198.18.1.1:3128\n",
		"LAN lan0, nosuch0, WAN wan0",
	}
	waitStdout(t, p, wants)
	out, _ := ns.Run("nft", "list", "table", "inet", "egressd")
	code, body := readyz(t, ns)
	if !strings.Contains(strings.Join(strings.Fields(out), " "), `elements = { "lan0", "nosuch0" }`) || !strings.Contains(out, "iifname @lans udp dport 53 redirect") {
		t.Errorf("the ruleset does not name both LAN interfaces:\n%s", out)
	}
	if code != 503 || !strings.Contains(body, "nosuch0 does not exist") {
		t.Errorf("/readyz: %d %q, want 503 naming nosuch0", code, body)
	}
	ns.MustRun("ip", "link", "add", "nosuch0", "type", "veth", "peer", "name", "nosuch0p")
	ns.MustRun("ip", "link", "set", "nosuch0", "up")
	ns.MustRun("ip", "link", "set", "nosuch0p", "up") // a carrier: without one, /readyz says so
	waitReady(t, ns)
	stopClean(t, p) // the log is buffered (logbuf): a kill loses its tail
	if want := `"msg":"capture: listening on nosuch0"`; !strings.Contains(p.Stderr.String(), want) {
		t.Errorf("stderr lacks %s:\n%s\nstdout:\n%s", want, p.Stderr, p.Stdout)
	}
}

// TestRunOnlyLANMissingAtStart: the only LAN interface does not exist at
// start (a VLAN a network manager makes later): capture runs with no
// socket, the summary and /readyz say so, and it listens on the interface
// once it appears. Before, capture did not run until a restart.
func TestRunOnlyLANMissingAtStart(t *testing.T) {
	ns, p, _ := runInNS(t, "version: 1\nmode: audit\nrules:\n  - name: ntp\n    to: [pool.ntp.test]\n    ports: [123/udp]\n",
		"--lan", "nosuch0")
	defer p.Stop()
	waitStdout(t, p, []string{
		"capture: listening on none; not on nosuch0 (below)\n",
		"NOT RUNNING: capture: capture: nosuch0 does not exist (yet) (listening on none meanwhile; capture listens on each once it appears)\n",
	})
	if code, body := readyz(t, ns); code != 503 || !strings.Contains(body, "nosuch0 does not exist") {
		t.Errorf("/readyz: %d %q, want 503 naming nosuch0", code, body)
	}
	ns.MustRun("ip", "link", "add", "nosuch0", "type", "veth", "peer", "name", "nosuch0p")
	ns.MustRun("ip", "link", "set", "nosuch0", "up")
	// Its peer down: no carrier, which /readyz names until it has one.
	for deadline := time.Now().Add(10 * time.Second); ; {
		code, body := readyz(t, ns)
		if code == 503 && strings.Contains(body, "capture: nosuch0 has no carrier") {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("/readyz with nosuch0 up and its peer down: %d %q after 10s, want 503 naming nosuch0 with no carrier", code, body)
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	ns.MustRun("ip", "link", "set", "nosuch0p", "up")
	waitReady(t, ns)
	stopClean(t, p) // the log is buffered (logbuf): a kill loses its tail
	if want := `"msg":"capture: listening on nosuch0"`; !strings.Contains(p.Stderr.String(), want) {
		t.Errorf("stderr lacks %s:\n%s\nstdout:\n%s", want, p.Stderr, p.Stdout)
	}
}

// stopClean stops p with SIGTERM and waits up to 10s for it to exit.
func stopClean(t *testing.T, p *testnet.Proc) {
	t.Helper()
	p.Signal(syscall.SIGTERM)
	select {
	case <-p.Done():
	case <-time.After(10 * time.Second):
		t.Errorf("no exit within 10s of SIGTERM")
		p.Stop()
	}
}

// waitStdout waits up to 10s for p's standard output to hold each of
// wants; the test fails naming those it lacks.
func waitStdout(t *testing.T, p *testnet.Proc, wants []string) {
	t.Helper()
	missing := func() []string {
		var out []string
		for _, w := range wants {
			if !strings.Contains(p.StdoutSoFar(), w) {
				out = append(out, w)
			}
		}
		return out
	}
	for deadline := time.Now().Add(10 * time.Second); len(missing()) > 0 && time.Now().Before(deadline); {
		time.Sleep(50 * time.Millisecond)
	}
	if m := missing(); len(m) > 0 {
		t.Errorf("stdout lacks %q:\n%s", m, p.StdoutSoFar())
	}
}

// waitReady waits up to 10s for /readyz in ns to answer 200.
func waitReady(t *testing.T, ns *testnet.NS) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; {
		code, body := readyz(t, ns)
		if code == 200 {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("/readyz: %d %q after 10s, want 200", code, body)
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// readyz fetches /readyz of the admin address in ns.
func readyz(t *testing.T, ns *testnet.NS) (int, string) {
	t.Helper()
	c := &http.Client{Timeout: 3 * time.Second, Transport: &http.Transport{DialContext: ns.DialContext}}
	resp, err := c.Get("http://127.0.0.1:9901/readyz")
	if err != nil {
		t.Errorf("/readyz: %v", err)
		return 0, ""
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	return resp.StatusCode, string(b)
}
