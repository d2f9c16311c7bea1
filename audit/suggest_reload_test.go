package audit

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"egressd/policy"
)

// TestSuggestAfterReloadAllows: the operator pastes the suggestions and
// reloads; the drops recorded before stay in the report (history), but
// the next --suggest proposes no rule for what the running policy allows
// now (it says so in a comment), so its snippet pasted after the policy
// passes policy check with no shadowed rule. A drop the new policy still
// denies is suggested as before.
func TestSuggestAfterReloadAllows(t *testing.T) {
	eng, err := policy.Compile("site.yaml", []byte(suggestBase))
	if err != nil {
		t.Fatal(err)
	}
	l := NewLedger(eng, LedgerOptions{})
	deny := captureDenials(l)
	deny("tracker.example", "192.168.50.23", "aa:bb:cc:00:00:0a")
	deny("updates.example.org", "192.168.50.30", "")
	var first bytes.Buffer
	if err := l.Report(ReportOptions{Now: reportNow}).WriteSuggestions(&first); err != nil {
		t.Fatal(err)
	}
	pasted := suggestBase + first.String()
	eng2, err := policy.Compile("site.yaml", []byte(pasted))
	if err != nil {
		t.Fatalf("the first suggestions do not compile: %v\n%s", err, first.String())
	}
	l.SetPolicy(eng2)
	deny("still.example", "192.168.50.30", "")

	r := l.Report(ReportOptions{Now: reportNow})
	if len(r.Dropped) != 3 {
		t.Errorf("%d dropped entries after the reload, want the 3 recorded", len(r.Dropped))
	}
	for _, d := range r.Dropped {
		want := map[string]string{"tracker.example": "allow-tracker-example", "updates.example.org": "allow-example-org"}[d.Dest]
		if d.AllowedNow != want {
			t.Errorf("%s: allowed_now %q, want %q", d.Dest, d.AllowedNow, want)
		}
	}
	var second bytes.Buffer
	if err := r.WriteSuggestions(&second); err != nil {
		t.Fatal(err)
	}
	snip := second.String()
	if strings.Contains(snip, "tracker.example") && !strings.Contains(snip, "# 2 dropped entries") {
		t.Errorf("tracker.example suggested again though allow-tracker-example allows it now:\n%s", snip)
	}
	if !strings.Contains(snip, `to: ["still.example"]`) {
		t.Errorf("still.example, which the running policy denies, is not suggested:\n%s", snip)
	}
	if !strings.Contains(snip, "# 2 dropped entries the running policy allows now") {
		t.Errorf("no comment says why the entries the policy allows now are left out:\n%s", snip)
	}
	eng3, err := policy.Compile("site.yaml", []byte(pasted+snip))
	if err != nil {
		t.Fatalf("the second suggestions do not compile: %v\n%s", err, snip)
	}
	for _, w := range eng3.Warnings() {
		if !strings.Contains(w.Msg, "clients by MAC address") {
			t.Errorf("warning: %s\n%s", w.Msg, snip)
		}
	}
}

// TestAllowedNowFollowsChanges: a report remembers each dropped entry's
// allowed_now (allowedNowLocked) and decides it again when what it rests
// on changes: the running policy (a reload), a rule expired since, a new
// client or a new MAC of a client.
func TestAllowedNowFollowsChanges(t *testing.T) {
	compile := func(rules string) *policy.Engine { return compileBase(t, rules) }
	l := NewLedger(compile(""), LedgerOptions{})
	deny := captureDenials(l)
	deny("tracker.example", "192.168.50.23", "aa:bb:cc:00:00:0a")
	check := func(step string, now time.Time, want string) {
		t.Helper()
		for range 2 { // the second from the memo
			r := l.Report(ReportOptions{Now: now})
			if len(r.Dropped) != 1 || r.Dropped[0].AllowedNow != want {
				t.Fatalf("%s: dropped %+v, want allowed_now %q", step, r.Dropped, want)
			}
		}
	}
	check("before the reload", reportNow, "")
	l.SetPolicy(compile(`  - name: by-mac
    from: [aa:bb:cc:00:00:0a]
    to: ["tracker.example"]
    ports: [443/tcp]
`))
	check("the MAC's rule", reportNow, "by-mac")
	deny("tracker.example", "192.168.50.23", "aa:bb:cc:00:00:0b")
	check("the client with a second MAC", reportNow, "")
	l.SetPolicy(compile(`  - name: until-dec
    to: ["tracker.example"]
    ports: [443/tcp]
    expires: 2026-11-30
`))
	check("a rule for everyone", reportNow, "until-dec")
	check("that rule expired", time.Date(2026, 12, 2, 0, 0, 0, 0, time.UTC), "")
	check("back before it expired", reportNow, "until-dec")
	l.SetPolicy(compile(`  - name: lan-50
    from: [192.168.50.0/24]
    to: ["tracker.example"]
    ports: [443/tcp]
`))
	check("a rule for the LAN", reportNow, "lan-50")
	deny("tracker.example", "192.168.60.7", "")
	check("a client off that LAN", reportNow, "")
}

// compileBase compiles suggestBase with rules after its own.
func compileBase(tb testing.TB, rules string) *policy.Engine {
	tb.Helper()
	eng, err := policy.Compile("site.yaml", []byte(suggestBase+rules))
	if err != nil {
		tb.Fatal(err)
	}
	return eng
}
