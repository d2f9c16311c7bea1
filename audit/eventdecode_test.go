package audit

import (
	"encoding/json"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"egressd/policy"
)

// checkDecode holds decodeEvent, and decodeFast when it takes the line, to
// json.Unmarshal on b. It returns whether decodeFast took it.
func checkDecode(t *testing.T, b []byte) bool {
	t.Helper()
	var want Event
	werr := json.Unmarshal(b, &want)
	var fast Event
	took := decodeFast(b, &fast)
	if took && werr != nil {
		t.Fatalf("decodeFast took %q, which encoding/json refuses: %v", b, werr)
	}
	if took && !reflect.DeepEqual(fast, want) {
		t.Fatalf("decodeFast of %q:\n got %#v\nwant %#v", b, fast, want)
	}
	var got Event
	if ok := decodeEvent(b, &got); ok != (werr == nil) {
		t.Fatalf("decodeEvent(%q) = %v, encoding/json error %v", b, ok, werr)
	}
	if werr == nil && !reflect.DeepEqual(got, want) {
		t.Fatalf("decodeEvent of %q:\n got %#v\nwant %#v", b, got, want)
	}
	return took
}

// TestDecodeFastMatchesJSON: the lines appendJSON writes decode as
// encoding/json decodes them, and those of plain text take the fast path.
func TestDecodeFastMatchesJSON(t *testing.T) {
	base := Event{Kind: KindFlow, Source: SourceProxy, Time: time.Date(2026, 12, 4, 13, 5, 6, 0, time.UTC),
		Client: netip.MustParseAddr("192.0.2.7"), Proto: "tcp", Verdict: policy.Allow, Mode: policy.ModeAudit}
	strs := []string{"", "a", "www.example.com", "/x?y=1", "日本語", "é", "~\x7f", // fast
		"\u2028", "\x00\x01", "\b\n\"\\/", "<script>&amp;</script>", "\xff\xfe", "a\xed\xa0\x80b"} // escaped: encoding/json's
	plain := func(s string) bool { return !strings.ContainsAny(s, "\u2028\x00\x01\b\n\"\\<>&\xff\xed") }
	r := rand.New(rand.NewPCG(3, 4))
	fast, all := 0, 0
	for i := 0; i < 5000; i++ {
		ev := base
		ev.Kind = []Kind{KindFlow, KindDNS, KindRequest, KindShed}[r.IntN(4)]
		ev.Proto = []string{"tcp", "udp", "icmp", "ipv6-icmp", "gre", "esp", "253"}[r.IntN(7)]
		ev.ClientPort, ev.DestPort, ev.QueryID = uint16(r.IntN(3)*r.IntN(65536)), uint16(r.IntN(2)*r.IntN(65536)), uint16(r.IntN(2)*r.IntN(65536))
		ev.BytesIn, ev.BytesOut, ev.Count, ev.Duplicates = r.Uint64()>>r.IntN(64), uint64(r.IntN(2))*r.Uint64(), uint64(r.IntN(2)*r.IntN(5)), uint64(r.IntN(2))
		ev.Enforced, ev.CacheHit, ev.NoPath = r.IntN(2) == 0, r.IntN(2) == 0, r.IntN(2) == 0
		ev.Duration = r.Float64() * float64(r.IntN(3)) * 1e-3
		ev.Latency = float64(r.IntN(2)) * r.ExpFloat64() * 1e21
		pick := func() string { // mostly plain text, as in a real log
			if r.IntN(20) == 0 {
				return strs[7+r.IntN(len(strs)-7)]
			}
			return strs[r.IntN(7)]
		}
		ev.Name, ev.Path, ev.Front, ev.Rule, ev.Reason, ev.Close = pick(), pick(), pick(), pick(), pick(), pick()
		ev.QType, ev.RCode, ev.Upstream, ev.Filtered, ev.ClientMAC = pick(), pick(), pick(), pick(), pick()
		ev.NameSource = NameSource(pick())
		ev.LearnedName = pick()
		ev.NameLen, ev.PathLen, ev.FrontLen = r.IntN(2)*r.IntN(1<<16), r.IntN(2)*r.IntN(1<<16), r.IntN(2)*r.IntN(1<<16)
		ev.Time = time.Unix(r.Int64N(1<<34), r.Int64N(1e9)*int64(r.IntN(2))).UTC()
		if r.IntN(4) == 0 {
			ev.Time = ev.Time.In(time.FixedZone("", (r.IntN(48)-24)*1800))
		}
		if r.IntN(3) == 0 {
			ev.Until = ev.Time.Add(time.Duration(r.IntN(1e6)) * time.Millisecond)
		}
		if r.IntN(2) == 0 {
			ev.Dest = netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 15: byte(r.IntN(256))})
		}
		b, err := ev.appendJSON(nil)
		if err != nil {
			t.Fatal(err)
		}
		b = b[:len(b)-1] // the newline
		took := checkDecode(t, b)
		all++
		if took {
			fast++
		}
		if want := plain(ev.Name + ev.Path + ev.Front + ev.Rule + ev.Reason + ev.Close + ev.QType + ev.RCode + ev.Upstream + ev.Filtered + ev.ClientMAC + string(ev.NameSource) + ev.LearnedName); took != want {
			t.Fatalf("decodeFast took %v, want %v: %s", took, want, b)
		}
	}
	t.Logf("%d of %d lines on the fast path", fast, all)
}

// TestDecodeFastEdges: lines encoding/json reads differently from a plain
// reading, or refuses, are decoded as it does (by it).
func TestDecodeFastEdges(t *testing.T) {
	for _, s := range []string{
		`{}`, `{"kind":"flow"}`, `{"kind":"flow","kind":"dns"}`, `{"Kind":"flow"}`, `{"KIND":"flow","kind":"dns"}`,
		`{"kind":null}`, `{"kind":"flow","count":null}`, `{ "kind":"flow"}`, `{"kind" :"flow"}`, `{"kind":"flow"} `,
		`{"kind":"flow"}x`, `{"kind":"flow",}`, `{"kind":"flow"`, `{"kind":"fl\u006fw"}`, `{"kind":"a\tb"}`,
		`{"kind":"\xff"}`, `{"kind":"\xed\xa0\x80"}`, `{"kind":1}`, `{"kind":true}`, `{"other":1,"kind":"flow"}`,
		`{"expanded":1}`, `{"count":0}`, `{"count":00}`, `{"count":01}`, `{"count":-0}`, `{"count":-1}`, `{"count":1.0}`,
		`{"count":1e2}`, `{"count":18446744073709551615}`, `{"count":18446744073709551616}`, `{"client_port":65535}`,
		`{"client_port":65536}`, `{"query_id":99999999999999999999}`, `{"name_len":9223372036854775807}`,
		`{"name_len":9223372036854775808}`, `{"name_len":-5}`, `{"duration_seconds":1e400}`, `{"duration_seconds":-0}`,
		`{"duration_seconds":-0.0e-0}`, `{"duration_seconds":.5}`, `{"duration_seconds":1.}`, `{"duration_seconds":1e}`,
		`{"duration_seconds":01}`, `{"duration_seconds":"1"}`, `{"latency_seconds":4.9e-324}`, `{"latency_seconds":2e-400}`,
		`{"enforced":true}`, `{"enforced":false}`, `{"enforced":tru}`, `{"enforced":1}`, `{"enforced":null}`,
		`{"revised":true}`, `{"revised":false}`, `{"revised":1}`, `{"revised":"true"}`, `{"revised":true,"revised":false}`, `{"Revised":true}`,
		`{"time":"2026-12-04T13:05:06Z"}`, `{"time":"2026-12-04T13:05:06.123456789+05:30"}`, `{"time":"2026-12-04 13:05:06Z"}`,
		`{"time":"2026-12-04T13:05:06+24:00"}`, `{"time":"2026-12-04T13:05:06z"}`, `{"time":""}`, `{"time":null}`, `{"time":1}`,
		`{"time":"2026-12-04T13:05:06Z","time":"2026-12-04T13:05:07Z"}`, `{"until":"0001-01-01T00:00:00Z"}`,
		`{"client":"192.0.2.1"}`, `{"client":""}`, `{"client":"fe80::1%eth0"}`, `{"client":"::ffff:1.2.3.4"}`, `{"client":"1.2.3"}`,
		`{"client":"01.2.3.4"}`, `{"dest_ip":"2001:db8::1"}`, `{"dest_ip":null}`, `{"client":1}`,
		`{"kind":"flow","source":"proxy","time":"2026-12-04T13:05:06Z","client":"192.0.2.7","proto":"tcp","verdict":"allow","mode":"audit"}`,
		`[]`, `{`, `}`, `""`, `null`, `{"":1}`,
	} {
		checkDecode(t, []byte(s))
	}
}

// FuzzDecodeEvent holds decodeEvent to json.Unmarshal on any line.
func FuzzDecodeEvent(f *testing.F) {
	for _, ev := range []Event{seqEvent(1, t0), churnEvent(rand.New(rand.NewPCG(1, 2)), 7)} {
		b, _ := ev.appendJSON(nil)
		f.Add(b[:len(b)-1])
	}
	f.Add([]byte(`{"kind":"flow","count":3,"until":"2026-12-04T13:05:06.5+01:00","duration_seconds":-1.5e-3,"enforced":true}`))
	f.Add([]byte(`{"kind":"dns","Kind":"flow","count":01}`))
	f.Add([]byte(`{"kind":"alarm","top_clients":["a","192.0.2.7"],"count":1003}`))
	f.Add([]byte(`{"kind":"alarm","top_clients":[],"reason":"dns-tunnel-zone"}`))
	f.Add([]byte(`{"kind":"alarm","top_clients":["a",]}`))
	// A QUIC flow's other names (session 30): written, escaped, repeated,
	// empty, not UTF-8, the key twice.
	f.Add([]byte(`{"kind":"flow","proto":"udp","name":"a.test","other_names":["b.test","c.test","b.test"]}`))
	f.Add([]byte(`{"kind":"flow","other_names":["\u0000x","<b>\n",""],"other_names":[]}`))
	f.Add([]byte("{\"kind\":\"flow\",\"other_names\":[\"\xff\xfe\",\"a\x01\"]}"))
	f.Add([]byte(`{"kind":"flow","proto":"udp","name":"a.test","other_names":["c.test"],"learned_name":"b.test"}`))
	f.Add([]byte(`{"kind":"flow","learned_name":"b.test","learned_name":""}`))
	// A later report of a connection (session 36).
	f.Add([]byte(`{"kind":"flow","source":"proxy","verdict":"deny","close":"policy-revoked","revised":true}`))
	f.Add([]byte(`{"kind":"flow","revised":true,"revised":false,"revised":null}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		checkDecode(t, b)
	})
}

// TestReadDirAheadInOrder: the read of a restart, a few batches ahead of
// the ledger, hands it the events of several files (compressed and plain,
// a summary record among them, a torn last line) in the order and number
// readDir does, with the same stats.
func TestReadDirAheadInOrder(t *testing.T) {
	dir := t.TempDir()
	j, _, err := OpenJournal(JournalConfig{Dir: dir, MaxFileBytes: 64 << 10, MaxFiles: 100, DetailBurst: -1, Compress: true,
		Logger: slog.New(slog.DiscardHandler)}, NewLedger(nil, LedgerOptions{}))
	if err != nil {
		t.Fatal(err)
	}
	const n = 6000 // a dozen batches
	for i := 1; i <= n; i++ {
		ev := seqEvent(i, t0.Add(time.Duration(i)*time.Millisecond))
		if i == n/2 {
			ev.Count, ev.Until = 700, ev.Time.Add(time.Second) // a summary record of the detail budget
		}
		j.writeEvent(ev)
	}
	j.Close()
	files, _ := LogFiles(dir)
	gz := 0
	for _, f := range files {
		if strings.HasSuffix(f, gzSuffix) {
			gz++
		}
	}
	if len(files) < 5 || gz == 0 {
		t.Fatalf("%d files, %d compressed: the test needs several, some compressed", len(files), gz)
	}
	f, err := os.OpenFile(filepath.Join(dir, CurrentLog), os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString(`{"kind":"flow","sou`) // torn
	f.Close()

	var want []Event
	wst, werr := readDir(dir, slog.New(slog.DiscardHandler), time.Time{}, false, "", func(ev Event) { want = append(want, ev) })
	var got []Event
	gst, gerr := readDirAhead(dir, slog.New(slog.DiscardHandler), false, "", nil, func(ev Event) { got = append(got, ev) })
	if werr != nil || gerr != nil {
		t.Fatal(werr, gerr)
	}
	if len(want) != n-1+700 || wst.Events != uint64(len(want)) || !wst.Torn {
		t.Fatalf("readDir: %d events, stats %+v", len(want), wst)
	}
	if gst != wst {
		t.Errorf("stats %+v, readDir's %+v", gst, wst)
	}
	if len(got) != len(want) {
		t.Fatalf("%d events, readDir %d", len(got), len(want))
	}
	for i := range want {
		if !reflect.DeepEqual(got[i], want[i]) {
			t.Fatalf("event %d: %+v, readDir's %+v", i, got[i], want[i])
		}
	}
}

// TestDecodeFastCoversEvent sets every field of Event at once, so that a
// field added to Event and not to decodeFast fails here (decodeFast would
// leave every line to encoding/json: right, but as slow as before).
func TestDecodeFastCoversEvent(t *testing.T) {
	var ev Event
	v := reflect.ValueOf(&ev).Elem()
	for i := 0; i < v.NumField(); i++ {
		if !v.Type().Field(i).IsExported() {
			continue
		}
		f := v.Field(i)
		switch f.Interface().(type) {
		case time.Time:
			f.Set(reflect.ValueOf(time.Date(2026, 12, 4, 13, 5, 6, 789000000, time.UTC)))
			continue
		case netip.Addr:
			f.Set(reflect.ValueOf(netip.MustParseAddr("2001:db8::1")))
			continue
		}
		switch f.Kind() {
		case reflect.String:
			f.SetString("x")
		case reflect.Bool:
			f.SetBool(true)
		case reflect.Uint16, reflect.Uint64, reflect.Int:
			f.Set(reflect.ValueOf(7).Convert(f.Type()))
		case reflect.Float64:
			f.SetFloat(0.125)
		case reflect.Slice: // []string
			f.Set(reflect.ValueOf([]string{"x", "y"}))
		default:
			t.Fatalf("field %s of kind %s: teach this test and decodeFast about it", v.Type().Field(i).Name, f.Kind())
		}
	}
	b, err := ev.appendJSON(nil)
	if err != nil {
		t.Fatal(err)
	}
	if !checkDecode(t, b[:len(b)-1]) {
		t.Fatalf("decodeFast does not take %s", b)
	}
}
