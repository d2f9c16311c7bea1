// Package logjson is the daemon's JSON log handler: lines byte for byte
// as log/slog's JSONHandler writes them, built without the standard
// handler's per-attribute machinery for the kinds egressd's canonical
// lines carry (strings, integers, booleans, durations, times, finite
// floats). It sits between the packages that log (dnsfilter, proxy,
// capture: one canonical line per decision) and the output (logbuf).
//
// Every DNS query and every connection writes a line at info, and with
// the standard handler the line was the largest single cost of a cached
// DNS answer (about 3 µs: the record, the call stack the logger captures
// for a source position nobody asked for, and the handler's generic
// walk). A record this handler cannot write the same way (a group, a
// LogValuer, an arbitrary value, a float that is not finite, a time
// outside years 0-9999) goes to a standard JSONHandler made with the same
// options, so the output never differs from slog's; FuzzSameAsSlog holds
// the two to that.
//
// Log is the fast way in: it never captures the call stack (no handler
// here asks for a source position), and when the logger's handler is one
// of these it builds no Record either.
package logjson

import (
	"context"
	"io"
	"log/slog"
	"math"
	"strconv"
	"sync"
	"time"

	"egressd/internal/jsonenc"
)

// Handler writes JSON lines as slog.JSONHandler does. Make it with New.
type Handler struct {
	std   slog.Handler // the standard handler, same output, same attributes and groups
	level slog.Leveler
	w     *lockedWriter // shared by the handlers derived from one New, and by std
	pre   []byte        // the attributes of WithAttrs, encoded, each with its leading comma
	slow  bool          // a group, or an attribute only std can write: always std
}

// lockedWriter serializes the lines of this handler and of the standard
// one it falls back to, so that a writer that is not safe for concurrent
// use (a bytes.Buffer in a test) sees one line at a time, as with slog.
type lockedWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// New returns a handler writing to w, like slog.NewJSONHandler(w, opts).
// Options this handler does not reproduce (ReplaceAttr, AddSource) make
// it return the standard handler itself.
func New(w io.Writer, opts *slog.HandlerOptions) slog.Handler {
	if opts == nil {
		opts = &slog.HandlerOptions{}
	}
	if opts.ReplaceAttr != nil || opts.AddSource {
		return slog.NewJSONHandler(w, opts)
	}
	lv := opts.Level
	if lv == nil {
		lv = slog.LevelInfo
	}
	lw := &lockedWriter{w: w}
	return &Handler{std: slog.NewJSONHandler(lw, opts), level: lv, w: lw}
}

// Enabled reports whether level is at or above the handler's level.
func (h *Handler) Enabled(_ context.Context, level slog.Level) bool {
	return level >= h.level.Level()
}

// WithAttrs returns a handler whose lines carry attrs after the message.
func (h *Handler) WithAttrs(attrs []slog.Attr) slog.Handler {
	if len(attrs) == 0 {
		return h
	}
	h2 := *h
	h2.std = h.std.WithAttrs(attrs)
	if !h.slow {
		pre, ok := appendAttrs(append([]byte(nil), h.pre...), attrs)
		h2.pre, h2.slow = pre, !ok
	}
	return &h2
}

// WithGroup returns a handler that nests later attributes in a group:
// the standard handler writes its lines (even for an empty name, which it
// writes as a group named "").
func (h *Handler) WithGroup(name string) slog.Handler {
	h2 := *h
	h2.std = h.std.WithGroup(name)
	h2.slow = true
	return &h2
}

// Handle writes r as one line.
func (h *Handler) Handle(ctx context.Context, r slog.Record) error {
	if h.slow {
		return h.std.Handle(ctx, r)
	}
	bp := bufPool.Get().(*[]byte)
	defer putBuf(bp)
	b, ok := h.appendHead((*bp)[:0], r.Time, r.Level, r.Message)
	if ok {
		r.Attrs(func(a slog.Attr) bool {
			b, ok = appendAttr(b, a)
			return ok
		})
	}
	if !ok {
		return h.std.Handle(ctx, r)
	}
	*bp = b
	return h.write(append(b, '}', '\n'))
}

// Log writes a line at level with msg and attrs to l, as
// l.LogAttrs(ctx, level, msg, attrs...) does, but without the source
// position (no handler of egressd's asks for it) and, when l's handler
// is a Handler, without a Record.
func Log(ctx context.Context, l *slog.Logger, level slog.Level, msg string, attrs ...slog.Attr) {
	if ctx == nil {
		ctx = context.Background()
	}
	h := l.Handler()
	if !h.Enabled(ctx, level) {
		return
	}
	now := time.Now()
	if fh, ok := h.(*Handler); ok && !fh.slow {
		bp := bufPool.Get().(*[]byte)
		b, ok := fh.appendHead((*bp)[:0], now, level, msg)
		if ok {
			b, ok = appendAttrs(b, attrs)
		}
		if ok {
			*bp = b
			fh.write(append(b, '}', '\n'))
			putBuf(bp)
			return
		}
		putBuf(bp)
	}
	r := slog.NewRecord(now, level, msg, 0)
	r.AddAttrs(attrs...)
	_ = h.Handle(ctx, r)
}

func (h *Handler) write(line []byte) error {
	_, err := h.w.Write(line)
	return err
}

var bufPool = sync.Pool{New: func() any { b := make([]byte, 0, 1024); return &b }}

func putBuf(bp *[]byte) {
	if cap(*bp) > 16<<10 { // as slog: keep only small buffers
		return
	}
	bufPool.Put(bp)
}

// appendHead appends the opening brace, time, level, message and the
// WithAttrs attributes. It reports false for a time slog writes with an
// error.
func (h *Handler) appendHead(b []byte, t time.Time, level slog.Level, msg string) ([]byte, bool) {
	b = append(b, '{')
	if !t.IsZero() {
		if y := t.Year(); y < 0 || y >= 10000 {
			return b, false
		}
		b = append(b, `"time":"`...)
		b = t.Round(0).AppendFormat(b, time.RFC3339Nano)
		b = append(b, `",`...)
	}
	b = append(b, `"level":`...)
	b = jsonenc.AppendString(b, level.String())
	b = append(b, `,"msg":`...)
	b = jsonenc.AppendString(b, msg)
	return append(b, h.pre...), true
}

func appendAttrs(b []byte, attrs []slog.Attr) ([]byte, bool) {
	ok := true
	for i := 0; ok && i < len(attrs); i++ {
		b, ok = appendAttr(b, attrs[i])
	}
	return b, ok
}

// appendAttr appends ,"key":value for the kinds it writes as slog does,
// nothing for an empty attribute, and reports false for anything else.
func appendAttr(b []byte, a slog.Attr) ([]byte, bool) {
	v := a.Value
	k := v.Kind()
	if k == slog.KindAny && a.Key == "" && v.Any() == nil {
		return b, true // slog elides empty attributes
	}
	n := len(b)
	b = append(b, ',')
	b = jsonenc.AppendString(b, a.Key)
	b = append(b, ':')
	switch k {
	case slog.KindString:
		return jsonenc.AppendString(b, v.String()), true
	case slog.KindInt64:
		return strconv.AppendInt(b, v.Int64(), 10), true
	case slog.KindUint64:
		return strconv.AppendUint(b, v.Uint64(), 10), true
	case slog.KindBool:
		return strconv.AppendBool(b, v.Bool()), true
	case slog.KindDuration:
		return strconv.AppendInt(b, int64(v.Duration()), 10), true
	case slog.KindFloat64:
		f := v.Float64()
		if math.IsNaN(f) || math.IsInf(f, 0) {
			return b[:n], false
		}
		return jsonenc.AppendFloat(b, f), true
	case slog.KindTime:
		t := v.Time()
		if y := t.Year(); y < 0 || y >= 10000 {
			return b[:n], false
		}
		b = append(b, '"')
		b = t.AppendFormat(b, time.RFC3339Nano)
		return append(b, '"'), true
	}
	return b[:n], false
}
