package audit

import (
	"encoding/json"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"egressd/policy"
)

// TestLogRuleAndMACBounded: an alarm and a flow read back from a log
// whose rule and MAC are as long as a line may be (a damaged or forged
// log: egressd writes a policy's rule name and a neighbour's MAC) are
// kept cut to 255 bytes, as the summary's import cuts them, not at the
// log's length in each of up to 1,024 alarm entries and every rule.
func TestLogRuleAndMACBounded(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	dir := t.TempDir()
	long := strings.Repeat("r", 100_000)
	mac := strings.Repeat("m", 100_000)
	alarm := Event{Kind: KindAlarm, Source: SourceDNS, Time: t0, Client: netip.MustParseAddr("192.168.10.7"), ClientMAC: mac,
		Proto: "udp", Name: "t.tenant.example", Count: 512, Verdict: policy.Allow, Rule: long, Mode: policy.ModeAudit, Reason: "dns-tunnel"}
	flow := seqEvent(1, t0)
	flow.Rule, flow.ClientMAC = long, mac
	drop := seqEvent(2, t0)
	drop.Verdict, drop.Rule, drop.Reason, drop.Name, drop.ClientMAC = policy.Deny, long, policy.ReasonNoRule, "late.example", mac
	var b []byte
	for _, ev := range []Event{alarm, flow, drop} {
		line, err := json.Marshal(ev)
		if err != nil {
			t.Fatal(err)
		}
		b = append(append(b, line...), '\n')
	}
	if err := os.WriteFile(filepath.Join(dir, "events.ndjson"), b, 0o600); err != nil {
		t.Fatal(err)
	}
	l, _, err := LoadDir(dir, eng, LedgerOptions{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	r := l.Report(ReportOptions{Now: reportNow})
	if len(r.Alarms) != 1 || r.Totals.Flows != 2 {
		t.Fatalf("alarms %d, flows %d: want the alarm and both flows read", len(r.Alarms), r.Totals.Flows)
	}
	if a := r.Alarms[0]; a.ClientMAC != Clip(mac, MaxNameBytes) || a.Rule != Clip(long, MaxNameBytes) {
		t.Errorf("alarm read back keeps a MAC of %d bytes and a rule of %d, want each cut to %d", len(a.ClientMAC), len(a.Rule), MaxNameBytes)
	}
	for _, u := range r.Rules {
		if len(u.Name) > MaxNameBytes {
			t.Errorf("rule of %d bytes read back, want at most %d", len(u.Name), MaxNameBytes)
		}
	}
	for _, d := range r.Dropped {
		if len(d.Rule) > MaxNameBytes {
			t.Errorf("dropped entry's rule of %d bytes read back, want at most %d", len(d.Rule), MaxNameBytes)
		}
	}
}
