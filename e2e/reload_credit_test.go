package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"testing"
	"time"
)

// creditReport is what TestReloadAuditCredits reads of a report: its
// rules (openReport) and what enforce would drop.
type creditReport struct {
	*openReport
	Dropped []struct {
		Dest      string `json:"dest"`
		Port      uint16 `json:"port"`
		Proto     string `json:"proto"`
		Flows     uint64 `json:"flows"`
		OpenFlows uint64 `json:"open_flows"`
		Enforced  uint64 `json:"enforced_flows"`
	} `json:"dropped"`
}

// wouldDrop returns the flows and open flows the report lists to
// dest:port/tcp among what enforce would drop.
func (r *creditReport) wouldDrop(dest string, port uint16) (flows, open uint64) {
	for _, d := range r.Dropped {
		if d.Dest == dest && d.Port == port && d.Proto == "tcp" {
			flows += d.Flows
			open += d.OpenFlows
		}
	}
	return flows, open
}

func (r *creditReport) String() string {
	f, o := r.wouldDrop(trackerName, 443)
	return fmt.Sprintf("e2e-new %+v, unused %v, would drop %s:443/tcp %d (%d open)", r.rule("e2e-new"), r.UnusedRules, trackerName, f, o)
}

// creditReportCLI runs `egressd report --json` with args (openReportCLI).
func creditReportCLI(t *testing.T, tp *topo, args ...string) (*creditReport, string) {
	t.Helper()
	or, out := openReportCLI(t, tp, args...)
	r := &creditReport{openReport: or}
	if err := json.Unmarshal([]byte(out), r); err != nil {
		t.Fatalf("egressd report %v: %v\n%s", args, err, out)
	}
	return r, out
}

// TestReloadAuditCredits: the operator's workflow in audit mode. A LAN
// client holds two TLS connections open to trackerName, which no rule
// allows: one straight (capture decides it by its SNI) and one through the
// explicit proxy (CONNECT at the gateway's port 3128: the proxy decides
// it). The live report (`egressd report` against the admin address) lists
// both among what enforce would drop, open. The operator adds the rule
// (newRule, e2e-new) to the policy file and reloads (SIGHUP): the live
// report then counts both under e2e-new, which is not unused, and no
// longer among what enforce would drop (the tunnel open: capture writes
// the straight connection's event when the reload credits it). After the connections close and
// the daemon stops, the event log says the same.
func TestReloadAuditCredits(t *testing.T) {
	tp := newTopo(t)
	d := newDaemon(t, tp, "audit")
	d.start()

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	// Through the gateway's forwarder: its answer vouches for trackerIP
	// as trackerName's when the new rule judges the connection (a name
	// no DNS answer gave the address for would be a spoof, THREATS.md A2).
	if a := tp.resolve4(t, ctx, trackerName); a.String() != trackerIP {
		t.Fatalf("%s resolved to %s, want %s", trackerName, a, trackerIP)
	}
	ka, err := tp.openKeepAlive(trackerName, trackerIP)
	if err != nil {
		t.Fatalf("TLS to %s straight: %v", trackerName, err)
	}
	defer ka.close()
	if _, err := ka.get("/"); err != nil {
		t.Fatalf("a request to %s straight: %v", trackerName, err)
	}

	tc := tp.connectTLS(ctx, t, trackerName) // audit mode: the tunnel is kept
	defer tc.Close()

	// poll asks the live report until ok says so, up to 10 s.
	poll := func(ok func(*creditReport) bool) (*creditReport, string) {
		t.Helper()
		var r *creditReport
		var out string
		deadline := time.Now().Add(10 * time.Second)
		for i := 0; i < 100; i++ {
			r, out = creditReportCLI(t, tp, "--admin", adminAddr)
			if ok(r) || time.Now().After(deadline) {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
		return r, out
	}

	before := func(r *creditReport) bool {
		f, o := r.wouldDrop(trackerName, 443)
		return f == 2 && o == 2
	}
	r, out := poll(before)
	if !before(r) {
		t.Fatalf("live report before the reload: %s; want 2 flows to %s:443/tcp among would-drop, both open\n%s\nevents:\n%s", r, trackerName, out, d.events())
	}

	d.writePolicy(append(testPolicy(t), newRule...))
	d.hup(true)

	// The tunnel is open (the proxy reports it when it closes); capture
	// writes an event of the straight connection at once when a reload
	// credits it, so it counts from the log, open or not.
	after := func(r *creditReport) bool {
		f, _ := r.wouldDrop(trackerName, 443)
		u := r.rule("e2e-new")
		return f == 0 && u.Flows == 2 && u.OpenFlows >= 1 && u.to(trackerName) == 2 && !slices.Contains(r.UnusedRules, "e2e-new")
	}
	r, out = poll(after)
	if !after(r) {
		t.Fatalf("live report after the reload that adds e2e-new: %s; want 2 flows to %s under e2e-new, the tunnel open, the rule used, none among would-drop\n%s\nevents:\n%s\nlogs:\n%s", r, trackerName, out, d.events(), d.logs())
	}

	// Both connections still carry bytes (audit mode cut nothing).
	if _, err := ka.get("/after"); err != nil {
		t.Errorf("the straight connection after the reload: %v", err)
	}
	tc.Close()
	ka.close()
	d.stop()

	r, out = creditReportCLI(t, tp, "--state-dir", d.stateDir)
	if f, _ := r.wouldDrop(trackerName, 443); f != 0 || r.rule("e2e-new").Flows != 2 || r.rule("e2e-new").to(trackerName) != 2 || r.OpenFlows != 0 {
		t.Errorf("after the stop, the event log: %s, open %d; want 2 flows to %s under e2e-new, none among would-drop, none open\n%s\nevents:\n%s", r, r.OpenFlows, trackerName, out, d.events())
	}
}
