package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"egressd/audit"
	"egressd/policy"
	"egressd/proxy"
)

// agreeClosed holds the guarded destinations only by "*" and the /0s,
// which open none of them; agreeNamed names each by a CIDR rule inside
// its guarded range, which opens it where the README says a CIDR rule
// opens a guard (the gateway itself too, to the explicit proxy).
const (
	agreeClosed = `mode: enforce
rules:
  - {name: any, to: ["*"], ports: [80/tcp]}
  - {name: v4all, to: ["0.0.0.0/0", "::/0"], ports: [81/tcp]}
`
	agreeNamed = `mode: enforce
rules:
  - name: named
    to: ["127.0.0.1/32", "10.20.30.40/32", "198.51.100.7/32", "0.0.0.0/32", "::/128",
         "169.254.169.254/32", "100.64.0.1/32", "64:ff9b::7f00:1/128", "2002:7f00:1::/48"]
    ports: [80/tcp]
`
)

// explicitVerdict asks the explicit proxy at addr to CONNECT to target
// and returns the event the proxy recorded for it, with the status it
// answered.
func explicitVerdict(t *testing.T, addr string, events <-chan audit.Event, target string) (audit.Event, int) {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatalf("dial the explicit proxy: %v", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	fmt.Fprintf(c, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", target, target)
	resp, err := http.ReadResponse(bufio.NewReader(c), &http.Request{Method: http.MethodConnect})
	if err != nil {
		t.Fatalf("CONNECT %s: %v", target, err)
	}
	resp.Body.Close()
	c.Close()
	select {
	case ev := <-events:
		return ev, resp.StatusCode
	case <-time.After(10 * time.Second):
		t.Fatalf("CONNECT %s: no event from the proxy (status %d)", target, resp.StatusCode)
	}
	return audit.Event{}, 0
}

// TestExplainAgreesWithProxy: `policy explain` predicts what the explicit
// proxy does with a literal it is asked for (CONNECT, the same
// proxy.Proxy egressd run serves, over real sockets): the IPv4-mapped
// forms of loopback, of a LAN address and of a public one (dotted and
// hex), NAT64 and 6to4 forms of loopback, the unspecified addresses,
// link-local metadata and CGNAT, under rules that hold them without
// opening them and under CIDR rules naming them. Explain's explicit
// verdict (explicit, explicit_reason in --json) must be the proxy's, and
// where it refuses, special-range, explain names the guarded range. The
// proxy dials nothing but a listener on loopback (Deps.Dial): no packet
// goes to the destinations asked for.
func TestExplainAgreesWithProxy(t *testing.T) {
	dir := t.TempDir()
	// Where every allowed CONNECT is dialled instead of its destination.
	sink, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer sink.Close()
	go func() {
		for {
			c, err := sink.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	var dialMu sync.Mutex
	var dialled []string
	dial := func(ctx context.Context, network, addr string) (net.Conn, error) {
		dialMu.Lock()
		dialled = append(dialled, addr)
		dialMu.Unlock()
		var d net.Dialer
		return d.DialContext(ctx, "tcp", sink.Addr().String())
	}

	// Hosts as the CONNECT authority writes them, and explain's --to.
	hosts := []string{
		"127.0.0.1", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]",
		"[::ffff:10.20.30.40]", "[::ffff:198.51.100.7]", "[::ffff:c633:6407]", "[::ffff:0.0.0.0]",
		"[64:ff9b::7f00:1]", "[2002:7f00:1::1]",
		"0.0.0.0", "[::]", "169.254.169.254", "100.64.0.1",
		"198.51.100.7", "10.20.30.40",
	}
	type dest struct {
		to   string // CONNECT authority and explain's --to
		port string // explain's --port
	}
	var dests []dest
	for _, h := range hosts {
		for _, port := range []string{"80", "81"} {
			dests = append(dests, dest{h + ":" + port, port + "/tcp"})
		}
	}
	for _, pol := range []struct{ name, src string }{{"closed", agreeClosed}, {"named", agreeNamed}} {
		for _, nat := range []string{"", "64:ff9b::/96"} {
			file := filepath.Join(dir, pol.name+".yaml")
			if err := os.WriteFile(file, []byte(pol.src), 0o644); err != nil {
				t.Fatal(err)
			}
			nats, err := policy.ParseNAT64(nat)
			if err != nil {
				t.Fatal(err)
			}
			eng, err := policy.Compile(file, []byte(pol.src))
			if err != nil {
				t.Fatal(err)
			}
			events := make(chan audit.Event, 16)
			px, err := proxy.New(proxy.Config{OwnAddrs: []netip.Addr{}, DialTimeout: 5 * time.Second, MaxConnsPerClient: -1},
				proxy.Deps{Policy: policy.NewStore(eng.WithNAT64(nats)), Dial: dial, Logger: slog.New(slog.NewTextHandler(io.Discard, nil)),
					Sink: audit.SinkFunc(func(ev audit.Event) { events <- ev })})
			if err != nil {
				t.Fatal(err)
			}
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			go px.ServeExplicit(ln)
			for _, d := range dests {
				name := fmt.Sprintf("%s nat64 %q %s", pol.name, nat, d.to)
				ev, status := explicitVerdict(t, ln.Addr().String(), events, d.to)
				args := []string{file, "--to", d.to, "--port", d.port}
				if nat != "" {
					args = append(args, "--nat64-prefix", nat)
				}
				ex := explainJSON(t, args...)
				got := ex.Explicit
				if got == nil {
					// Before explain said nothing of the explicit proxy
					// apart from its one verdict.
					got = &proxyExplained{Verdict: ex.Verdict, Rule: ex.Rule, Reason: ex.Reason, Mode: ex.Mode, Guard: ex.Guard, SpecialRange: ex.SpecialRange}
				}
				if got.Verdict != string(ev.Verdict) || got.Reason != ev.Reason || got.Rule != ev.Rule || got.Mode != string(ev.Mode) {
					t.Errorf("%s: explain says the explicit proxy %s %s (rule %q, mode %s), the proxy %s %s (rule %q, mode %s, status %d)",
						name, got.Verdict, got.Reason, got.Rule, got.Mode, ev.Verdict, ev.Reason, ev.Rule, ev.Mode, status)
					continue
				}
				if ev.Reason == proxy.ReasonSpecialRange && (got.Guard == "" || got.SpecialRange == "") {
					t.Errorf("%s: the explicit proxy refuses it special-range; explain names no guard and range: %+v", name, got)
				}
				// The verdict allows what both proxies allow, no more.
				if tr := ex.Transparent; tr == nil || (ex.Verdict == "allow") != (tr.Verdict == "allow" && got.Verdict == "allow") {
					t.Errorf("%s: explain's verdict %s, the explicit proxy's %s, the transparent proxy's %+v", name, ex.Verdict, got.Verdict, tr)
				}
				if ex.Verdict == "deny" && ex.Reason == proxy.ReasonSpecialRange && ex.Guard == "" {
					t.Errorf("%s: explain refuses it special-range and names no guard: %+v", name, ex)
				}
			}
			px.Close()
			ln.Close()
		}
	}
	dialMu.Lock()
	defer dialMu.Unlock()
	t.Logf("dialled (to the loopback sink instead): %q", dialled)
}

// TestExplainMartian: Linux drops a packet from the LAN to 0.0.0.0 as a
// martian destination before the forward chain, in either mode, whatever
// the rules: UDP and ICMP to it never get through, a CIDR rule naming
// 0.0.0.0/32 too. Explain said ALLOW for them and nothing of it. TCP is
// the proxy's (the REDIRECT comes before the kernel's check), DNS the
// forwarder's. The rest of 0.0.0.0/8 Linux routes like any address
// (since 5.3): 0.0.0.5 under a rule naming it is allowed
// (TestGuardsAgreeThisNetwork; session 34 had it martian too).
func TestExplainMartian(t *testing.T) {
	dir := t.TempDir()
	for _, mode := range []string{"enforce", "audit"} {
		pol := filepath.Join(dir, mode+".yaml")
		if err := os.WriteFile(pol, []byte("mode: "+mode+`
rules:
  - {name: zero, to: ["0.0.0.0/32", "0.0.0.5/32"], ports: [80/tcp, 80/udp, 53/udp, icmp]}
  - {name: wide, to: ["0.0.0.0/0"], ports: [81/udp]}
`), 0o644); err != nil {
			t.Fatal(err)
		}
		for _, c := range []struct {
			to, port, verdict, guard, allowedBy string
		}{
			{"0.0.0.0", "80/udp", "deny", "martian", "zero"},
			{"0.0.0.5", "80/udp", "allow", "", ""},
			{"0.0.0.0", "icmp", "deny", "martian", "zero"},
			{"0.0.0.0", "81/udp", "deny", "martian", "wide"},
			{"0.0.0.0", "82/udp", "deny", "martian", ""},
			// The forwarder's; the transparent proxy refuses "this
			// host" as loopback, whatever the rules.
			{"0.0.0.0", "53/udp", "allow", "", ""},
			{"0.0.0.0", "80/tcp", "deny", "lan-loopback", "zero"},
		} {
			ex := explainJSON(t, pol, "--to", c.to, "--port", c.port)
			name := mode + " " + c.to + " " + c.port
			if ex.Verdict != c.verdict || ex.Guard != c.guard || ex.AllowedBy != c.allowedBy {
				t.Errorf("%s: %s guard %q allowed_by %q, want %s guard %q allowed_by %q", name, ex.Verdict, ex.Guard, ex.AllowedBy, c.verdict, c.guard, c.allowedBy)
			}
			if c.guard == "martian" {
				if ex.Reason != "special-range" || ex.SpecialRange != "0.0.0.0/32" || ex.Mode != "enforce" ||
					!strings.Contains(strings.Join(ex.Warnings, "\n"), "martian destination") {
					t.Errorf("%s: %+v, want special-range 0.0.0.0/32 in enforce mode (in either mode) and a note of the martian drop", name, ex)
				}
			}
		}
	}
}
