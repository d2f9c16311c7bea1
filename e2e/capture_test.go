package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestCaptureSNIMismatch: a TLS connection with an allowed SNI to an
// address DNS never gave out for it (domain fronting, THREATS.md A2) is
// blocked by the proxy in enforce mode as sni-mismatch; capture records
// the same verdict and reason, so audit mode reports what enforce would
// do, and the ledger, which keeps the first report of a flow, gets the same
// answer whichever component reports first, also when the client was
// given trackerIP for trackerName, which no rule allows (audit mode learns
// that answer with no rule). (Formerly TestKnownBugs/sni-mismatch-audit.)
func TestCaptureSNIMismatch(t *testing.T) {
	for _, mode := range []string{"enforce", "audit"} {
		t.Run(mode, func(t *testing.T) {
			tp := newTopo(t)
			d := newDaemon(t, tp, mode)
			d.start()
			tp.dig(t, dockerName, "A")
			// The client asked for the tracker too: audit mode answers
			// it and the forwarder learns it with no rule, which must
			// vouch for no other name's SNI (in enforce mode it is
			// refused).
			tp.dig(t, trackerName, "A")
			_, err := tp.curl(dockerName, 443, trackerIP, "/", true)
			if mode == "enforce" && err == nil {
				t.Fatalf("enforce let %s through to %s", dockerName, trackerIP)
			}
			if mode == "audit" && err != nil {
				t.Fatalf("audit blocked %s to %s: %v", dockerName, trackerIP, err)
			}
			waitReport(t, d, func(r *report) bool {
				return hasDropped(r, dockerName, 443, "tcp") || ruleFlows(r, "vendor-cloud") > 0
			})
			r := d.report()
			if !hasDropped(r, dockerName, 443, "tcp") || ruleFlows(r, "vendor-cloud") != 0 {
				t.Errorf("%s mode: SNI %s to %s counted as allowed (vendor-cloud %d flows), not dropped: %+v", mode, dockerName, trackerIP, ruleFlows(r, "vendor-cloud"), r.Dropped)
			}
			// Every component that reported the flow gave the same reason:
			// capture in both modes, the proxy too in enforce mode.
			sources := []string{"capture"}
			if mode == "enforce" {
				sources = append(sources, "proxy")
			}
			deadline := time.Now().Add(10 * time.Second)
			for {
				got := flowReasons(d, dockerName, trackerIP, 443)
				missing := ""
				for _, s := range sources {
					if _, ok := got[s]; !ok {
						missing = s
					}
				}
				if missing == "" {
					for s, reasons := range got {
						for _, reason := range reasons {
							if reason != "sni-mismatch" {
								t.Errorf("%s mode: %s reported %s to %s with reason %q, want sni-mismatch", mode, s, dockerName, trackerIP, reason)
							}
						}
					}
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("%s mode: no %s event for %s to %s in the event log:\n%s", mode, missing, dockerName, trackerIP, d.events())
				}
				time.Sleep(100 * time.Millisecond)
			}
		})
	}
}

// flowReasons reads the daemon's event log: the reasons of the flow
// events to ip:port named name, by source component.
func flowReasons(d *daemon, name, ip string, port int) map[string][]string {
	out := map[string][]string{}
	files, _ := filepath.Glob(filepath.Join(d.stateDir, "*"))
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(data), "\n") {
			var ev struct {
				Kind, Source, Name, Reason string
				Dest                       string `json:"dest_ip"`
				DestPort                   int    `json:"dest_port"`
			}
			if json.Unmarshal([]byte(line), &ev) != nil || ev.Kind != "flow" || ev.Name != name || ev.Dest != ip || ev.DestPort != port {
				continue
			}
			out[ev.Source] = append(out[ev.Source], ev.Reason)
		}
	}
	return out
}

// TestCaptureKeepAliveRequests: a later request on a plain-HTTP keep-alive
// connection to a denied Host is refused by the proxy in enforce mode
// (THREATS.md C6) and, in audit mode, where no connection passes the
// proxy, reported by capture with the same name, verdict and reason: audit
// mode reports what enforce would refuse, and the report counts it as a
// dropped request in both modes. Exactly one component reports it: in
// enforce mode capture leaves later requests to the proxy.
func TestCaptureKeepAliveRequests(t *testing.T) {
	for _, mode := range []string{"enforce", "audit"} {
		t.Run(mode, func(t *testing.T) {
			tp := newTopo(t)
			d := newDaemon(t, tp, mode)
			d.writePolicy(append(testPolicy(t), hardeningRules...))
			d.start()
			t.Cleanup(func() {
				if t.Failed() {
					t.Logf("egressd output:\n%s", d.logs())
				}
			})
			tp.dig(t, vendorName, "A")
			ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
			conn, err := tp.dialTCP(ctx, vendorIP+":80")
			cancel()
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			port := conn.LocalAddr().(*net.TCPAddr).Port
			br := bufio.NewReader(conn)
			conn.SetDeadline(time.Now().Add(15 * time.Second))
			for i, r := range []struct{ host, path string }{{vendorName, "/cap-ka-first"}, {trackerName, "/cap-ka-denied"}} {
				io.WriteString(conn, "GET "+r.path+" HTTP/1.1\r\nHost: "+r.host+"\r\nUser-Agent: e2e\r\n\r\n")
				resp, err := http.ReadResponse(br, nil)
				if err != nil {
					t.Fatalf("request %d: %v", i, err)
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if refused := resp.StatusCode == http.StatusForbidden; refused != (i == 1 && mode == "enforce") {
					t.Errorf("request %d (%s %s): status %d in %s mode", i, r.host, r.path, resp.StatusCode, mode)
				}
			}
			conn.Close()
			source := map[string]string{"enforce": "proxy", "audit": "capture"}[mode]
			ev := d.waitEvent(t, "the later request", func(e flowEvent) bool {
				return e.Kind == "request" && e.ClientPort == port && !e.Time.Before(dialedAt(port))
			})
			if ev.Source != source || ev.Verdict != "deny" || ev.Reason != "no-rule" || ev.Name != trackerName || ev.Path != "/cap-ka-denied" || ev.Enforced != (mode == "enforce") {
				t.Errorf("%s mode: request event %v path %q; want %s's deny no-rule for %s /cap-ka-denied", mode, ev, ev.Path, source, trackerName)
			}
			waitReport(t, d, func(r *report) bool {
				for _, dr := range r.Dropped {
					if dr.Dest == trackerName && dr.Port == 80 && dr.Requests > 0 {
						return true
					}
				}
				return false
			})
			// The same request is not reported twice (capture beside
			// the proxy in enforce mode).
			time.Sleep(time.Second)
			n := 0
			for _, e := range d.allEvents() {
				if e.Kind == "request" && e.ClientPort == port && !e.Time.Before(dialedAt(port)) {
					n++
				}
			}
			if n != 1 {
				t.Errorf("%s mode: %d request events for the connection, want 1", mode, n)
			}
		})
	}
}

// TestCaptureTCPPorts: with --tcp-ports 80 the firewall forwards a TLS
// connection to 10516 (health-logging's port, no host/path rule's) by its
// destination address alone: an address egressd's DNS gave out for the
// rule's name lets it out whatever SNI it carries. Capture judges it so,
// in enforce mode (it records the drops there) and in audit mode (it
// reports what enforce would do): allowed, credited to health-logging, not
// denied by its SNI.
func TestCaptureTCPPorts(t *testing.T) {
	for _, mode := range []string{"enforce", "audit"} {
		t.Run(mode, func(t *testing.T) {
			tp := newTopo(t)
			d := newDaemon(t, tp, mode)
			d.extra = append(d.extra, "--tcp-ports", "80")
			d.start()
			t.Cleanup(func() {
				if t.Failed() {
					t.Logf("egressd output:\n%s", d.logs())
				}
			})
			tp.dig(t, intakeName, "A")
			url := "https://" + trackerName + ":10516/"
			out, err := tp.lan.Run("curl", "-ksS", "-o", "/dev/null", "--max-time", "5",
				"--resolve", trackerName+":10516:"+intakeIP, url)
			if err != nil {
				t.Fatalf("%s mode: curl %s at %s: %v: %s (the firewall forwards by address)", mode, url, intakeIP, err, out)
			}
			ev := d.waitEvent(t, "the capture of the forwarded flow", func(e flowEvent) bool {
				return e.Kind == "flow" && e.Source == "capture" && e.Dest == intakeIP && e.DestPort == 10516
			})
			if ev.Verdict != "allow" || ev.Rule != "health-logging" {
				t.Errorf("%s mode: capture reported %v, want allowed by health-logging as nftables forwarded it", mode, ev)
			}
			// No proxy saw it: its one decision line is capture's
			// (TestOneDecisionLinePerConnection has the proxied ones).
			d.stop()
			var lines []string
			for _, l := range strings.Split(d.logs(), "\n") {
				if strings.Contains(l, `"msg":"decision"`) && strings.Contains(l, `"kind":"flow"`) && strings.Contains(l, `"dest":"`+intakeIP+`","dest_port":10516,`) {
					lines = append(lines, l)
				}
			}
			if len(lines) != 1 || !strings.Contains(lines[0], `"component":"capture"`) {
				t.Errorf("%s mode: decision lines of the forwarded flow, want capture's alone:\n%s", mode, strings.Join(lines, "\n"))
			}
		})
	}
}
