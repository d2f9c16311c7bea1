package e2e

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestCaptureVerdictAtClassification: capture decides a flow with the
// policy in force when it reads the flow's name, not when the flow ends. A
// connection that no rule allowed when it opened (enforce would have
// refused it) is not credited to a rule a reload added while it was open.
// (Formerly TestKnownBugs/capture-verdict-at-end.)
func TestCaptureVerdictAtClassification(t *testing.T) {
	tp := newTopo(t)
	d := newDaemon(t, tp, "audit")
	d.start()
	hellos := d.metric("egress_capture_client_hellos_total")
	ka, err := tp.openKeepAlive(trackerName, trackerIP)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ka.get("/"); err != nil {
		t.Fatal(err)
	}
	// Capture reads the ring on its own time: the reload must come after
	// it has read (and so classified) the connection's ClientHello.
	deadline := time.Now().Add(10 * time.Second)
	for d.metric("egress_capture_client_hellos_total") <= hellos && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	d.writePolicy(append(testPolicy(t), newRule...))
	d.hup(true)
	if _, err := ka.get("/"); err != nil {
		t.Fatal(err)
	}
	ka.close()
	waitReport(t, d, func(r *report) bool { return len(r.Dropped) > 0 || len(r.Rules) > 0 })
	r := d.report()
	for _, rr := range r.Rules {
		if rr.Name == "e2e-new" {
			t.Errorf("a connection opened before the rule existed is credited to it: %+v", rr)
		}
	}
	if !hasDropped(r, trackerName, 443, "tcp") {
		t.Errorf("dropped list has no %s:443/tcp, though no rule allowed it when it opened: %+v", trackerName, r.Dropped)
	}
}

// TestCaptureSNIMismatch: a TLS connection with an allowed SNI to an
// address DNS never gave out for it (domain fronting, THREATS.md A2) is
// blocked by the proxy in enforce mode as sni-mismatch; capture records
// the same verdict and reason, so audit mode reports what enforce would
// do, and the ledger, which keeps the first report of a flow, gets the same
// answer whichever component reports first. (Formerly
// TestKnownBugs/sni-mismatch-audit.)
func TestCaptureSNIMismatch(t *testing.T) {
	for _, mode := range []string{"enforce", "audit"} {
		t.Run(mode, func(t *testing.T) {
			tp := newTopo(t)
			d := newDaemon(t, tp, mode)
			d.start()
			tp.dig(t, dockerName, "A")
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
