package audit

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
)

// Sink receives events. Emit must not block traffic: an implementation that
// cannot keep up sheds events and counts them, it never makes the caller
// wait on a disk or a network. Emit is safe for concurrent use and takes
// ownership of nothing: it may keep a copy of ev.
type Sink interface {
	Emit(ev Event)
}

// LineQuieter is a Sink that also budgets the components' decision log
// lines (the [Journal]: a noisy device's repeated denials are counted
// into a summary line).
type LineQuieter interface {
	QuietLine(ev Event) bool
}

// QuietLine reports whether the decision line of ev, about to be emitted
// into s, is to be left out: s counts it into a summary line instead.
// Call it only for the line of an event that is emitted. Only a denial
// can be left out; ev never escapes (a component's event stays on its
// stack: the DNS forwarder's fast path allocates nothing).
func QuietLine(s Sink, ev *Event) bool {
	if !budgeted(ev) {
		return false
	}
	q, ok := s.(LineQuieter)
	return ok && q.QuietLine(*ev)
}

// SinkFunc adapts a function to a Sink.
type SinkFunc func(Event)

// Emit calls f(ev).
func (f SinkFunc) Emit(ev Event) { f(ev) }

// Discard drops every event.
var Discard Sink = SinkFunc(func(Event) {})

// Tee sends each event to every sink in order.
func Tee(sinks ...Sink) Sink {
	return SinkFunc(func(ev Event) {
		for _, s := range sinks {
			s.Emit(ev)
		}
	})
}

// NDJSONSink writes one JSON object per line. Writes are serialised; a
// write error is kept (see Err) and counted, and later events are still
// tried.
type NDJSONSink struct {
	mu  sync.Mutex // guards following
	w   *bufio.Writer
	err error

	failed atomic.Uint64
}

var _ Sink = (*NDJSONSink)(nil)

// NewNDJSONSink returns a sink writing to w. Call Flush to push buffered
// lines out.
func NewNDJSONSink(w io.Writer) *NDJSONSink {
	return &NDJSONSink{w: bufio.NewWriter(w)}
}

// Emit writes ev as one line, bounded (Event.Bound).
func (s *NDJSONSink) Emit(ev Event) {
	ev.Bound()
	b, err := json.Marshal(ev)
	if err != nil {
		s.failed.Add(1)
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	b = append(b, '\n')
	if _, err := s.w.Write(b); err != nil {
		s.err = fmt.Errorf("audit: write event: %w", err)
		s.failed.Add(1)
	}
}

// Flush writes buffered lines to the underlying writer.
func (s *NDJSONSink) Flush() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.w.Flush(); err != nil {
		s.err = fmt.Errorf("audit: flush events: %w", err)
	}
	return s.err
}

// Failed returns how many events could not be written.
func (s *NDJSONSink) Failed() uint64 { return s.failed.Load() }

// Err returns the last write error.
func (s *NDJSONSink) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}
