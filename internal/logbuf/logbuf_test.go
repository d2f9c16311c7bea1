package logbuf

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// sink records the writes that reach it.
type sink struct {
	mu     sync.Mutex
	buf    bytes.Buffer
	writes int
	err    error
}

func (s *sink) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.writes++
	if s.err != nil {
		return 0, s.err
	}
	return s.buf.Write(p)
}

func (s *sink) state() (string, int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.String(), s.writes
}

// TestBatches: a burst of lines reaches the writer in one write, whole
// and in order, at Flush.
func TestBatches(t *testing.T) {
	s := &sink{}
	lw := New(s, time.Hour)
	var want strings.Builder
	for i := range 100 {
		line := fmt.Sprintf("line %d\n", i)
		want.WriteString(line)
		if n, err := lw.Write([]byte(line)); n != len(line) || err != nil {
			t.Fatalf("write: %d, %v", n, err)
		}
	}
	if got, n := s.state(); n != 0 || got != "" {
		t.Fatalf("%d writes before the flush", n)
	}
	if err := lw.Flush(); err != nil {
		t.Fatal(err)
	}
	got, n := s.state()
	if n != 1 || got != want.String() {
		t.Fatalf("%d writes, %q", n, got)
	}
}

// TestTimer: a line reaches the writer within the interval with nobody
// calling Flush.
func TestTimer(t *testing.T) {
	s := &sink{}
	lw := New(s, 20*time.Millisecond)
	defer lw.Close()
	lw.Write([]byte("a\n"))
	deadline := time.Now().Add(10 * time.Second)
	for {
		if got, _ := s.state(); got == "a\n" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the line never reached the writer")
		}
		time.Sleep(5 * time.Millisecond)
	}
	// And again: the timer re-arms after a flush.
	lw.Write([]byte("b\n"))
	for {
		if got, _ := s.state(); got == "a\nb\n" {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("the second line never reached the writer")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestFull: a full buffer is written at once.
func TestFull(t *testing.T) {
	s := &sink{}
	lw := New(s, time.Hour)
	big := bytes.Repeat([]byte("x"), maxBuffered)
	lw.Write(big)
	if got, n := s.state(); n != 1 || len(got) != maxBuffered {
		t.Fatalf("%d writes, %d bytes", n, len(got))
	}
}

// TestCloseAndAfter: Close flushes, and later lines go straight through.
func TestCloseAndAfter(t *testing.T) {
	s := &sink{}
	lw := New(s, time.Hour)
	lw.Write([]byte("before\n"))
	if err := lw.Close(); err != nil {
		t.Fatal(err)
	}
	if got, _ := s.state(); got != "before\n" {
		t.Fatalf("after Close: %q", got)
	}
	lw.Write([]byte("after\n"))
	if got, _ := s.state(); got != "before\nafter\n" {
		t.Fatalf("after a write past Close: %q", got)
	}
}

// TestError: a failing writer does not fail Write; Flush reports it once.
func TestError(t *testing.T) {
	s := &sink{err: errors.New("broken pipe")}
	lw := New(s, time.Hour)
	if _, err := lw.Write([]byte("a\n")); err != nil {
		t.Fatalf("write: %v", err)
	}
	if err := lw.Flush(); err == nil {
		t.Fatal("flush hid the writer's error")
	}
	if err := lw.Flush(); err != nil {
		t.Fatalf("the error reported twice: %v", err)
	}
}

// TestSlogConcurrent: slog handlers on many goroutines; every line
// arrives whole (run with -race).
func TestSlogConcurrent(t *testing.T) {
	s := &sink{}
	lw := New(s, time.Millisecond)
	log := slog.New(slog.NewJSONHandler(lw, nil))
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := range 200 {
				log.Info("decision", "g", g, "i", i, "pad", strings.Repeat("p", 100))
			}
		})
	}
	wg.Wait()
	lw.Close()
	got, _ := s.state()
	lines := strings.Split(strings.TrimSuffix(got, "\n"), "\n")
	if len(lines) != 1600 {
		t.Fatalf("%d lines, want 1600", len(lines))
	}
	for _, l := range lines {
		if !strings.HasPrefix(l, "{") || !strings.HasSuffix(l, "}") {
			t.Fatalf("torn line %q", l)
		}
	}
}

// BenchmarkSlogLine: a canonical-sized JSON line through slog to a file,
// written straight through and batched.
func BenchmarkSlogLine(b *testing.B) {
	for _, mode := range []string{"direct", "batched"} {
		b.Run(mode, func(b *testing.B) {
			f, err := os.Create(filepath.Join(b.TempDir(), "log"))
			if err != nil {
				b.Fatal(err)
			}
			defer f.Close()
			var w io.Writer = f
			if mode == "batched" {
				lw := New(f, 50*time.Millisecond)
				defer lw.Close()
				w = lw
			}
			log := slog.New(slog.NewJSONHandler(w, nil))
			for b.Loop() {
				log.Info("flow", "client", "198.18.1.2", "dest", "198.18.2.2", "port", 443, "name", "www.allowed.test")
			}
		})
	}
}
