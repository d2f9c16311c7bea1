package jsonenc

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"math"
	"strings"
	"testing"
	"time"
)

// marshal is encoding/json's form of v, with or without HTML escaping.
func marshal(t *testing.T, v any, html bool) string {
	t.Helper()
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(html)
	if err := enc.Encode(v); err != nil {
		t.Fatal(err)
	}
	return string(bytes.TrimSuffix(buf.Bytes(), []byte("\n")))
}

func checkString(t *testing.T, s string) {
	t.Helper()
	if got, want := string(AppendStringHTML(nil, s)), marshal(t, s, true); got != want {
		t.Fatalf("AppendStringHTML(%q) = %s, want %s", s, got, want)
	}
	if got, want := string(AppendString(nil, s)), slogQuoted(t, s); got != want {
		t.Fatalf("AppendString(%q) = %s, want %s", s, got, want)
	}
}

// slogQuoted is s as log/slog's JSON handler writes a message.
func slogQuoted(t *testing.T, s string) string {
	t.Helper()
	var buf bytes.Buffer
	slog.NewJSONHandler(&buf, nil).Handle(context.Background(), slog.NewRecord(time.Time{}, slog.LevelInfo, s, 0))
	line := buf.String()
	const pre, post = `{"level":"INFO","msg":`, "}\n"
	if !strings.HasPrefix(line, pre) || !strings.HasSuffix(line, post) {
		t.Fatalf("slog line: %s", line)
	}
	return line[len(pre) : len(line)-len(post)]
}

func TestStrings(t *testing.T) {
	for c := 0; c < 0x80; c++ {
		checkString(t, "a"+string(rune(c))+"z")
	}
	for _, s := range []string{"", "\u2028\u2029", "é日本\U0001F600", "\xff", "a\xc3", "\xed\xa0\x80", "<a href=\"x\">&amp;</a>"} {
		checkString(t, s)
	}
	if got := string(AppendString([]byte("k:"), `\b`)); got != `k:"\\b"` {
		t.Fatalf("AppendString of a backslash and b: %s", got)
	}
}

func TestFloats(t *testing.T) {
	for _, f := range []float64{0, math.Copysign(0, -1), 1, -1.5, 1e-6, 9.99e-7, -1e-7, 1e20, 1e21, -1e21, 1.5e300, 5e-324, math.MaxFloat64, 123456789.125, 0.1 + 0.2, 1e-10, 2.5e-9} {
		if got, want := string(AppendFloat(nil, f)), marshal(t, f, true); got != want {
			t.Errorf("AppendFloat(%v) = %s, want %s", f, got, want)
		}
	}
}

func FuzzSameAsEncodingJSON(f *testing.F) {
	f.Add("a<b>&\"\\\n\x00\x7f\u2028\xff", 1.5e-7)
	f.Fuzz(func(t *testing.T, s string, x float64) {
		checkString(t, s)
		if !math.IsNaN(x) && !math.IsInf(x, 0) {
			if got, want := string(AppendFloat(nil, x)), marshal(t, x, true); got != want {
				t.Fatalf("AppendFloat(%v) = %s, want %s", x, got, want)
			}
		}
	})
}
