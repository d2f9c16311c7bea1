package audit

import (
	"bytes"
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/google/go-cmp/cmp"

	"egressd/policy"
)

// TestBound: a valid name, however long, is kept whole; a longer name,
// path or front is cut to its bound with TruncMark at the end, on a
// character boundary, its length kept; a cut name is never a valid one;
// bounding again changes nothing.
func TestBound(t *testing.T) {
	label := strings.Repeat("a", 63)
	valid253 := label + "." + label + "." + label + "." + strings.Repeat("b", 61)
	for _, n := range []string{valid253, valid253 + ".", strings.Repeat("c", 255)} {
		ev := Event{Name: n, Front: n}
		ev.Bound()
		if ev.Name != n || ev.Front != n || ev.NameLen != 0 || ev.FrontLen != 0 {
			t.Errorf("a name of %d bytes was changed: %d bytes, name_len %d", len(n), len(ev.Name), ev.NameLen)
		}
	}
	path := "/" + strings.Repeat("é", 1500) // 3001 bytes, two per character
	ev := Event{Name: strings.Repeat("x", 256), Path: path, Front: strings.Repeat("f", 60000)}
	ev.Bound()
	if len(ev.Name) != MaxNameBytes || !strings.HasSuffix(ev.Name, TruncMark) || ev.NameLen != 256 {
		t.Errorf("name: %d bytes %q..., name_len %d", len(ev.Name), ev.Name[len(ev.Name)-8:], ev.NameLen)
	}
	if _, ok := policy.NormalizeName(ev.Name); ok {
		t.Errorf("the cut name %q is a valid name", ev.Name)
	}
	if len(ev.Path) > MaxPathBytes || len(ev.Path) < MaxPathBytes-utf8.UTFMax || !strings.HasPrefix(path, strings.TrimSuffix(ev.Path, TruncMark)) ||
		!strings.HasSuffix(ev.Path, TruncMark) || !utf8.ValidString(ev.Path) || ev.PathLen != len(path) {
		t.Errorf("path: %d bytes, valid UTF-8 %v, path_len %d", len(ev.Path), utf8.ValidString(ev.Path), ev.PathLen)
	}
	if len(ev.Front) != MaxNameBytes || ev.FrontLen != 60000 {
		t.Errorf("front: %d bytes, front_len %d", len(ev.Front), ev.FrontLen)
	}
	again := ev
	again.Bound()
	if !reflect.DeepEqual(again, ev) {
		t.Errorf("bounding again changed the event: %+v", again)
	}
	if got := ErrorText(os.ErrNotExist); got != os.ErrNotExist.Error() {
		t.Errorf("ErrorText of a short error: %q", got)
	}
	if got := ErrorText(fmt.Errorf("proxy: server name %q", strings.Repeat("s", 60000))); len(got) != MaxErrorBytes || !strings.HasSuffix(got, TruncMark) {
		t.Errorf("ErrorText of a 60 KB error: %d bytes", len(got))
	}
}

// TestJournalBoundsClientText: events with a name, path and front of tens
// of kilobytes reach the event log bounded (each line a few hundred
// bytes, not 60 KiB), and the ledger rebuilt from the log reports what
// the live one did: the same shortened names. Before, the log held them
// whole and the ledger cut names at 255 bytes without a mark.
func TestJournalBoundsClientText(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	dir := t.TempDir()
	j, l, _ := openJournal(t, JournalConfig{Dir: dir}, eng)
	go j.Run(context.Background())
	long := strings.Repeat("a", 60000) + ".example"
	t0 := time.Date(2026, 12, 4, 10, 0, 0, 0, time.UTC)
	for i := range 20 {
		j.Emit(Event{Kind: KindFlow, Source: SourceProxy, Time: t0.Add(time.Duration(i) * time.Second),
			Client: netip.MustParseAddr("192.0.2.7"), ClientPort: uint16(40000 + i), Dest: netip.MustParseAddr("198.51.100.9"), DestPort: 80,
			Proto: "tcp", Name: long[i:], NameSource: NameHost, Path: "/" + long, Front: long,
			Verdict: policy.Deny, Mode: policy.ModeEnforce, Reason: policy.ReasonInvalidName, Enforced: true})
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(dir, CurrentLog))
	if err != nil {
		t.Fatal(err)
	}
	lines := bytes.Split(bytes.TrimSpace(b), []byte("\n"))
	if len(lines) != 20 {
		t.Fatalf("%d lines, want 20", len(lines))
	}
	for _, line := range lines {
		if len(line) > 4<<10 || !bytes.Contains(line, []byte(`"name_len":`)) || !bytes.Contains(line, []byte(`"path_len":60009`)) ||
			!bytes.Contains(line, []byte(`"front_len":60008`)) {
			t.Fatalf("a line of %d bytes: %.300s", len(line), line)
		}
	}
	want := l.Report(ReportOptions{Now: reportNow})
	_, l2, st := openJournal(t, JournalConfig{Dir: dir}, eng)
	if st.Events != 20 || st.Skipped != 0 {
		t.Errorf("load: %+v", st)
	}
	got := l2.Report(ReportOptions{Now: reportNow})
	if d := cmp.Diff(want, got); d != "" {
		t.Errorf("the ledger rebuilt from the log differs (-live +rebuilt):\n%s", d)
	}
	for _, d := range got.Dropped {
		if len(d.Dest) > MaxNameBytes || !strings.HasSuffix(d.Dest, TruncMark) {
			t.Errorf("dropped destination of %d bytes: %q", len(d.Dest), d.Dest[max(0, len(d.Dest)-20):])
		}
	}
}

// TestJournalBoundsInvalidUTF8: a TLS server name is bytes the client
// chose, not UTF-8 (the proxy reports it as sent). Cut, such a name must
// read the same live and from the log: the log's JSON holds each invalid
// byte as U+FFFD, which the ledger rebuilt from it read as three bytes,
// cut again (another dropped destination than the live ledger's) and
// took for the length sent (name_len 759 for 300 bytes); and the name
// took 1.5 KB of the line, not its bound of 255 bytes.
func TestJournalBoundsInvalidUTF8(t *testing.T) {
	eng := loadPolicy(t, "policy.yaml")
	dir := t.TempDir()
	j, l, _ := openJournal(t, JournalConfig{Dir: dir}, eng)
	go j.Run(context.Background())
	sni := strings.Repeat("\xff", 300)
	j.Emit(Event{Kind: KindFlow, Source: SourceProxy, Time: time.Date(2026, 12, 4, 10, 0, 0, 0, time.UTC),
		Client: netip.MustParseAddr("192.0.2.7"), ClientPort: 40000, Dest: netip.MustParseAddr("198.51.100.9"), DestPort: 443,
		Proto: "tcp", Name: sni, NameSource: NameSNI,
		Verdict: policy.Deny, Mode: policy.ModeEnforce, Reason: policy.ReasonInvalidName, Enforced: true})
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(filepath.Join(dir, CurrentLog))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(b, []byte(`"name_len":300,`)) || len(b) > 1024 {
		t.Errorf("a line of %d bytes: %.200s", len(b), b)
	}
	want := l.Report(ReportOptions{Now: reportNow})
	_, l2, _ := openJournal(t, JournalConfig{Dir: dir}, eng)
	got := l2.Report(ReportOptions{Now: reportNow})
	if d := cmp.Diff(want, got); d != "" {
		t.Errorf("the ledger rebuilt from the log differs (-live +rebuilt):\n%s", d)
	}
	for _, d := range got.Dropped {
		if len(d.Dest) > MaxNameBytes || !utf8.ValidString(d.Dest) {
			t.Errorf("dropped destination of %d bytes, valid UTF-8 %v", len(d.Dest), utf8.ValidString(d.Dest))
		}
	}
}
