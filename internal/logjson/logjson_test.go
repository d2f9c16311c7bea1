package logjson

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"log/slog"
	"math"
	"strconv"
	"strings"
	"testing"
	"time"
)

// attrsFrom turns fuzz bytes and strings into attributes of every kind,
// the kinds this handler writes and those it hands to slog's.
func attrsFrom(data []byte, s1, s2 string) []slog.Attr {
	var attrs []slog.Attr
	strs := []string{s1, s2, "", "decision", "a\"b\\c\n\t\r\x00\x1f\x7f<>&", "\u2028\u2029é\xff\xfe", "日本"}
	u64 := func(i int) uint64 {
		var b [8]byte
		copy(b[:], data[min(i, len(data)):])
		return binary.LittleEndian.Uint64(b[:])
	}
	for i := 0; i+1 < len(data) && len(attrs) < 40; i += 2 {
		key := strs[int(data[i]>>4)%len(strs)]
		sel := data[i+1]
		x := u64(i + 2)
		switch sel % 16 {
		case 0:
			attrs = append(attrs, slog.String(key, strs[int(sel>>4)%len(strs)]))
		case 1:
			attrs = append(attrs, slog.Int64(key, int64(x)))
		case 2:
			attrs = append(attrs, slog.Uint64(key, x))
		case 3:
			attrs = append(attrs, slog.Bool(key, x&1 == 1))
		case 4:
			attrs = append(attrs, slog.Duration(key, time.Duration(x)))
		case 5:
			attrs = append(attrs, slog.Float64(key, math.Float64frombits(x)))
		case 6:
			attrs = append(attrs, slog.Float64(key, float64(int64(x))/float64(1+int64(sel)*1000)))
		case 7:
			attrs = append(attrs, slog.Time(key, time.Unix(int64(x%(1<<36))-(1<<35), int64(x%1e9)).In(time.FixedZone("z", int(int32(x>>40))%86400))))
		case 8:
			attrs = append(attrs, slog.Group(key, slog.String("in", s1), slog.Int("n", int(sel))))
		case 9:
			attrs = append(attrs, slog.Group(key)) // empty: dropped
		case 10:
			attrs = append(attrs, slog.Any(key, errors.New(s2)))
		case 11:
			attrs = append(attrs, slog.Any(key, nil))
		case 12:
			attrs = append(attrs, slog.Attr{}) // empty: elided
		case 13:
			attrs = append(attrs, slog.Any(key, []int{int(sel), 2}))
		case 14:
			attrs = append(attrs, slog.Any(key, lv{s1}))
		default:
			attrs = append(attrs, slog.Float64(key, []float64{0, math.Copysign(0, -1), 1e-7, 1e21, 123456789.125, 1e-6, 5e-324, math.Inf(1), math.NaN()}[int(sel>>4)%9]))
		}
	}
	return attrs
}

type lv struct{ s string }

func (v lv) LogValue() slog.Value { return slog.StringValue("lv:" + v.s) }

// check compares this handler's lines with slog's for attributes made
// from fuzz input.
func check(t *testing.T, data []byte, s1, s2 string) {
	t.Helper()
	attrs := attrsFrom(data, s1, s2)
	var pre []slog.Attr
	if len(attrs) > 0 {
		k := int(data[0]) % (len(attrs) + 1)
		pre, attrs = attrs[:k], attrs[k:]
	}
	tm := time.Unix(1_700_000_000+int64(len(data))*7919, int64(len(s1))*1_000_037).UTC()
	if len(data) > 0 && data[0]&1 == 1 {
		tm = time.Time{} // a record without a time
	}
	compare(t, pre, attrs, tm, slog.Level(len(s2)%13-6), s2, s1)
}

// compare compares this handler's line with slog's for the same record,
// with WithAttrs(pre), without and with WithGroup(group) (an empty name
// too: slog's handler writes it as a group named ""), through Handle and
// through Log.
func compare(t *testing.T, pre, attrs []slog.Attr, tm time.Time, level slog.Level, msg, group string) {
	t.Helper()
	for _, grouped := range []bool{false, true} {
		g := "none"
		if grouped {
			g = strconv.Quote(group)
		}
		var got, want bytes.Buffer
		opts := &slog.HandlerOptions{Level: slog.LevelDebug - 4}
		var fh, sh slog.Handler = New(&got, opts), slog.NewJSONHandler(&want, opts)
		if len(pre) > 0 {
			fh, sh = fh.WithAttrs(pre), sh.WithAttrs(pre)
		}
		if grouped {
			fh, sh = fh.WithGroup(group), sh.WithGroup(group)
		}
		r := slog.NewRecord(tm, level, msg, 0)
		r.AddAttrs(attrs...)
		fh.Handle(context.Background(), r)
		sh.Handle(context.Background(), r)
		if got.String() != want.String() {
			t.Fatalf("Handle, group %s:\n got %s\nwant %s", g, got.String(), want.String())
		}

		got.Reset()
		want.Reset()
		now := time.Now()
		Log(context.Background(), slog.New(fh), level, msg, attrs...)
		after := time.Now()
		// The time is Log's own: compare the rest, and the time's range.
		gl := got.String()
		r = slog.NewRecord(now, level, msg, 0)
		r.AddAttrs(attrs...)
		sh.Handle(context.Background(), r)
		wl := want.String()
		gt, grest := cutTime(t, gl)
		_, wrest := cutTime(t, wl)
		if grest != wrest {
			t.Fatalf("Log, group %s:\n got %s\nwant %s", g, gl, wl)
		}
		if gt.Before(now.Truncate(0)) || gt.After(after) {
			t.Fatalf("Log: time %v outside [%v, %v]", gt, now, after)
		}
	}
}

// cutTime returns a line's time and the line without it.
func cutTime(t *testing.T, line string) (time.Time, string) {
	t.Helper()
	const k = `{"time":"`
	if !strings.HasPrefix(line, k) {
		t.Fatalf("no time first: %s", line)
	}
	v, rest, ok := strings.Cut(line[len(k):], `"`)
	if !ok {
		t.Fatalf("unterminated time: %s", line)
	}
	tm, err := time.Parse(time.RFC3339Nano, v)
	if err != nil {
		t.Fatalf("time %q: %v", v, err)
	}
	return tm, rest
}

func FuzzSameAsSlog(f *testing.F) {
	f.Add([]byte{}, "", "")
	f.Add([]byte{0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7}, "client", "decision")
	f.Add([]byte{0x10, 0xf5, 0x21, 0x5f, 0x33, 0x8f, 0x44, 0x0a, 0x55, 0x7b}, "é\xff", "a\nb")
	for i := 0; i < 16; i++ {
		f.Add([]byte{byte(i * 17), byte(i), byte(i*16 + i), byte(i + 16), 0xff, 0x7f, 0x3f, 0x01}, "k", "v")
	}
	f.Fuzz(check)
}

// TestSameAsSlog compares every escape, float form, time and level this
// handler writes itself, in keys, values and WithAttrs, with slog's.
func TestSameAsSlog(t *testing.T) {
	var strs []string
	for c := 0; c < 0x80; c++ {
		strs = append(strs, "a"+string(rune(c))+"b")
	}
	strs = append(strs, "", "\u2028", "\u2029", "é", "日本", "\xff", "a\xc3", "\xed\xa0\x80", "\U0001F600")
	var attrs []slog.Attr
	for i, s := range strs {
		attrs = append(attrs, slog.String(s, strs[len(strs)-1-i]))
	}
	t0 := time.Date(2026, 12, 4, 17, 0, 0, 0, time.UTC)
	for _, f := range []float64{0, math.Copysign(0, -1), 1, -1.5, 1e-6, 9.99e-7, -1e-7, 1e20, 1e21, -1e21, 1.5e300, 5e-324, 123456789.125, 0.1 + 0.2, 1e-10, 2.5e-9} {
		attrs = append(attrs, slog.Float64("f", f))
	}
	for _, tm := range []time.Time{t0, t0.Add(123456789), t0.Add(100 * time.Millisecond), t0.In(time.FixedZone("x", -9000)), {}, time.Date(9999, 12, 31, 23, 59, 59, 999999999, time.UTC)} {
		attrs = append(attrs, slog.Time("t", tm))
	}
	attrs = append(attrs, slog.Int64("i", math.MinInt64), slog.Int("i", 0), slog.Uint64("u", math.MaxUint64),
		slog.Bool("b", true), slog.Bool("b", false), slog.Duration("d", -time.Nanosecond), slog.Duration("d", 36*time.Hour))
	// All of these are written here, not by the standard handler (below).
	for _, level := range []slog.Level{slog.LevelDebug - 1, slog.LevelDebug, slog.LevelInfo, slog.LevelInfo + 2, slog.LevelWarn, slog.LevelError, slog.LevelError + 5} {
		for _, tm := range []time.Time{{}, t0, t0.Add(1), t0.In(time.FixedZone("y", 3600+1800))} {
			compare(t, nil, attrs, tm, level, "decision \"q\"\n", "")
			compare(t, attrs[:len(attrs)/2], attrs[len(attrs)/2:], tm, level, "m", "")
		}
	}
	// Years slog writes with an error go to the standard handler.
	attrs = append(attrs, slog.Time("t", time.Date(10000, 1, 1, 0, 0, 0, 0, time.UTC)), slog.Time("t", time.Date(-1, 1, 1, 0, 0, 0, 0, time.UTC)))
	compare(t, nil, attrs, t0, slog.LevelInfo, "m", "")
	compare(t, nil, nil, time.Date(10000, 1, 1, 0, 0, 0, 0, time.UTC), slog.LevelInfo, "m", "")
	// Each attribute alone, so a fallback for one cannot hide another;
	// and all but the two years are written here.
	for i := range attrs {
		compare(t, nil, attrs[i:i+1], t0, slog.LevelInfo, "m", "")
		compare(t, attrs[i:i+1], nil, t0, slog.LevelInfo, "m", "")
		if y := attrs[i].Value; y.Kind() == slog.KindTime && (y.Time().Year() < 0 || y.Time().Year() > 9999) {
			continue
		}
		var out bytes.Buffer
		h := New(&out, nil).(*Handler)
		h.std = failHandler{t}
		Log(context.Background(), slog.New(h), slog.LevelInfo, "m", attrs[i])
		r := slog.NewRecord(t0, slog.LevelInfo, "m", 0)
		h.WithAttrs(attrs[i:i+1]).Handle(context.Background(), r)
	}
}

// TestCanonicalLines checks lines like egressd's: the ones written
// without falling back, and those that fall back, the same as slog's.
func TestCanonicalLines(t *testing.T) {
	check(t, []byte{0, 0, 0x10, 1, 0x20, 2, 0x30, 3, 0x40, 4, 0x50, 6, 0x60, 7}, "client", "decision")
	check(t, []byte{2, 0, 0x10, 8}, "group", "msg")       // a group falls back
	check(t, []byte{2, 0x0f, 0x10, 0x8f}, "nan", "msg")   // NaN falls back
	check(t, []byte{3, 10, 0x10, 14}, "err", "valuer")    // error and LogValuer
	check(t, []byte{1, 12, 0x10, 11, 0x20, 9}, "e", "em") // empty attributes
}

// TestFastPath checks that a canonical line is written by this handler,
// not slog's (the fallback would hide a handler that never runs).
func TestFastPath(t *testing.T) {
	var out bytes.Buffer
	h := New(&out, nil).(*Handler)
	h.std = failHandler{t}
	Log(context.Background(), slog.New(h), slog.LevelInfo, "decision",
		slog.String("client", "192.0.2.1"), slog.Int("dest_port", 443), slog.Bool("enforced", true),
		slog.Uint64("bytes_out", 10), slog.Float64("duration_seconds", 0.25), slog.Duration("d", time.Second))
	if !strings.Contains(out.String(), `,"msg":"decision","client":"192.0.2.1","dest_port":443,"enforced":true,"bytes_out":10,"duration_seconds":0.25,"d":1000000000}`+"\n") {
		t.Fatalf("line: %s", out.String())
	}
	Log(context.Background(), slog.New(h), slog.LevelDebug, "hidden")
	if strings.Contains(out.String(), "hidden") {
		t.Fatal("a line below the level was written")
	}
}

type failHandler struct{ t *testing.T }

func (f failHandler) Enabled(context.Context, slog.Level) bool { return true }
func (f failHandler) Handle(context.Context, slog.Record) error {
	f.t.Fatal("fell back to the standard handler")
	return nil
}
func (f failHandler) WithAttrs([]slog.Attr) slog.Handler { return f }
func (f failHandler) WithGroup(string) slog.Handler      { return f }

func TestOptionsItCannotKeep(t *testing.T) {
	var out bytes.Buffer
	if _, ok := New(&out, &slog.HandlerOptions{AddSource: true}).(*Handler); ok {
		t.Fatal("AddSource: want the standard handler")
	}
	if _, ok := New(&out, &slog.HandlerOptions{ReplaceAttr: func(_ []string, a slog.Attr) slog.Attr { return a }}).(*Handler); ok {
		t.Fatal("ReplaceAttr: want the standard handler")
	}
}

var sinkAttrs = []slog.Attr{
	slog.String("client", "192.0.2.10"), slog.String("proto", "udp"), slog.String("name", "www.allowed.test"),
	slog.String("qtype", "A"), slog.String("verdict", "allow"), slog.String("rule", "vendor-cloud"),
	slog.String("mode", "audit"), slog.String("reason", ""), slog.Bool("enforced", false),
	slog.String("rcode", "NOERROR"), slog.Bool("cache_hit", true), slog.String("upstream", ""),
	slog.Float64("latency_seconds", 0.000012345),
}

// BenchmarkCanonicalLine: a DNS canonical line through slog's handler
// (Logger.LogAttrs) and through this package's (Log).
func BenchmarkCanonicalLine(b *testing.B) {
	b.Run("slog", func(b *testing.B) {
		l := slog.New(slog.NewJSONHandler(discard{}, nil))
		b.ReportAllocs()
		for b.Loop() {
			l.LogAttrs(context.Background(), slog.LevelInfo, "decision", sinkAttrs...)
		}
	})
	b.Run("logjson", func(b *testing.B) {
		l := slog.New(New(discard{}, nil))
		b.ReportAllocs()
		for b.Loop() {
			Log(context.Background(), l, slog.LevelInfo, "decision", sinkAttrs...)
		}
	})
}

type discard struct{}

func (discard) Write(p []byte) (int, error) { return len(p), nil }

// TestConcurrentLines: lines written at once by several goroutines, some
// by this handler and some by the standard one it falls back to, reach a
// writer that is not safe for concurrent use one whole line at a time
// (the race detector watches the buffer).
func TestConcurrentLines(t *testing.T) {
	var out bytes.Buffer
	l := slog.New(New(&out, nil)).With("component", "test")
	const goroutines, lines = 4, 200
	done := make(chan struct{})
	for g := 0; g < goroutines; g++ {
		go func() {
			defer func() { done <- struct{}{} }()
			for i := 0; i < lines; i++ {
				if i%2 == 0 {
					Log(context.Background(), l, slog.LevelInfo, "fast", slog.Int("i", i))
				} else {
					Log(context.Background(), l, slog.LevelInfo, "slow", slog.Any("v", []int{i}))
				}
			}
		}()
	}
	for g := 0; g < goroutines; g++ {
		<-done
	}
	got := strings.Split(strings.TrimSuffix(out.String(), "\n"), "\n")
	if len(got) != goroutines*lines {
		t.Fatalf("%d lines, want %d", len(got), goroutines*lines)
	}
	for _, line := range got {
		var m map[string]any
		if err := json.Unmarshal([]byte(line), &m); err != nil || m["component"] != "test" {
			t.Fatalf("line %q: %v", line, err)
		}
	}
}
