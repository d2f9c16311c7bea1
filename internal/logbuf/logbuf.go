// Package logbuf is the daemon's log output: a writer that gathers the
// lines written within a short interval and hands them to the kernel in
// one write. egressd writes one canonical line per decision (every
// connection, every query), and a write(2) for each of them was a
// measurable share of the proxy's CPU per connection; batched, a burst
// of lines costs one. It sits between log/slog's handler and standard
// error (the journal, under systemd).
//
// A line waits at most the flush interval (or until the buffer is full)
// before it reaches the kernel, as the audit journal's events do; a crash
// loses at most that much. Close flushes what is left.
package logbuf

import (
	"io"
	"sync"
	"time"
)

// maxBuffered is the buffer size at which Write flushes at once, without
// waiting for the timer.
const maxBuffered = 64 << 10

// Writer buffers writes to an underlying writer. Each Write is kept
// whole and in order (slog handlers write one line per call). It is safe
// for concurrent use.
type Writer struct {
	interval time.Duration

	mu      sync.Mutex // guards the fields below, and writes to w
	w       io.Writer
	buf     []byte
	armed   bool // a flush is scheduled
	timer   *time.Timer
	closed  bool
	lastErr error
}

// New returns a Writer that flushes to w at most interval after a line
// was written. interval <= 0 makes every Write go straight through.
func New(w io.Writer, interval time.Duration) *Writer {
	lw := &Writer{w: w, interval: interval}
	lw.timer = time.AfterFunc(time.Hour, lw.timed)
	lw.timer.Stop()
	return lw
}

// Write buffers p. It never fails: an error of the underlying writer is
// kept for Flush and Close to report (a log line that cannot be written
// must not fail the decision that logged it).
func (lw *Writer) Write(p []byte) (int, error) {
	lw.mu.Lock()
	defer lw.mu.Unlock()
	if lw.closed || lw.interval <= 0 {
		lw.write(p)
		return len(p), nil
	}
	lw.buf = append(lw.buf, p...)
	switch {
	case len(lw.buf) >= maxBuffered:
		lw.flushLocked()
	case !lw.armed:
		lw.armed = true
		lw.timer.Reset(lw.interval)
	}
	return len(p), nil
}

// Flush writes what is buffered now and returns the first error the
// underlying writer gave since the last Flush.
func (lw *Writer) Flush() error {
	lw.mu.Lock()
	defer lw.mu.Unlock()
	lw.flushLocked()
	err := lw.lastErr
	lw.lastErr = nil
	return err
}

// Close flushes and makes later writes go straight through (a line
// logged during shutdown is not lost).
func (lw *Writer) Close() error {
	lw.mu.Lock()
	lw.closed = true
	lw.mu.Unlock()
	lw.timer.Stop()
	return lw.Flush()
}

func (lw *Writer) timed() {
	lw.mu.Lock()
	defer lw.mu.Unlock()
	lw.flushLocked()
}

func (lw *Writer) flushLocked() {
	if lw.armed {
		lw.armed = false
		lw.timer.Stop()
	}
	if len(lw.buf) == 0 {
		return
	}
	lw.write(lw.buf)
	if cap(lw.buf) > 4*maxBuffered { // one huge line: do not keep its buffer
		lw.buf = nil
	} else {
		lw.buf = lw.buf[:0]
	}
}

func (lw *Writer) write(p []byte) {
	if _, err := lw.w.Write(p); err != nil && lw.lastErr == nil {
		lw.lastErr = err
	}
}
