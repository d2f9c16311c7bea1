package audit

import (
	"bytes"
	"context"
	"log/slog"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"egressd/policy"
)

// weeklyEvents are what a weekly job does: a few flows under "ntp" and a
// would-be drop, all at t0; busyEvents are a busy site's flows under
// "vendor-cloud" a day later, enough to rotate the weekly ones out.
func weeklyEvents() []Event {
	var evs []Event
	for i := range 5 {
		ev := seqEvent(i+1, t0.Add(time.Duration(i)*time.Second))
		ev.Rule, ev.Proto, ev.DestPort = "ntp", "udp", 123
		evs = append(evs, ev)
	}
	drop := seqEvent(100, t0.Add(10*time.Second))
	drop.Verdict, drop.Rule, drop.Reason, drop.Name = policy.Deny, "", policy.ReasonNoRule, "weekly.example"
	return append(evs, drop)
}

func busyEvents(n int, start time.Time) []Event {
	evs := make([]Event, n)
	for i := range evs {
		ev := seqEvent(1000+i, start.Add(time.Duration(i)*time.Second))
		ev.Rule = "vendor-cloud"
		evs[i] = ev
	}
	return evs
}

// writeRotated runs a journal with tiny files over the weekly events and
// then the busy ones, so that rotation deletes the files of the weekly
// ones, and returns the journal's ledger (closed).
func writeRotated(t *testing.T, dir string, eng *policy.Engine, opt LedgerOptions, lg *slog.Logger) *Ledger {
	t.Helper()
	l := NewLedger(eng, opt)
	j, _, err := OpenJournal(JournalConfig{Dir: dir, MaxFileBytes: 2000, MaxFiles: 2, Logger: lg}, l)
	if err != nil {
		t.Fatal(err)
	}
	go j.Run(context.Background())
	weekly := weeklyEvents()
	for _, ev := range weekly {
		j.Emit(ev)
	}
	waitFor(t, func() bool { return j.Written() == uint64(len(weekly)) })
	for _, ev := range busyEvents(200, t0.Add(24*time.Hour)) {
		j.Emit(ev)
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	// The weekly events are in no kept file: rotation deleted theirs.
	files, err := LogFiles(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		b, _ := os.ReadFile(f)
		if bytes.Contains(b, []byte(`"ntp"`)) || bytes.Contains(b, []byte("weekly.example")) {
			t.Fatalf("%s still holds the weekly events: the test rotated too little", f)
		}
	}
	if len(files) != 3 {
		t.Fatalf("%d files kept, want 2 rotated + current", len(files))
	}
	return l
}

func ruleByName(r *Report, name string) *RuleReport {
	for i := range r.Rules {
		if r.Rules[i].Name == name {
			return &r.Rules[i]
		}
	}
	return nil
}

// TestArchiveKeepsRotatedUse: a rule used only in events whose file
// rotation deleted is still reported used, with its count and first
// seen, after a restart (OpenJournal) and from the state directory
// (LoadDir); so is a would-be drop seen only there; and the report says
// what it has in detail.
func TestArchiveKeepsRotatedUse(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	dir := t.TempDir()
	live := writeRotated(t, dir, eng, LedgerOptions{}, nil)
	want := live.Report(ReportOptions{Now: reportNow})
	if u := ruleByName(want, "ntp"); u == nil || u.Flows != 5 {
		t.Fatalf("live ledger: ntp = %+v, want 5 flows", u)
	}

	_, restarted, _ := openJournal(t, JournalConfig{Dir: dir, MaxFileBytes: 2000, MaxFiles: 2}, eng)
	loaded, st, err := LoadDir(dir, eng, LedgerOptions{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if st.Summarized == 0 {
		t.Errorf("LoadDir stats %+v: no summarized events", st)
	}
	for name, l := range map[string]*Ledger{"OpenJournal": restarted, "LoadDir": loaded} {
		r := l.Report(ReportOptions{Now: reportNow})
		u := ruleByName(r, "ntp")
		if u == nil || u.Flows != 5 || !u.FirstSeen.Equal(t0) {
			t.Errorf("%s: ntp = %+v, want 5 flows first seen %s", name, u, t0)
		}
		if slices.Contains(r.UnusedRules, "ntp") {
			t.Errorf("%s: ntp listed unused: %q", name, r.UnusedRules)
		}
		if !slices.ContainsFunc(r.Dropped, func(d DroppedReport) bool { return d.Dest == "weekly.example" && d.Flows == 1 }) {
			t.Errorf("%s: the would-be drop of weekly.example vanished: %+v", name, r.Dropped)
		}
		if r.Totals.Flows != want.Totals.Flows {
			t.Errorf("%s: %d flows, the live ledger counted %d", name, r.Totals.Flows, want.Totals.Flows)
		}
		c := r.Coverage
		if c == nil || c.RotatedOut == nil || !c.RotatedOut.From.Equal(t0) || c.RotatedOut.Files == 0 || c.RotatedOut.Events == 0 ||
			!c.DetailFrom.Equal(c.RotatedOut.Until) || c.DetailFrom.Before(t0.Add(10*time.Second)) {
			t.Errorf("%s: coverage %+v, want a summary from %s", name, c, t0)
		}
		var txt, html bytes.Buffer
		r.WriteText(&txt)
		r.WriteHTML(&html)
		if !strings.Contains(txt.String(), "rotated out") || !strings.Contains(html.String(), `id="coverage"`) {
			t.Errorf("%s: the text or HTML report does not say what it covers:\n%s", name, txt.String())
		}
	}
}

// TestArchiveSinceWindow: a window that starts before the oldest kept
// event does not list a rule used in it, before then, as unused, and
// says where its counts start; live (no restart) and from LoadDir.
func TestArchiveSinceWindow(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	dir := t.TempDir()
	live := writeRotated(t, dir, eng, LedgerOptions{}, nil)
	loaded, _, err := LoadDir(dir, eng, LedgerOptions{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	since := t0.Add(-time.Hour)
	for name, l := range map[string]*Ledger{"live": live, "LoadDir": loaded} {
		r := l.Report(ReportOptions{Now: reportNow, Since: since})
		if slices.Contains(r.UnusedRules, "ntp") {
			t.Errorf("%s: ntp listed unused in a window that holds its use: %q", name, r.UnusedRules)
		}
		if len(r.UsedBeforeDetail) != 1 || r.UsedBeforeDetail[0].Name != "ntp" || r.UsedBeforeDetail[0].Uses != 5 {
			t.Errorf("%s: used before detail = %+v, want ntp with 5", name, r.UsedBeforeDetail)
		}
		if !slices.ContainsFunc(r.Notes, func(n string) bool { return strings.Contains(n, "counts in this window start at") }) {
			t.Errorf("%s: no note on where the window's counts start: %q", name, r.Notes)
		}
		// A window inside the detailed log needs no note.
		r = l.Report(ReportOptions{Now: reportNow, Since: t0.Add(24*time.Hour + 195*time.Second)})
		if len(r.Notes) != 0 || len(r.UsedBeforeDetail) != 0 || !slices.Contains(r.UnusedRules, "ntp") {
			t.Errorf("%s: a window inside the detailed log: notes %q, used before %+v, unused %q", name, r.Notes, r.UsedBeforeDetail, r.UnusedRules)
		}
	}
}
