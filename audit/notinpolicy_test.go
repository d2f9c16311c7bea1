package audit

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"egressd/policy"
)

// TestNotInPolicyMarked: after a reload that renamed a rule ("ntp" to
// "time"), the report says plainly that the old name is not in the
// current policy, in the rules table and in the list of rules used
// before the detailed log (text, JSON, HTML), lists the new name as
// unused, and does not tell the old one apart from unused rules as if it
// were one of the policy's.
func TestNotInPolicyMarked(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	dir := t.TempDir()
	live := writeRotated(t, dir, eng, LedgerOptions{}, nil)
	src, err := os.ReadFile(filepath.Join("testdata", "policy.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	renamed, err := policy.Compile("renamed.yaml", bytes.Replace(src, []byte("name: ntp"), []byte("name: time"), 1))
	if err != nil {
		t.Fatal(err)
	}
	live.SetPolicy(renamed)
	loaded, _, err := LoadDir(dir, renamed, LedgerOptions{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	for name, l := range map[string]*Ledger{"live": live, "LoadDir": loaded} {
		// The whole period: the rules table marks ntp.
		r := l.Report(ReportOptions{Now: reportNow})
		if u := ruleByName(r, "ntp"); u == nil || u.InPolicy {
			t.Errorf("%s: ntp = %+v, want used, not in policy", name, u)
		}
		if !slices.Contains(r.UnusedRules, "time") || slices.Contains(r.UnusedRules, "ntp") {
			t.Errorf("%s: unused %q, want time and not ntp", name, r.UnusedRules)
		}
		// A window before the detailed log: ntp is used before it, not
		// in the policy, and said so.
		r = l.Report(ReportOptions{Now: reportNow, Since: t0.Add(-time.Hour)})
		if len(r.UsedBeforeDetail) != 1 || r.UsedBeforeDetail[0].Name != "ntp" || r.UsedBeforeDetail[0].InPolicy {
			t.Fatalf("%s: used before detail = %+v, want ntp, not in policy", name, r.UsedBeforeDetail)
		}
		if !slices.Contains(r.UnusedRules, "time") {
			t.Errorf("%s: unused %q, want time", name, r.UnusedRules)
		}
		for _, n := range r.Notes {
			if strings.Contains(n, "not as unused") {
				t.Errorf("%s: the note counts a rule not in the policy as one kept from the unused list: %q", name, n)
			}
		}
		var txt, html, js bytes.Buffer
		r.WriteText(&txt)
		r.WriteHTML(&html)
		r.WriteJSON(&js)
		if !strings.Contains(txt.String(), "USED IN THE WINDOW BEFORE THE DETAILED LOG BEGINS (1)\n  ntp (not in policy)  last seen") {
			t.Errorf("%s: the text report does not mark ntp as not in policy:\n%s", name, txt.String())
		}
		if !strings.Contains(html.String(), `id="used-before-detail"><li>ntp <em>(not in policy)</em>:`) {
			t.Errorf("%s: the HTML report does not mark ntp as not in policy", name)
		}
		var dec struct {
			UsedBeforeDetail []map[string]any `json:"used_before_detail"`
		}
		if err := json.Unmarshal(js.Bytes(), &dec); err != nil || len(dec.UsedBeforeDetail) != 1 || dec.UsedBeforeDetail[0]["in_policy"] != false {
			t.Errorf("%s: the JSON report does not mark ntp as not in policy (%v): %+v", name, err, dec.UsedBeforeDetail)
		}
	}
}
