package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// openRuleCounts are a report's flows and open flows of one rule.
type openRuleCounts struct {
	Name      string `json:"name"`
	Flows     uint64 `json:"flows"`
	OpenFlows uint64 `json:"open_flows"`
	Top       []struct {
		Dest  string `json:"dest"`
		Count uint64 `json:"count"`
	} `json:"top_destinations"`
}

// to returns the rule's count of flows to dest.
func (u openRuleCounts) to(dest string) uint64 {
	for _, d := range u.Top {
		if d.Dest == dest {
			return d.Count
		}
	}
	return 0
}

type openReport struct {
	Rules       []openRuleCounts `json:"rules"`
	UnusedRules []string         `json:"unused_rules"`
	OpenFlows   uint64           `json:"open_flows"`
}

// rule returns the counts of the rule named name (zero when absent).
func (r *openReport) rule(name string) openRuleCounts {
	for _, u := range r.Rules {
		if u.Name == name {
			return u
		}
	}
	return openRuleCounts{Name: name}
}

// TestOpenFlowsLive: in audit mode a LAN client's NTP exchange and its DNS
// query to another resolver than the gateway's are UDP flows capture
// reports only after 60 s of silence. The daemon's live report (`egressd
// report` against the admin address) counts them right away, as open, one
// flow each, so neither rule is unused; asked again it still counts each
// once; and after the daemon stops (its shutdown reports capture's open
// flows) the event log counts each exactly once. (The dns rule also
// counts the flows of the queries to the gateway's forwarder that
// resolved the NTP server's name, open as well.)
func TestOpenFlowsLive(t *testing.T) {
	tp := newTopo(t)
	d := newDaemon(t, tp, "audit")
	d.start()

	if lost, err := tp.ntp(ntpName, 3); err != nil {
		t.Fatalf("NTP to %s: %v (%d lost)", ntpName, err, lost)
	}
	if m, err := dnsAsk(tp.lan, lanClient4, authDNS4, dockerName, dns.TypeA, false); err != nil || m.Rcode != dns.RcodeSuccess {
		t.Fatalf("DNS to %s straight: %v %v", authDNS4, m, err)
	}

	report := func(args ...string) (*openReport, string) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", tp.gw.Name, egressdBin, "report", "--json"}, args...)...)
		var stderr strings.Builder
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("egressd report %v: %v\n%s", args, err, stderr.String())
		}
		var r openReport
		if err := json.Unmarshal(out, &r); err != nil {
			t.Fatalf("egressd report %v: %v\n%s", args, err, out)
		}
		return &r, string(out)
	}
	state := func(r *openReport) string {
		return fmt.Sprintf("ntp %+v, dns %+v (to %s: %d), open %d, unused %v", r.rule("ntp"), r.rule("dns"), authDNS4, r.rule("dns").to(authDNS4), r.OpenFlows, r.UnusedRules)
	}
	live := func(r *openReport) bool {
		ntp, dn := r.rule("ntp"), r.rule("dns")
		return ntp.Flows == 1 && ntp.OpenFlows == 1 && dn.to(authDNS4) == 1 && dn.Flows >= 2 && dn.OpenFlows == dn.Flows
	}

	// Capture sees the packets once the kernel hands over their block
	// (64 ms); the flows are reported after 60 s of silence, so a count
	// within 10 s is the open one.
	var r *openReport
	var liveOut string
	deadline := time.Now().Add(10 * time.Second)
	for i := 0; i < 100; i++ {
		r, liveOut = report("--admin", adminAddr)
		if live(r) || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if !live(r) || slices.Contains(r.UnusedRules, "ntp") || slices.Contains(r.UnusedRules, "dns") {
		t.Fatalf("live report: %s; want ntp 1 flow, dns 1 to %s and 1 or more to the gateway, all open, neither unused\n%s\nevents:\n%s", state(r), authDNS4, liveOut, d.events())
	}
	dnsFlows := r.rule("dns").Flows
	// Asked again, each is still counted once.
	if r, _ = report("--admin", adminAddr); !live(r) || r.rule("dns").Flows != dnsFlows {
		t.Errorf("live report asked again: %s; want as before (dns %d flows), all open", state(r), dnsFlows)
	}
	if ev := d.events(); strings.Contains(ev, ":123/udp") {
		t.Fatalf("the NTP flow was reported already (within 60 s of silence?):\n%s", ev)
	}

	d.stop() // capture reports the open flows at shutdown
	r, out := report("--state-dir", d.stateDir)
	if ntp, dn := r.rule("ntp"), r.rule("dns"); ntp.Flows != 1 || dn.Flows != dnsFlows || dn.to(authDNS4) != 1 || ntp.OpenFlows != 0 || dn.OpenFlows != 0 || r.OpenFlows != 0 {
		t.Errorf("after the stop, the event log: %s; want ntp 1 flow, dns %d (1 to %s), none open\n%s\nevents:\n%s", state(r), dnsFlows, authDNS4, out, d.events())
	}
}
