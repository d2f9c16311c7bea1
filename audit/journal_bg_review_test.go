package audit

import (
	"bytes"
	"strings"
	"testing"
)

// TestSuggestDuringBackgroundLoad: suggestions made while the event log is
// still being read at the start (or from a read that failed) say the
// counts they rest on are partial, as the report's other forms do, also
// when the report came from the daemon as JSON (`egressd report
// --suggest`): an operator must not build a policy from partial counts
// unknowingly.
func TestSuggestDuringBackgroundLoad(t *testing.T) {
	dir := t.TempDir()
	writeOldLog(t, dir, 300)
	release := make(chan struct{})
	stalled, _ := stallLoad(t, release)
	defer close(release)
	j, l, _ := openJournal(t, JournalConfig{Dir: dir, DetailBurst: -1, Background: true}, nil)
	runJournal(t, j)
	<-stalled
	r := l.Report(ReportOptions{})
	if r.Loading == nil {
		t.Fatal("report during the read: no Loading")
	}
	var js bytes.Buffer
	if err := r.WriteJSON(&js); err != nil {
		t.Fatal(err)
	}
	rj, err := ReadReportJSON(&js)
	if err != nil {
		t.Fatal(err)
	}
	for what, rep := range map[string]*Report{"live": r, "from JSON": rj} {
		var b bytes.Buffer
		if err := rep.WriteSuggestions(&b); err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(b.String(), "COUNTS ARE PARTIAL") {
			t.Errorf("%s: suggestions during the read do not say the counts are partial:\n%s", what, b.String())
		}
	}
}
