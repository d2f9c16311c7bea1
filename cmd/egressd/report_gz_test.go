package main

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"egressd/audit"
	"egressd/policy"
)

// TestReportCompressedLog: `egressd report --state-dir` and `audit
// --replay` read gzipped rotated files as plain ones, and a damaged one is
// a warning, not a failure: the other files' events are all counted.
func TestReportCompressedLog(t *testing.T) {
	dir := t.TempDir()
	eng, err := loadEngine(auditPolicy, &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	tcp, _ := policy.ParseProto("tcp")
	file := func(name string, from, n int) []byte {
		var b bytes.Buffer
		for i := from; i < from+n; i++ {
			at := rt0.Add(time.Duration(i) * time.Second)
			ev := audit.Event{Kind: audit.KindFlow, Source: audit.SourceProxy, Time: at,
				Client: netip.MustParseAddr("192.168.10.6"), ClientPort: uint16(40000 + i), Dest: netip.MustParseAddr("198.51.100.10"),
				DestPort: 443, Proto: "tcp", Name: "api.nirovision.com"}
			ev.Stamp(eng.Decide(policy.Input{Client: ev.Client, Dest: ev.Dest, Port: 443, Proto: tcp, Name: ev.Name, Now: at}))
			line, err := json.Marshal(ev)
			if err != nil {
				t.Fatal(err)
			}
			b.Write(append(line, '\n'))
		}
		data := b.Bytes()
		if strings.HasSuffix(name, ".gz") {
			var z bytes.Buffer
			zw := gzip.NewWriter(&z)
			zw.Write(data)
			zw.Close()
			data = z.Bytes()
		}
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o640); err != nil {
			t.Fatal(err)
		}
		return data
	}
	file("events-20261101T000000.000000000Z.ndjson.gz", 0, 40)
	file("events-20261101T010000.000000000Z.ndjson", 40, 40)
	file("events.ndjson", 80, 40)
	code, _, stderr := runCmd(t, "report", "--state-dir", dir, "--policy", auditPolicy)
	if code != 0 || !strings.Contains(stderr, "3 files, 120 events") {
		t.Errorf("exit %d: %s", code, stderr)
	}
	// The plain rotated file compressed too, then damaged: cut in half.
	os.Remove(filepath.Join(dir, "events-20261101T010000.000000000Z.ndjson"))
	gz := file("events-20261101T010000.000000000Z.ndjson.gz", 40, 40)
	os.WriteFile(filepath.Join(dir, "events-20261101T010000.000000000Z.ndjson.gz"), gz[:len(gz)/2], 0o640)
	code, _, stderr = runCmd(t, "report", "--state-dir", dir, "--policy", auditPolicy)
	if code != 0 || !strings.Contains(stderr, "1 compressed files damaged") || !strings.Contains(stderr, "is damaged") || strings.Contains(stderr, "120 events") {
		t.Errorf("damaged: exit %d: %s", code, stderr)
	}
	var out, errb bytes.Buffer
	if code := run(context.Background(), []string{"audit", "--policy", auditPolicy, "--replay", dir}, &out, &errb); code != 0 || !strings.Contains(errb.String(), "1 compressed event log files are damaged") {
		t.Errorf("replay: exit %d: %s", code, errb.String())
	}
}
