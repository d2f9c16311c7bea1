package audit

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
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
	rotateOut(t, j, weeklyEvents())
	// The weekly events are in no kept file: rotation deleted theirs.
	if files := keptFiles(t, dir, `"ntp"`, "weekly.example"); len(files) != 3 {
		t.Fatalf("%d files kept, want 2 rotated + current", len(files))
	}
	return l
}

// rotateOut runs j, a journal of tiny files not yet running, over early
// and, once they are written, 200 busy events a day later, so that
// rotation deletes the files of early; then it closes j.
func rotateOut(t *testing.T, j *Journal, early []Event) {
	t.Helper()
	go j.Run(context.Background())
	for _, ev := range early {
		j.Emit(ev)
	}
	waitFor(t, func() bool { return j.Written() == uint64(len(early)) })
	for _, ev := range busyEvents(200, t0.Add(24*time.Hour)) {
		j.Emit(ev)
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
}

// keptFiles are the log files in dir, none of which may hold any of
// marks: the events that carry them were rotated out.
func keptFiles(t *testing.T, dir string, marks ...string) []string {
	t.Helper()
	files, err := LogFiles(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range files {
		b, _ := os.ReadFile(f)
		for _, m := range marks {
			if bytes.Contains(b, []byte(m)) {
				t.Fatalf("%s still holds %s: the test rotated too little", f, m)
			}
		}
	}
	return files
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
		var txt, html, js bytes.Buffer
		r.WriteText(&txt)
		r.WriteHTML(&html)
		r.WriteJSON(&js)
		if !strings.Contains(txt.String(), "USED IN THE WINDOW BEFORE THE DETAILED LOG BEGINS (1)\n  ntp  last seen") ||
			!strings.Contains(html.String(), `id="used-before-detail"><li>ntp:`) || !strings.Contains(js.String(), `"used_before_detail": [`) {
			t.Errorf("%s: the text, HTML or JSON report does not list ntp as used before the detailed log:\n%s", name, txt.String())
		}
		// A window inside the detailed log needs no note.
		r = l.Report(ReportOptions{Now: reportNow, Since: t0.Add(24*time.Hour + 195*time.Second)})
		if len(r.Notes) != 0 || len(r.UsedBeforeDetail) != 0 || !slices.Contains(r.UnusedRules, "ntp") {
			t.Errorf("%s: a window inside the detailed log: notes %q, used before %+v, unused %q", name, r.Notes, r.UsedBeforeDetail, r.UnusedRules)
		}
	}
}

// TestArchiveCorrupt: a summary that cannot be read is a warning and a
// note, never a failed start: LoadDir (read-only) leaves it, the daemon
// (OpenJournal) sets it aside as .refused.1 and the next fold writes a new
// one; the kept files still load.
func TestArchiveCorrupt(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	for name, body := range map[string]string{
		"garbage":    "{not json",
		"version":    `{"version":0,"rules":[{"name":"ntp","flows":5}]}`,
		"span":       `{"version":1,"from":"2026-11-24T10:00:00Z","until":"2026-11-23T10:00:00Z"}`,
		"bad file":   `{"version":1,"last_file":"../events.ndjson"}`,
		"wrong type": `{"version":1,"rules":{"ntp":5}}`,
	} {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			var buf bytes.Buffer
			for i := range 3 {
				b, _ := jsonLine(seqEvent(i+1, t0.Add(time.Duration(i)*time.Second)))
				buf.Write(b)
			}
			if err := os.WriteFile(filepath.Join(dir, CurrentLog), buf.Bytes(), 0o640); err != nil {
				t.Fatal(err)
			}
			arch := filepath.Join(dir, ArchiveFile)
			if err := os.WriteFile(arch, []byte(body), 0o640); err != nil {
				t.Fatal(err)
			}
			temp := filepath.Join(dir, ArchiveFile+".tmp12345") // a killed write's
			if err := os.WriteFile(temp, []byte("{"), 0o640); err != nil {
				t.Fatal(err)
			}

			var logs syncBuffer
			lg := slog.New(slog.NewTextHandler(&logs, nil))
			l, st, err := LoadDir(dir, eng, LedgerOptions{}, lg)
			if err != nil {
				t.Fatalf("LoadDir: %v", err)
			}
			r := l.Report(ReportOptions{Now: reportNow})
			if st.Events != 3 || r.Totals.Flows != 3 || !strings.Contains(logs.String(), "summary of rotated-out event log files is unreadable") {
				t.Errorf("LoadDir: %+v, %d flows, logs:\n%s", st, r.Totals.Flows, logs.String())
			}
			if !slices.ContainsFunc(r.Notes, func(n string) bool { return strings.Contains(n, "could not be read") }) {
				t.Errorf("LoadDir: no note on the unreadable summary: %q", r.Notes)
			}
			if _, err := os.Stat(arch); err != nil {
				t.Errorf("LoadDir moved the summary: %v", err)
			}

			logs = syncBuffer{}
			j, l, st := openJournal(t, JournalConfig{Dir: dir, Logger: lg}, eng)
			if st.Events != 3 || l.Report(ReportOptions{}).Totals.Flows != 3 || !strings.Contains(logs.String(), "kept_as="+ArchiveFile+".refused.1") {
				t.Errorf("OpenJournal: %+v, logs:\n%s", st, logs.String())
			}
			if _, err := os.Stat(arch); !os.IsNotExist(err) {
				t.Errorf("the unreadable summary is still in place: %v", err)
			}
			if b, err := os.ReadFile(arch + ".refused.1"); err != nil || string(b) != body {
				t.Errorf("set-aside copy: %q, %v", b, err)
			}
			if _, err := os.Stat(temp); !os.IsNotExist(err) {
				t.Errorf("a killed write's temporary file is left: %v", err)
			}
			j.Close()
		})
	}
}

// TestArchiveBounded: the summary keeps what the ledger's bounds keep,
// however many destinations and clients the rotated-out files held, and
// still counts every flow.
func TestArchiveBounded(t *testing.T) {
	dir := t.TempDir()
	opt := LedgerOptions{MaxClients: 4, MaxDestinations: 8, MaxDropped: 16}
	l := NewLedger(nil, opt)
	j, _, err := OpenJournal(JournalConfig{Dir: dir, MaxFileBytes: 8000, MaxFiles: 1, Logger: slog.New(slog.DiscardHandler)}, l)
	if err != nil {
		t.Fatal(err)
	}
	go j.Run(context.Background())
	const n = 3000
	for i := range n {
		ev := seqEvent(i+1, t0.Add(time.Duration(i)*time.Second))
		ev.Client = netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)})
		ev.Name = fmt.Sprintf("host%d.example", i)
		if i%2 == 1 {
			ev.Verdict, ev.Rule, ev.Reason = policy.Deny, "", policy.ReasonNoRule
		}
		j.Emit(ev)
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(dir, ArchiveFile))
	if err != nil {
		t.Fatal(err)
	}
	a, err := parseArchive(b)
	if err != nil {
		t.Fatal(err)
	}
	if len(a.Open) == 0 || len(a.Open) > maxArchiveFlows || a.Open[0].End.Add(archiveFlowWindow).Before(a.Open[len(a.Open)-1].End) {
		t.Errorf("summary remembers %d flows at its end, want 1 to %d within %s", len(a.Open), maxArchiveFlows, archiveFlowWindow)
	}
	a.Open = nil
	if c, _ := json.Marshal(a); a.Events < n/2 || len(c) > 16<<10 {
		t.Errorf("summary of %d events is %d bytes without the flows at its end", a.Events, len(c))
	}
	if len(a.Rules) != 1 || len(a.Rules[0].Dests) > 8 || len(a.Rules[0].Clients) > 4 || !a.Rules[0].ClientsTruncated {
		t.Errorf("rules: %+v", a.Rules)
	}
	if len(a.Dropped) > 16 {
		t.Errorf("%d dropped entries, the ledger keeps 16", len(a.Dropped))
	}
	for _, d := range a.Dropped {
		if len(d.Clients) > 4 {
			t.Errorf("dropped %s: %d clients", d.Dest, len(d.Clients))
		}
	}
	l2, _, err := LoadDir(dir, nil, opt, nil)
	if err != nil {
		t.Fatal(err)
	}
	r := l2.Report(ReportOptions{})
	if r.Totals.Flows != n || r.Rules[0].Flows != n/2 {
		t.Errorf("after a restart: %d flows, rule %d; want %d, %d", r.Totals.Flows, r.Rules[0].Flows, n, n/2)
	}
	var dropped uint64
	for _, d := range r.Dropped {
		dropped += d.Flows
	}
	if dropped != n/2 || len(r.Dropped) > 16 {
		t.Errorf("after a restart: %d dropped entries with %d flows, want at most 16 with %d", len(r.Dropped), dropped, n/2)
	}
}

// TestArchiveFoldedFileLeft: a file the summary holds already (a crash
// came between the summary's write and the file's delete) is not counted
// twice, and the next fold deletes it.
func TestArchiveFoldedFileLeft(t *testing.T) {
	dir := t.TempDir()
	old := rotatedPrefix + "20261124T100000.000000000Z" + rotatedSuffix
	var buf bytes.Buffer
	for i := range 3 {
		b, _ := jsonLine(seqEvent(i+1, t0.Add(time.Duration(i)*time.Second)))
		buf.Write(b)
	}
	if err := os.WriteFile(filepath.Join(dir, old), buf.Bytes(), 0o640); err != nil {
		t.Fatal(err)
	}
	tmp := NewLedger(nil, LedgerOptions{})
	if _, _, err := ReadEvents(bytes.NewReader(buf.Bytes()), func(ev Event) { tmp.add(&ev) }); err != nil {
		t.Fatal(err)
	}
	a := tmp.export()
	a.From, a.Until, a.LastFile, a.Files, a.Events = t0, t0.Add(2*time.Second), old, 1, 3
	if err := writeArchive(dir, a); err != nil {
		t.Fatal(err)
	}
	l, st, err := LoadDir(dir, nil, LedgerOptions{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if r := l.Report(ReportOptions{}); r.Totals.Flows != 3 || st.Events != 0 || st.Summarized != 3 {
		t.Errorf("%d flows (load %+v), want 3 from the summary alone", r.Totals.Flows, st)
	}
	if r := l.Report(ReportOptions{Since: t0}); r.Totals.Flows != 0 {
		t.Errorf("a window re-read the folded file: %d flows", r.Totals.Flows)
	}
	// The daemon's next rotation folds and deletes it.
	j, _, err := OpenJournal(JournalConfig{Dir: dir, MaxFileBytes: 500, MaxFiles: 4, Logger: slog.New(slog.DiscardHandler)}, NewLedger(nil, LedgerOptions{}))
	if err != nil {
		t.Fatal(err)
	}
	go j.Run(context.Background())
	for i := range 5 {
		j.Emit(seqEvent(10+i, t0.Add(time.Hour+time.Duration(i)*time.Second)))
	}
	j.Close()
	if _, err := os.Stat(filepath.Join(dir, old)); !os.IsNotExist(err) {
		t.Errorf("the folded file is still there: %v", err)
	}
	l, _, _ = LoadDir(dir, nil, LedgerOptions{}, nil)
	if r := l.Report(ReportOptions{}); r.Totals.Flows != 8 {
		t.Errorf("%d flows after the restart, want 8", r.Totals.Flows)
	}
}

// TestArchiveReplay: a replay of a state directory says that the events
// of rotated-out files were not replayed, and how many.
func TestArchiveReplay(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	dir := t.TempDir()
	writeRotated(t, dir, eng, LedgerOptions{}, slog.New(slog.DiscardHandler))
	r := NewReplayer(eng, reportNow)
	st, err := ReplayPath(dir, r)
	if err != nil {
		t.Fatal(err)
	}
	res := r.Result()
	if res.RotatedOut == nil || res.RotatedOut.Events == 0 || res.RotatedOut.Events+st.Events != 206 || st.Summarized != res.RotatedOut.Events {
		t.Fatalf("rotated out %+v, %d events replayed (%+v), want 206 in all", res.RotatedOut, st.Events, st)
	}
	var txt bytes.Buffer
	res.WriteText(&txt)
	if !strings.Contains(txt.String(), fmt.Sprintf("not replayed: %d events of %d event log files rotated out", res.RotatedOut.Events, res.RotatedOut.Files)) {
		t.Errorf("replay text does not say what was not replayed:\n%s", txt.String())
	}
}

// FuzzParseArchive: no summary file, however broken, panics the load or
// a report, and what it holds stays within the ledger's bounds.
func FuzzParseArchive(f *testing.F) {
	l := NewLedger(nil, LedgerOptions{})
	for _, ev := range weeklyEvents() {
		l.add(&ev)
	}
	a := l.export()
	a.From, a.Until, a.LastFile = t0, t0.Add(time.Minute), rotatedPrefix+"x"+rotatedSuffix
	b, _ := json.Marshal(a)
	f.Add(b)
	f.Add([]byte(`{"version":1}`))
	f.Add([]byte(`{"version":1,"rules":[{"name":"a","clients":["1.2.3.4","::ffff:1.2.3.4"],"dests":[{"dest":"x","count":18446744073709551615}]}],"dropped":[{"dest":"d","ip":"::1"}]}`))
	f.Add([]byte("{not json"))
	f.Add([]byte(`{"version":1,"totals":{"allowed_flows":1},"rules":[{"name":"r","flows":1,"bytes_out":5}],"open_flows":[` +
		`{"kind":"flow","client":"192.168.1.2","client_port":1,"dest_ip":"198.18.0.1","dest_port":443,"proto":"tcp","start":"2026-01-01T00:00:00Z","end":"2026-01-01T00:00:00Z","bytes_out":9,"rule":"r"},` +
		`{"kind":"flow","client":"192.168.1.2","client_port":2,"dest_ip":"198.18.0.1","dest_port":443,"proto":"tcp","start":"2026-01-01T00:00:00Z","end":"2026-01-01T00:00:00Z","rule":"r"}]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		a, err := parseArchive(b)
		if err != nil {
			return
		}
		opt := LedgerOptions{MaxClients: 3, MaxDestinations: 3, MaxDropped: 4}
		l := NewLedger(nil, opt)
		l.importArchive(a)
		r := l.Report(ReportOptions{Since: time.Unix(0, 0)})
		var buf bytes.Buffer
		r.WriteText(&buf)
		out := l.export()
		if len(out.Rules) > maxArchiveRules || len(out.Dropped) > 4 {
			t.Fatalf("imported beyond the bounds: %d rules, %d dropped", len(out.Rules), len(out.Dropped))
		}
		for _, r := range out.Rules {
			if len(r.Clients) > 3 || len(r.Dests) > 3 {
				t.Fatalf("rule %q: %d clients, %d dests", r.Name, len(r.Clients), len(r.Dests))
			}
		}
		// The proxy's reports of the remembered flows, each decided the
		// other way: taking capture's counts back must not wrap one
		// below zero, whatever open_flows claims.
		before := map[string]uint64{}
		for _, r := range out.Rules {
			before["r"+r.Name] = max(r.Flows, r.Denied, r.BytesOut, r.BytesIn)
		}
		for _, d := range out.Dropped {
			before[fmt.Sprintf("d%s %d %s", d.Dest, d.Port, d.Proto)] = max(d.Flows, d.EnforcedFlows, d.BytesOut, d.BytesIn)
		}
		n := uint64(0)
		for _, f := range out.Open {
			if f.Kind != KindFlow || n == 64 {
				continue
			}
			n++
			ev := Event{Kind: KindFlow, Source: SourceProxy, Time: f.End, Client: f.Client, ClientPort: f.ClientPort, Dest: f.DestIP,
				DestPort: f.DestPort, Proto: f.Proto, Verdict: policy.Allow, Rule: "proxy", Mode: policy.ModeAudit}
			if f.Rule != "" {
				ev.Verdict, ev.Rule, ev.Reason, ev.Name = policy.Deny, "", policy.ReasonNoRule, "proxy.example"
			}
			l.add(&ev)
		}
		after := l.export()
		for _, r := range after.Rules {
			if m := max(r.Flows, r.Denied, r.BytesOut, r.BytesIn); m > before["r"+r.Name]+n && m > 1<<62 {
				t.Fatalf("rule %q wrapped below zero: %+v", r.Name, r)
			}
		}
		for _, d := range after.Dropped {
			if m := max(d.Flows, d.EnforcedFlows, d.BytesOut, d.BytesIn); m > before[fmt.Sprintf("d%s %d %s", d.Dest, d.Port, d.Proto)]+n && m > 1<<62 {
				t.Fatalf("dropped %q wrapped below zero: %+v", d.Dest, d)
			}
		}
	})
}

// TestArchiveNewerVersionLeftInPlace: a summary a newer egressd wrote (an
// operator rolled back to this binary) is left as it is, neither set
// aside nor written over, so that the newer binary finds it again when
// the operator upgrades once more; this one counts the kept files, says
// why the summary is not in its counts, and deletes the files rotation
// pushes out without adding them to it.
func TestArchiveNewerVersionLeftInPlace(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	dir := t.TempDir()
	var buf bytes.Buffer
	for i := range 3 {
		b, _ := jsonLine(seqEvent(i+1, t0.Add(time.Duration(i)*time.Second)))
		buf.Write(b)
	}
	if err := os.WriteFile(filepath.Join(dir, CurrentLog), buf.Bytes(), 0o640); err != nil {
		t.Fatal(err)
	}
	body := fmt.Sprintf(`{"version":%d,"files":9,"events":900,"rules":[{"name":"ntp","flows":900}],"new_field":{"x":1}}`, archiveVersion+1)
	arch := filepath.Join(dir, ArchiveFile)
	if err := os.WriteFile(arch, []byte(body), 0o640); err != nil {
		t.Fatal(err)
	}
	intact := func(when string) {
		t.Helper()
		if b, err := os.ReadFile(arch); err != nil || string(b) != body {
			t.Errorf("%s: the newer summary is not as it was: %q, %v", when, b, err)
		}
		if m, _ := filepath.Glob(arch + ".refused*"); len(m) > 0 {
			t.Errorf("%s: a set-aside summary exists: %v", when, m)
		}
	}

	var logs syncBuffer
	lg := slog.New(slog.NewTextHandler(&logs, nil))
	l, st, err := LoadDir(dir, eng, LedgerOptions{}, lg)
	if err != nil {
		t.Fatal(err)
	}
	r := l.Report(ReportOptions{Now: reportNow})
	if st.Events != 3 || r.Totals.Flows != 3 || !slices.ContainsFunc(r.Notes, func(n string) bool { return strings.Contains(n, "newer egressd") }) {
		t.Errorf("LoadDir: %+v, %d flows, notes %q", st, r.Totals.Flows, r.Notes)
	}
	intact("LoadDir")

	logs = syncBuffer{}
	j, l, st := openJournal(t, JournalConfig{Dir: dir, Logger: lg, MaxFileBytes: 600, MaxFiles: 1}, eng)
	if st.Events != 3 || !strings.Contains(logs.String(), "newer egressd") {
		t.Errorf("OpenJournal: %+v, logs:\n%s", st, logs.String())
	}
	intact("OpenJournal")
	go j.Run(context.Background())
	const n = 30
	for i := range n {
		j.Emit(seqEvent(100+i, t0.Add(time.Hour+time.Duration(i)*time.Second)))
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	if c := strings.Count(logs.String(), "deleting a rotated-out event log file without adding it to the summary"); c == 0 {
		t.Errorf("no file was pushed out by rotation (the test proves nothing), logs:\n%s", logs.String())
	}
	intact("after rotations")
	files, _ := LogFiles(dir)
	if len(files) != 2 {
		t.Errorf("%d files kept, want 1 rotated + current: %q", len(files), files)
	}
}

// TestArchiveRefusedKeptEach: each unreadable summary the daemon sets
// aside is kept under a name of its own, which the warning names: a
// second (another bad write, a disk fault again) does not overwrite the
// first. Before, both went to ledger-archive.json.refused.
func TestArchiveRefusedKeptEach(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	dir := t.TempDir()
	arch := filepath.Join(dir, ArchiveFile)
	var names []string
	for i := range 2 {
		body := fmt.Sprintf("{not json %d", i)
		if err := os.WriteFile(arch, []byte(body), 0o640); err != nil {
			t.Fatal(err)
		}
		var logs syncBuffer
		j, _, _ := openJournal(t, JournalConfig{Dir: dir, Logger: slog.New(slog.NewTextHandler(&logs, nil))}, eng)
		j.Close()
		var kept string
		ents, _ := os.ReadDir(dir)
		for _, e := range ents {
			if b, _ := os.ReadFile(filepath.Join(dir, e.Name())); string(b) == body && e.Name() != ArchiveFile {
				kept = e.Name()
			}
		}
		if kept == "" || !strings.Contains(logs.String(), "kept_as="+kept) {
			t.Errorf("refusal %d: kept as %q; logs:\n%s", i, kept, logs.String())
		}
		names = append(names, kept)
	}
	if names[0] == names[1] {
		t.Errorf("both refused summaries under one name %q", names[0])
	}
}
