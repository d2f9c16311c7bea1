package audit

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"egressd/policy"
)

// The state directory testdata/state-7ee10eb was written by egressd built
// from commit 7ee10eb (2026-12-04 08:43), run as
// `egressd run --mode audit --state-dir DIR --guard-wan ...` in the
// end-to-end test's namespaces (client, gateway, internet) with the e2e
// test policy (its policy.yaml, which egressd copied there). Two runs,
// each: dig A for production.cloudflare.docker.com (allowed),
// tracker.example and docker.com.evil.net (denied); curl
// https://production.cloudflare.docker.com (allowed), https://tracker.example
// (denied), https://198.51.100.131:5223 without SNI (apple-mdm) and
// https://203.0.113.20/ without SNI (denied); openssl s_client to
// agent-intake.logs.datadoghq.com:10516; stopped by SIGTERM. Between the
// runs events.ndjson was renamed as that binary's rotation names a file
// (events-<UTC time>.ndjson; the runs wrote far less than its 64 MiB).
// The figures below are that binary's own `egressd report --json
// --state-dir DIR --policy DIR/policy.yaml` and `egressd audit --replay
// DIR --json` of the directory. Session 22 upgraded and rolled back across
// 7ee10eb, 42eeac5 and 54cd69a this way (README, "Upgrading and rolling
// back"); the current code must go on reading such a directory as they
// did.

// oldRule and oldDrop are the fields of 7ee10eb's report JSON compared.
type oldRule struct {
	Name      string    `json:"name"`
	Flows     uint64    `json:"flows"`
	Queries   uint64    `json:"queries"`
	BytesOut  uint64    `json:"bytes_out"`
	BytesIn   uint64    `json:"bytes_in"`
	Clients   []string  `json:"clients"`
	FirstSeen time.Time `json:"first_seen"`
	LastSeen  time.Time `json:"last_seen"`
}

type oldDrop struct {
	Dest      string    `json:"dest"`
	IP        string    `json:"ip"`
	Port      uint16    `json:"port"`
	Proto     string    `json:"proto"`
	Flows     uint64    `json:"flows"`
	Queries   uint64    `json:"queries"`
	Clients   []string  `json:"clients"`
	Reason    string    `json:"reason"`
	FirstSeen time.Time `json:"first_seen"`
	LastSeen  time.Time `json:"last_seen"`
}

type oldTotals struct {
	Events       uint64 `json:"events"`
	Duplicates   uint64 `json:"duplicates"`
	Flows        uint64 `json:"flows"`
	AllowedFlows uint64 `json:"allowed_flows"`
	DroppedFlows uint64 `json:"dropped_flows"`
	Queries      uint64 `json:"queries"`
	Ignored      uint64 `json:"ignored"`
}

type oldReport struct {
	Rules       []oldRule `json:"rules"`
	UnusedRules []string  `json:"unused_rules"`
	Dropped     []oldDrop `json:"dropped"`
	ShedEvents  uint64    `json:"shed_events"`
	Totals      oldTotals `json:"totals"`
}

func ts(s string) time.Time {
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		panic(err)
	}
	return t
}

// report7ee10eb is what 7ee10eb reported of testdata/state-7ee10eb.
var report7ee10eb = oldReport{
	Rules: []oldRule{
		{"dns", 6, 0, 306, 402, []string{"198.18.1.10"}, ts("2026-12-05T17:06:45.826881428Z"), ts("2026-12-05T17:06:49.765368447Z")},
		{"vendor-cloud", 2, 2, 1538, 2616, []string{"198.18.1.10"}, ts("2026-12-05T17:06:45.771148547Z"), ts("2026-12-05T17:06:49.826848258Z")},
		{"health-logging", 2, 0, 922, 2468, []string{"198.18.1.10"}, ts("2026-12-05T17:06:46.683806633Z"), ts("2026-12-05T17:06:50.321597534Z")},
		{"apple-mdm", 2, 0, 1506, 2507, []string{"198.18.1.10"}, ts("2026-12-05T17:06:46.455073315Z"), ts("2026-12-05T17:06:50.025008662Z")},
	},
	UnusedRules: []string{"vendor-docs", "ntp", "nx-witness", "android-mdm"},
	Dropped: []oldDrop{
		{"tracker.example", "203.0.113.20", 443, "tcp", 4, 0, []string{"198.18.1.10"}, "no-rule", ts("2026-12-05T17:06:46.312234694Z"), ts("2026-12-05T17:06:50.088480836Z")},
		{"docker.com.evil.net", "", 53, "dns", 0, 2, []string{"198.18.1.10"}, "no-rule", ts("2026-12-05T17:06:46.098129421Z"), ts("2026-12-05T17:06:49.765579937Z")},
		{"tracker.example", "", 53, "dns", 0, 2, []string{"198.18.1.10"}, "no-rule", ts("2026-12-05T17:06:46.028348543Z"), ts("2026-12-05T17:06:49.625948167Z")},
	},
	Totals: oldTotals{Events: 22, Flows: 16, AllowedFlows: 12, DroppedFlows: 4, Queries: 6},
}

const state7ee10eb = "testdata/state-7ee10eb"

func fixturePolicy(t *testing.T, dir string) *policy.Engine {
	t.Helper()
	src, err := os.ReadFile(filepath.Join(dir, "policy.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	eng, err := policy.Compile(filepath.Join(dir, "policy.yaml"), src)
	if err != nil {
		t.Fatal(err)
	}
	return eng
}

// asOld reads r as 7ee10eb's report JSON is read.
func asOld(t *testing.T, r *Report) oldReport {
	t.Helper()
	var b bytes.Buffer
	if err := r.WriteJSON(&b); err != nil {
		t.Fatal(err)
	}
	var o oldReport
	if err := json.Unmarshal(b.Bytes(), &o); err != nil {
		t.Fatal(err)
	}
	return o
}

func diffOld(t *testing.T, what string, got, want oldReport) {
	t.Helper()
	gb, _ := json.MarshalIndent(got, "", " ")
	wb, _ := json.MarshalIndent(want, "", " ")
	if !bytes.Equal(gb, wb) {
		t.Errorf("%s: report differs from 7ee10eb's own\ngot  %s\nwant %s", what, gb, wb)
	}
}

// TestUpgradeReadsOldStateDir: the current code reports a state directory
// 7ee10eb wrote, and replays it, with that binary's figures.
func TestUpgradeReadsOldStateDir(t *testing.T) {
	eng := fixturePolicy(t, state7ee10eb)
	l, st, err := LoadDir(state7ee10eb, eng, LedgerOptions{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if st.Files != 2 || st.Events != 22 || st.Skipped != 0 || st.Torn {
		t.Errorf("load: %d files, %d events, %d skipped, torn %v; 7ee10eb read 2 files, 22 events", st.Files, st.Events, st.Skipped, st.Torn)
	}
	diffOld(t, "LoadDir", asOld(t, l.Report(ReportOptions{})), report7ee10eb)

	r := NewReplayer(eng, time.Now())
	if _, err := ReplayPath(state7ee10eb, r); err != nil {
		t.Fatal(err)
	}
	res := r.Result()
	if res.Events != 22 || res.Flows != 16 || res.Queries != 6 || res.Unchanged != 22 ||
		len(res.NewlyDropped)+len(res.NewlyAllowed)+len(res.RuleChanged) != 0 {
		t.Errorf("replay: %d events, %d flows, %d queries, %d unchanged, changes %v %v %v; 7ee10eb replayed 22, 16, 6, 22 unchanged, none",
			res.Events, res.Flows, res.Queries, res.Unchanged, res.NewlyDropped, res.NewlyAllowed, res.RuleChanged)
	}
}

// TestUpgradeFoldsOldFiles: the current daemon's event log opened on a
// copy of 7ee10eb's directory starts from its counts, and once rotation
// folds 7ee10eb's files into the summary (ledger-archive.json, which that
// binary did not have) the counts are still those plus the new events.
func TestUpgradeFoldsOldFiles(t *testing.T) {
	eng := fixturePolicy(t, state7ee10eb)
	dir := t.TempDir()
	ents, err := os.ReadDir(state7ee10eb)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(state7ee10eb, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, e.Name()), b, 0o640); err != nil {
			t.Fatal(err)
		}
	}
	j, l, st := openJournal(t, JournalConfig{Dir: dir, MaxFileBytes: 2000, MaxFiles: 1}, eng)
	if st.Events != 22 {
		t.Fatalf("open: %d events, want 7ee10eb's 22", st.Events)
	}
	diffOld(t, "OpenJournal", asOld(t, l.Report(ReportOptions{})), report7ee10eb)

	// New flows of the dns rule, after the old ones: enough to rotate a
	// few times, so both of 7ee10eb's files are folded.
	var base Event
	if _, _, err := ReadEvents(bytes.NewReader(mustRead(t, filepath.Join(dir, CurrentLog))), func(ev Event) {
		if base.Kind == "" && ev.Kind == KindFlow && ev.Rule == "dns" {
			base = ev
		}
	}); err != nil || base.Kind == "" {
		t.Fatalf("no dns flow in the fixture: %v", err)
	}
	go j.Run(context.Background())
	const n = 40
	for i := range n {
		ev := base
		ev.ClientPort = uint16(30000 + i)
		ev.Time = base.Time.Add(time.Hour + time.Duration(i)*time.Second)
		j.Emit(ev)
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"events-20261205T170648.802442066Z.ndjson"} {
		if _, err := os.Stat(filepath.Join(dir, name)); !os.IsNotExist(err) {
			t.Errorf("7ee10eb's %s still there after the rotations (err %v): nothing was folded, the test proves nothing", name, err)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, ArchiveFile)); err != nil {
		t.Fatalf("no summary after the rotations: %v", err)
	}

	want := report7ee10eb
	want.Rules = slices.Clone(want.Rules)
	want.Rules[0].Flows += n
	want.Rules[0].BytesOut += n * base.BytesOut
	want.Rules[0].BytesIn += n * base.BytesIn
	want.Rules[0].LastSeen = base.Time.Add(time.Hour + (n-1)*time.Second)
	want.Totals.Events += n
	want.Totals.Flows += n
	want.Totals.AllowedFlows += n

	l2, st2, err := LoadDir(dir, eng, LedgerOptions{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if st2.SummarizedFiles == 0 {
		t.Errorf("load after the folds: no file summarized (%+v)", st2)
	}
	diffOld(t, "LoadDir after the folds", asOld(t, l2.Report(ReportOptions{})), want)
}

func mustRead(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestUpgradeReadsArchiveV1: testdata/archive-v1/ledger-archive.json is a
// summary of rotated-out files (format version 1) as session 22's code
// wrote it (egressd's own Journal, with the 7ee10eb test above committed): testdata/state-7ee10eb's files and 40 more flows of
// the dns rule (60–99 s after the first dns flow of its events.ndjson),
// folded by a Journal with MaxFileBytes 2000 and MaxFiles 1. That code's `egressd report --json
// --state-dir` of a directory holding only it (and state-7ee10eb's
// policy.yaml) gave the figures below. A later change to the summary must
// go on reading a version 1 file so, or bump archiveVersion.
func TestUpgradeReadsArchiveV1(t *testing.T) {
	eng := fixturePolicy(t, state7ee10eb)
	l, st, err := LoadDir("testdata/archive-v1", eng, LedgerOptions{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if st.Files != 0 || st.Summarized != 53 || st.SummarizedFiles != 7 {
		t.Errorf("load: %d files, a summary of %d events of %d files; want 0, 53 of 7", st.Files, st.Summarized, st.SummarizedFiles)
	}
	want := report7ee10eb
	want.Rules = slices.Clone(want.Rules)
	want.Rules[0] = oldRule{"dns", 37, 0, 2197, 2789, []string{"198.18.1.10"}, ts("2026-12-05T17:06:45.826881428Z"), ts("2026-12-05T17:08:19.439631678Z")}
	want.Totals = oldTotals{Events: 53, Flows: 47, AllowedFlows: 43, DroppedFlows: 4, Queries: 6}
	r := l.Report(ReportOptions{})
	diffOld(t, "LoadDir", asOld(t, r), want)
	if c := r.Coverage; c == nil || c.RotatedOut == nil || c.RotatedOut.Files != 7 || c.RotatedOut.Events != 53 ||
		!c.RotatedOut.From.Equal(ts("2026-12-05T17:06:45.771148547Z")) || !c.RotatedOut.Until.Equal(ts("2026-12-05T17:08:19.439631678Z")) {
		t.Errorf("coverage %+v, want 53 events of 7 files rotated out, 17:06:45.771148547–17:08:19.439631678", c)
	}
}

// TestEventLogReadsLaterFields: the event log has no format version; a
// line a later egressd writes with a field this one does not know is read
// for the fields it knows, and an event of a kind it does not know is
// counted as ignored, not as a flow nor skipped as a bad line. So after a
// rollback this binary counts what it understands of the newer events.
func TestEventLogReadsLaterFields(t *testing.T) {
	dir := t.TempDir()
	lines := `{"kind":"flow","source":"capture","time":"2026-12-05T17:06:45Z","client":"198.18.1.10","client_port":40000,"dest":"203.0.113.10","dest_port":443,"proto":"tcp","name":"production.cloudflare.docker.com","verdict":"allow","rule":"vendor-cloud","mode":"audit","reason":"allowed","later":{"x":[1,2]},"later_count":7}
{"kind":"later-kind","source":"capture","time":"2026-12-05T17:06:46Z","client":"198.18.1.10","verdict":"allow","rule":"vendor-cloud","mode":"audit"}
`
	if err := os.WriteFile(filepath.Join(dir, CurrentLog), []byte(lines), 0o640); err != nil {
		t.Fatal(err)
	}
	l, st, err := LoadDir(dir, nil, LedgerOptions{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	r := l.Report(ReportOptions{})
	if st.Events != 2 || st.Skipped != 0 || r.Totals.Flows != 1 || r.Totals.Ignored != 1 ||
		len(r.Rules) != 1 || r.Rules[0].Name != "vendor-cloud" || r.Rules[0].Flows != 1 {
		t.Errorf("load %+v, totals %+v, rules %+v; want 2 events, none skipped, 1 flow of vendor-cloud, 1 ignored", st, r.Totals, r.Rules)
	}
}
