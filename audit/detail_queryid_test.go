package audit

import (
	"bufio"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestDetailSummaryNoQueryID: a summary record of held-back queries
// stands for many queries (their shape, no client port); it must not
// carry one query's DNS message ID, as if it were that query.
func TestDetailSummaryNoQueryID(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	dir := t.TempDir()
	j, _, _ := openJournal(t, JournalConfig{Dir: dir, DetailBurst: 10, DetailRate: 1, DetailInterval: time.Hour}, eng)
	now := time.Date(2026, 12, 5, 10, 0, 0, 0, time.UTC)
	j.now = func() time.Time { return now }
	for i := range 50 {
		j.Emit(dnsEvent(eng, now.Add(time.Duration(i)*10*time.Millisecond), 5354, uint16(100+i), "tracker.example"))
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	files, _ := filepath.Glob(filepath.Join(dir, "*"))
	summaries := 0
	for _, f := range files {
		fh, err := os.Open(f)
		if err != nil {
			t.Fatal(err)
		}
		sc := bufio.NewScanner(fh)
		for sc.Scan() {
			line := sc.Text()
			if !strings.Contains(line, `"count":`) {
				continue
			}
			summaries++
			if strings.Contains(line, `"query_id"`) {
				t.Errorf("a summary of queries carries one query's ID: %s", line)
			}
		}
		fh.Close()
	}
	if summaries == 0 {
		t.Fatalf("no summary record in %v: the test does not reach the detail budget", files)
	}
}
