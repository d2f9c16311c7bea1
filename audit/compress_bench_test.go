package audit

import (
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"egressd/policy"
)

// churnEvent is a denied TLS connection to a server name never seen
// before, as a LAN device churning random names makes egressd write them
// (session 23: 4,000-6,100 lines a second): random labels under a few
// parents, a new client port and destination each.
func churnEvent(r *rand.Rand, i int) Event {
	const letters = "abcdefghijklmnopqrstuvwxyz0123456789"
	parents := [...]string{"cdn.example.net", "telemetry.vendor.example", "edge-eu.example.com", "t.example.org"}
	label := make([]byte, 8+r.IntN(9))
	for k := range label {
		label[k] = letters[r.IntN(len(letters))]
	}
	at := t0.Add(time.Duration(i) * 200 * time.Microsecond)
	return Event{
		Kind: KindFlow, Source: SourceProxy, Time: at,
		Client: netip.AddrFrom4([4]byte{192, 168, 10, byte(20 + r.IntN(4))}), ClientPort: uint16(32768 + r.IntN(28000)),
		ClientMAC: "52:54:00:12:34:56",
		Dest:      netip.AddrFrom4([4]byte{198, 18, byte(r.IntN(256)), byte(r.IntN(256))}), DestPort: 443, Proto: "tcp",
		Name: string(label) + "." + parents[r.IntN(len(parents))], NameSource: NameSNI,
		Verdict: policy.Deny, Mode: policy.ModeEnforce, Reason: policy.ReasonNoRule, Enforced: true,
		BytesOut: uint64(517 + r.IntN(200)), Duration: float64(r.IntN(5000)) / 1e4, Close: "denied",
	}
}

var churnOnce sync.Once
var churnPath string

// TestMain removes the benchmarks' files.
func TestMain(m *testing.M) {
	code := m.Run()
	if churnPath != "" {
		os.RemoveAll(filepath.Dir(churnPath))
	}
	if fullDir != "" {
		os.RemoveAll(fullDir)
	}
	os.Exit(code)
}

// churnFile writes (once) a rotated event log file of 64 MiB of churning
// denied TLS names through the journal, and returns its path.
func churnFile(b *testing.B) string {
	churnOnce.Do(func() {
		dir, err := os.MkdirTemp("", "g1-churn")
		if err != nil {
			b.Fatal(err)
		}
		j, _, err := OpenJournal(JournalConfig{Dir: dir, DetailBurst: -1}, NewLedger(nil, LedgerOptions{}))
		if err != nil {
			b.Fatal(err)
		}
		r := rand.New(rand.NewPCG(1, 2))
		for i := 0; i < 2_000_000; i++ {
			j.writeEvent(churnEvent(r, i))
			if files, _ := LogFiles(dir); len(files) > 1 {
				break
			}
		}
		j.Close()
		files, _ := LogFiles(dir)
		churnPath = files[0]
	})
	if churnPath == "" {
		b.Skip("no rotated file")
	}
	return churnPath
}

// BenchmarkCompressRotated is the background compression of one rotated
// 64 MiB file of churning denied TLS names (go test -run '^$' -bench
// CompressRotated ./audit/): its time, and bytes before and after.
func BenchmarkCompressRotated(b *testing.B) {
	src := churnFile(b)
	fi, _ := os.Stat(src)
	j := &Journal{cfg: JournalConfig{Dir: filepath.Dir(src)}}
	link := src + ".bench" + rotatedSuffix
	var gzSize int64
	b.SetBytes(fi.Size())
	b.ResetTimer()
	for range b.N {
		b.StopTimer()
		os.Remove(link + gzSuffix)
		if err := os.Link(src, link); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		if err := j.compressFile(link); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	gi, err := os.Stat(link + gzSuffix)
	if err != nil {
		b.Fatal(err)
	}
	gzSize = gi.Size()
	b.ReportMetric(float64(fi.Size()), "plain-bytes")
	b.ReportMetric(float64(gzSize), "gz-bytes")
	b.ReportMetric(float64(fi.Size())/float64(gzSize), "ratio")
	// Every event reads back from the compressed file.
	var pst, gst LoadStats
	readFile(src, nil, false, &pst, func(Event) {})
	readFile(link+gzSuffix, nil, false, &gst, func(Event) {})
	if pst.Events == 0 || pst.Events != gst.Events {
		b.Fatalf("plain %d events, compressed %d", pst.Events, gst.Events)
	}
	b.ReportMetric(float64(pst.Events), "events")
	os.Remove(link + gzSuffix)
}

// BenchmarkReadRotated is the cost of reading one 64 MiB rotated file of
// churning names at a restart, plain and compressed (go test -run '^$'
// -bench ReadRotated ./audit/).
func BenchmarkReadRotated(b *testing.B) {
	src := churnFile(b)
	gz := src + ".read" + gzSuffix
	if _, err := os.Stat(gz); err != nil {
		link := src + ".read"
		os.Link(src, link)
		j := &Journal{cfg: JournalConfig{Dir: filepath.Dir(src)}}
		if err := j.compressFile(link); err != nil {
			b.Fatal(err)
		}
	}
	for _, path := range []string{src, gz} {
		name := "plain"
		if path == gz {
			name = "gz"
		}
		b.Run(name, func(b *testing.B) {
			fi, _ := os.Stat(src)
			b.SetBytes(fi.Size())
			for range b.N {
				var st LoadStats
				if err := readFile(path, nil, false, &st, func(Event) {}); err != nil || st.Events == 0 {
					b.Fatal(st.Events, err)
				}
			}
		})
	}
}

var fullOnce sync.Once
var fullDir string

// fullLogDir writes (once) an event log of fullFiles compressed rotated
// files of 64 MiB of churning denied TLS names, each its own events, and
// a current file of a few MiB: a quarter of a full log (16 files).
func fullLogDir(b *testing.B) string {
	const fullFiles = 4
	fullOnce.Do(func() {
		dir, err := os.MkdirTemp("", "s1-full")
		if err != nil {
			b.Fatal(err)
		}
		j, _, err := OpenJournal(JournalConfig{Dir: dir, DetailBurst: -1, Compress: true}, NewLedger(nil, LedgerOptions{}))
		if err != nil {
			b.Fatal(err)
		}
		r := rand.New(rand.NewPCG(5, 6))
		for i := 0; i < 20_000_000; i++ {
			j.writeEvent(churnEvent(r, i))
			if i%1000 == 0 {
				if files, _ := LogFiles(dir); len(files) > fullFiles {
					for k := 0; k < 10_000; k++ { // the current file
						j.writeEvent(churnEvent(r, i+1+k))
					}
					break
				}
			}
		}
		j.Close()
		fullDir = dir
	})
	if files, _ := LogFiles(fullDir); len(files) <= fullFiles {
		b.Skip("no full log")
	}
	return fullDir
}

// BenchmarkOpenJournalFull is a restart's read of the event log: OpenJournal
// on a log of 4 compressed rotated files of 64 MiB (go test -run '^$'
// -bench OpenJournalFull ./audit/). egressd run serves no DNS and no proxy
// until it returns.
func BenchmarkOpenJournalFull(b *testing.B) {
	dir := fullLogDir(b)
	files, _ := LogFiles(dir)
	var bytes int64
	gz := 0
	for _, f := range files {
		if strings.HasSuffix(f, gzSuffix) {
			gz++
		}
		if fi, err := os.Stat(f); err == nil {
			bytes += fi.Size()
		}
	}
	b.ResetTimer()
	for range b.N {
		l := NewLedger(nil, LedgerOptions{})
		j, st, err := OpenJournal(JournalConfig{Dir: dir, DetailBurst: -1}, l)
		if err != nil || st.Events == 0 {
			b.Fatal(st.Events, err)
		}
		b.StopTimer()
		b.ReportMetric(float64(st.Events), "events")
		j.Close()
		b.StartTimer()
	}
	b.ReportMetric(float64(len(files)), "files")
	b.ReportMetric(float64(gz), "gz-files")
	b.ReportMetric(float64(bytes), "disk-bytes")
}
