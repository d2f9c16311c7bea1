package proxy

import (
	"bufio"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	"egressd/audit"
	"egressd/policy"
)

// TestTransparentPlainLaterHosts: a plain-HTTP connection to a host with
// path rules is decided request by request, each on its own Host, with
// --inspect (goproxy reads it) as without (the request follower): a later
// request to another host the policy allows at that address is forwarded,
// one to a host no rule allows is refused with no-rule, as capture reports
// it. Before, with --inspect, every later request to another Host was
// refused as host-mismatch: the check that binds an inspected TLS
// connection's requests to its SNI (THREATS.md A4) was applied to
// cleartext, where nothing binds the connection to its first Host.
func TestTransparentPlainLaterHosts(t *testing.T) {
	for _, inspect := range []bool{false, true} {
		t.Run(fmt.Sprintf("inspect=%v", inspect), func(t *testing.T) {
			tp := newTopo(t, topoOpts{config: func(c *Config) { c.Inspect = inspect }})
			c := tp.dialFromClient(t, netip.Addr{}, netip.AddrPortFrom(srvV4, 80))
			c.SetDeadline(time.Now().Add(20 * time.Second))
			br := bufio.NewReader(c)
			for _, r := range []struct {
				host, path string
				code       int
			}{{"docs.paths.test", "/public/a", 200}, {"allowed.test", "/x", 200}, {"evil.example", "/y", 403}} {
				fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: %s\r\n\r\n", r.path, r.host)
				resp, err := http.ReadResponse(br, nil)
				if err != nil {
					t.Fatalf("%s%s: %v", r.host, r.path, err)
				}
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode != r.code {
					t.Errorf("%s%s: %d %q, want %d", r.host, r.path, resp.StatusCode, body, r.code)
				}
				if want := fmt.Sprintf("host=%s path=%s", r.host, r.path); r.code == 200 && !strings.Contains(string(body), want) {
					t.Errorf("%s%s: the origin answered %q, want it to have seen %q", r.host, r.path, body, want)
				}
			}
			port := localPort(c)
			for _, w := range []struct {
				name, reason string
				verdict      policy.Verdict
			}{{"allowed.test", policy.ReasonAllowed, policy.Allow}, {"evil.example", policy.ReasonNoRule, policy.Deny}} {
				ev := tp.ev.wait(t, "request to "+w.name, func(ev audit.Event) bool {
					return int(ev.ClientPort) == port && ev.Kind == audit.KindRequest && ev.Name == w.name
				})
				if ev.Verdict != w.verdict || ev.Reason != w.reason {
					t.Errorf("request to %s: %s %s, want %s %s", w.name, ev.Verdict, ev.Reason, w.verdict, w.reason)
				}
			}
		})
	}
}

// TestTransparentPlainLaterAbsoluteHost (THREATS.md A1): a later request
// on a plain-HTTP connection whose absolute-form target names an allowed
// host and whose Host line names another is refused as host-mismatch,
// with --inspect as without. Before, with --inspect, net/http (goproxy)
// kept the target's host and dropped the Host line, and the request was
// forwarded as allowed.test.
func TestTransparentPlainLaterAbsoluteHost(t *testing.T) {
	for _, inspect := range []bool{false, true} {
		t.Run(fmt.Sprintf("inspect=%v", inspect), func(t *testing.T) {
			tp := newTopo(t, topoOpts{config: func(c *Config) { c.Inspect = inspect }})
			c := tp.dialFromClient(t, netip.Addr{}, netip.AddrPortFrom(srvV4, 80))
			c.SetDeadline(time.Now().Add(20 * time.Second))
			br := bufio.NewReader(c)
			for _, r := range []struct {
				head, reason string
				code         int
			}{
				{"GET /public/a HTTP/1.1\r\nHost: docs.paths.test\r\n\r\n", "", 200},
				{"GET http://allowed.test/x HTTP/1.1\r\nHost: allowed.test\r\n\r\n", "", 200},
				{"GET http://allowed.test/y HTTP/1.1\r\nHost: evil.example\r\n\r\n", ReasonHostMismatch, 403},
			} {
				io.WriteString(c, r.head)
				resp, err := http.ReadResponse(br, nil)
				if err != nil {
					t.Fatalf("%q: %v", r.head, err)
				}
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode != r.code || resp.Header.Get("X-Egressd-Reason") != r.reason {
					t.Errorf("%q: %d %q %q, want %d %q", r.head, resp.StatusCode, resp.Header.Get("X-Egressd-Reason"), body, r.code, r.reason)
				}
			}
			port := localPort(c)
			ev := tp.ev.wait(t, "the refused request", func(ev audit.Event) bool {
				return int(ev.ClientPort) == port && ev.Kind == audit.KindRequest && ev.Reason == ReasonHostMismatch
			})
			if ev.Verdict != policy.Deny || !ev.Enforced {
				t.Errorf("refused request: %s enforced=%v, want an enforced deny", ev.Verdict, ev.Enforced)
			}
		})
	}
}
