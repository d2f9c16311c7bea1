package netutil

import (
	"errors"
	"net"
	"sync"
	"syscall"
	"time"
)

// AcceptRetry reports whether an accept's error is worth retrying on the
// same listener, after a pause: out of file descriptors (EMFILE, ENFILE)
// and the others Go calls temporary, out of memory or socket buffers
// (ENOMEM, ENOBUFS), which it does not. Closing the listener instead
// would reset the connections in its queue; retrying at once spins, as
// the connection at the head of the queue fails each accept again.
func AcceptRetry(err error) bool {
	type temporary interface{ Temporary() bool }
	var t temporary
	return errors.As(err, &t) && t.Temporary() || errors.Is(err, syscall.ENOMEM) || errors.Is(err, syscall.ENOBUFS)
}

// acceptPauseFirst and acceptPauseLongest bound AcceptBackoff's pause: the
// first is acceptPauseFirst, each next one in a row twice the last, up to
// acceptPauseLongest (net/http's Server waits out a temporary error so).
const (
	acceptPauseFirst   = 5 * time.Millisecond
	acceptPauseLongest = time.Second
)

// AcceptBackoff is the pause between accepts that fail with AcceptRetry's
// errors: 5 ms, doubling with each failure in a row up to a second. One
// timer serves every pause (not one each, as time.After would make for
// each failing accept). The zero value is ready; it is not safe for
// concurrent use.
type AcceptBackoff struct {
	delay time.Duration
	t     *time.Timer
}

// Wait pauses for the next delay; it returns false, at once, when stop or
// also is closed first (a nil one never is).
func (b *AcceptBackoff) Wait(stop, also <-chan struct{}) bool {
	b.delay = min(max(2*b.delay, acceptPauseFirst), acceptPauseLongest)
	select {
	case <-stop:
		return false
	case <-also:
		return false
	default:
	}
	if b.t == nil {
		b.t = time.NewTimer(b.delay)
	} else {
		b.t.Reset(b.delay) // Go 1.23 timers: no stale tick to drain
	}
	select {
	case <-stop:
		b.t.Stop()
		return false
	case <-also:
		b.t.Stop()
		return false
	case <-b.t.C:
		return true
	}
}

// Reset starts the pauses over at the first (an accept succeeded).
func (b *AcceptBackoff) Reset() { b.delay = 0 }

// Delay is the last pause Wait took (0 before the first, after Reset).
func (b *AcceptBackoff) Delay() time.Duration { return b.delay }

// acceptWarnEvery is how often at most RetryListener calls its warn.
const acceptWarnEvery = 10 * time.Second

// RetryListener wraps a listener served by a loop that does not wait out
// an accept's errors worth retrying itself, net/http's Server.Serve: on
// those (AcceptRetry) its Accept pauses with an AcceptBackoff and accepts
// again, so the loop never sees them. http.Server would sleep up to a
// second itself, deaf to Shutdown and Close, and log every retry through
// its own logger; miekg/dns retries at once, spinning. warn (if not nil)
// is called with the error at the first failure and then at most every
// 10 s, for the owner's log line. Close, or stop (if not nil) closed, ends
// a pause at once: Accept then returns an error that is net.ErrClosed.
type RetryListener struct {
	net.Listener
	stop   <-chan struct{}
	warn   func(error)
	closed chan struct{}
	once   sync.Once

	mu       sync.Mutex
	lastWarn time.Time
}

// NewRetryListener wraps ln; see RetryListener.
func NewRetryListener(ln net.Listener, stop <-chan struct{}, warn func(err error)) *RetryListener {
	return &RetryListener{Listener: ln, stop: stop, warn: warn, closed: make(chan struct{})}
}

// Accept accepts the next connection, waiting out AcceptRetry's errors.
func (l *RetryListener) Accept() (net.Conn, error) {
	var b AcceptBackoff
	for {
		c, err := l.Listener.Accept()
		if err == nil || !AcceptRetry(err) {
			return c, err
		}
		l.warned(err)
		if !b.Wait(l.stop, l.closed) {
			return nil, &net.OpError{Op: "accept", Net: l.Addr().Network(), Addr: l.Addr(), Err: net.ErrClosed}
		}
	}
}

func (l *RetryListener) warned(err error) {
	if l.warn == nil {
		return
	}
	l.mu.Lock()
	now := time.Now()
	ok := l.lastWarn.IsZero() || now.Sub(l.lastWarn) >= acceptWarnEvery
	if ok {
		l.lastWarn = now
	}
	l.mu.Unlock()
	if ok {
		l.warn(err)
	}
}

// Close closes the listener and ends a pause of Accept.
func (l *RetryListener) Close() error {
	l.once.Do(func() { close(l.closed) })
	return l.Listener.Close()
}
