package audit

import (
	"bytes"
	"encoding/json"
	"math"
	"math/rand/v2"
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"time"

	"egressd/policy"
)

// stdJSON is the journal line encoding/json writes for ev.
func stdJSON(ev Event) ([]byte, error) {
	var buf bytes.Buffer
	err := json.NewEncoder(&buf).Encode(ev)
	return buf.Bytes(), err
}

func checkSameJSON(t *testing.T, ev Event) {
	t.Helper()
	want, werr := stdJSON(ev)
	got, gerr := ev.appendJSON(nil)
	if (werr != nil) != (gerr != nil) {
		t.Fatalf("encoding/json error %v, appendJSON error %v, for %#v", werr, gerr, ev)
	}
	if werr == nil && !bytes.Equal(got, want) {
		t.Fatalf("appendJSON differs from encoding/json\n got %s\nwant %s", got, want)
	}
}

// TestAppendJSONCoversEvent sets every field of Event, one at a time and
// all together, so that a field added to Event and not to appendJSON
// fails here.
func TestAppendJSONCoversEvent(t *testing.T) {
	set := func(v reflect.Value) {
		switch v.Interface().(type) {
		case time.Time:
			v.Set(reflect.ValueOf(time.Date(2026, 12, 4, 13, 5, 6, 789000000, time.UTC)))
			return
		case netip.Addr:
			v.Set(reflect.ValueOf(netip.MustParseAddr("2001:db8::1")))
			return
		}
		switch v.Kind() {
		case reflect.String:
			v.SetString("x<&>\"é")
		case reflect.Bool:
			v.SetBool(true)
		case reflect.Uint16, reflect.Uint64:
			v.SetUint(65535)
		case reflect.Int:
			v.SetInt(65536)
		case reflect.Float64:
			v.SetFloat(0.125)
		case reflect.Slice: // []string
			v.Set(reflect.ValueOf([]string{"x<&>\"é", "y"}))
		default:
			t.Fatalf("field of kind %s: teach this test and appendJSON about it", v.Kind())
		}
	}
	var all Event
	typ := reflect.TypeOf(all)
	for i := 0; i < typ.NumField(); i++ {
		if !typ.Field(i).IsExported() { // not written
			continue
		}
		var one Event
		set(reflect.ValueOf(&one).Elem().Field(i))
		set(reflect.ValueOf(&all).Elem().Field(i))
		checkSameJSON(t, one)
	}
	checkSameJSON(t, all)
	checkSameJSON(t, Event{})
}

func TestAppendJSONValues(t *testing.T) {
	base := Event{Kind: KindFlow, Source: SourceProxy, Time: time.Date(2026, 12, 4, 13, 5, 6, 0, time.UTC),
		Client: netip.MustParseAddr("192.0.2.7"), Proto: "tcp", Verdict: policy.Allow, Mode: policy.ModeAudit}
	strs := []string{"", "a", "\x00\x01\x1f\x7f", "\b\f\n\r\t\"\\/", "<script>&amp;</script>",
		"\xff\xfe", "é\xc3", "\u2028\u2029", "日本語", "a\xed\xa0\x80b", strings.Repeat("z", 300)}
	floats := []float64{0, 1, -1, 0.1, 1e-7, 1e-6, 9.99e-7, 1e20, 1e21, 1.5e300, -2.5e-10, 123456789.123, math.SmallestNonzeroFloat64,
		math.NaN(), math.Inf(1), math.Inf(-1)}
	addrs := []string{"198.51.100.1", "::ffff:198.51.100.1", "fe80::1%eth0", "::", "0.0.0.0"}
	times := []time.Time{
		time.Date(2026, 1, 2, 3, 4, 5, 6, time.UTC),
		time.Date(2026, 1, 2, 3, 4, 5, 0, time.FixedZone("x", 5*3600+1800)),
		time.Date(9999, 12, 31, 23, 59, 59, 999999999, time.UTC),
		time.Date(10000, 1, 1, 0, 0, 0, 0, time.UTC),
		time.Date(-1, 1, 1, 0, 0, 0, 0, time.UTC),
		time.Date(2026, 1, 2, 3, 4, 5, 0, time.FixedZone("far", 24*3600)),
		time.Date(2026, 1, 2, 3, 4, 5, 0, time.FixedZone("west", -(23*3600+59*60))),
		time.Date(2026, 1, 2, 3, 4, 5, 0, time.FixedZone("sec", 3600+30)),
		{},
	}
	for _, s := range strs {
		ev := base
		ev.Name, ev.Reason, ev.Path, ev.ClientMAC, ev.Proto = s, s, s, s, s
		checkSameJSON(t, ev)
	}
	for _, f := range floats {
		ev := base
		ev.Duration = f
		checkSameJSON(t, ev)
		ev = base
		ev.Latency = f
		checkSameJSON(t, ev)
	}
	for _, a := range addrs {
		ev := base
		ev.Client, ev.Dest = netip.MustParseAddr(a), netip.MustParseAddr(a)
		checkSameJSON(t, ev)
	}
	for _, tm := range times {
		ev := base
		ev.Time = tm
		checkSameJSON(t, ev)
	}
	// Random events.
	r := rand.New(rand.NewPCG(1, 2))
	for i := 0; i < 2000; i++ {
		ev := base
		ev.ClientPort, ev.DestPort = uint16(r.IntN(3)*r.IntN(65536)), uint16(r.IntN(2)*r.IntN(65536))
		ev.BytesIn, ev.BytesOut, ev.Count = r.Uint64()>>r.IntN(64), uint64(r.IntN(2))*r.Uint64(), uint64(r.IntN(2)*r.IntN(5))
		ev.Enforced, ev.CacheHit, ev.Revised = r.IntN(2) == 0, r.IntN(2) == 0, r.IntN(2) == 0
		ev.Duration = r.Float64() * math.Pow(10, float64(r.IntN(40)-20))
		ev.Latency = float64(r.IntN(2)) * r.ExpFloat64() / 1e6
		ev.Rule, ev.QType, ev.RCode = strs[r.IntN(len(strs))], strs[r.IntN(len(strs))], strs[r.IntN(len(strs))]
		ev.NameLen, ev.PathLen, ev.FrontLen = r.IntN(2)*r.IntN(1<<16), r.IntN(2)*r.IntN(1<<16), r.IntN(2)*r.IntN(1<<16)
		ev.Time = time.Unix(r.Int64N(1<<34), r.Int64N(1e9)).UTC()
		checkSameJSON(t, ev)
	}
}

// FuzzEventJSON holds appendJSON to encoding/json's output, and the
// reading of that line (decodeEvent) to encoding/json's.
func FuzzEventJSON(f *testing.F) {
	f.Add("www.allowed.test", "rule <1>", "\xff\u2028", int64(1764853506123456789), 0.25, uint64(1234), uint16(443), []byte{192, 0, 2, 1})
	f.Add("", "", "", int64(0), 1e-9, uint64(0), uint16(0), []byte{})
	f.Fuzz(func(t *testing.T, name, rule, path string, nanos int64, dur float64, n uint64, port uint16, ip []byte) {
		ev := Event{Kind: KindFlow, Source: SourceDNS, Time: time.Unix(0, nanos).UTC(), Name: name, Rule: rule, Path: path,
			Reason: name + path, Duration: dur, Latency: -dur, BytesIn: n, Count: n / 3, DestPort: port, ClientPort: port / 2,
			Revised: n%2 == 1}
		if n%3 != 0 { // an alarm's top clients: client text
			ev.TopClients = []string{name, rule, path}[:n%3+1]
		}
		if a, ok := netip.AddrFromSlice(ip); ok {
			ev.Client, ev.Dest = a, a
		}
		checkSameJSON(t, ev)
		if b, err := ev.appendJSON(nil); err == nil { // and the log reads it back as encoding/json does
			checkDecode(t, b[:len(b)-1])
		}
	})
}
