package netutil

import (
	"errors"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"egressd/internal/testnet"
)

// TestRetryListenerStops: out of file descriptors with a connection in
// its queue, RetryListener's Accept waits the EMFILE out (warn called
// once for the burst, not per retry) until stop is closed, then returns
// net.ErrClosed with the inner listener still open: an accept that only
// slept and tried again would never return. Then, a second Accept on
// the listener, Close ends it the same way, the socket still open. Loopback only; the
// test fails only past 5 s (a hang), not on speed.
func TestRetryListenerStops(t *testing.T) {
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer inner.Close()
	stop := make(chan struct{})
	var warns atomic.Int32
	warned := make(chan struct{}, 1)
	ln := NewRetryListener(inner, stop, func(err error) {
		if !AcceptRetry(err) {
			t.Errorf("warn got %v, not an error to retry", err)
		}
		warns.Add(1)
		select {
		case warned <- struct{}{}:
		default:
		}
	})
	connect := testnet.DialQueued(t, inner.Addr().String())
	release := testnet.OutOfFDs(t)
	defer release()
	defer connect()()

	accept := func() chan error {
		ch := make(chan error, 1)
		go func() {
			c, err := ln.Accept()
			if c != nil {
				c.Close()
			}
			ch <- err
		}()
		return ch
	}
	got := accept()
	select {
	case <-warned:
	case <-time.After(10 * time.Second):
		release()
		t.Fatal("warn not called out of descriptors")
	}
	time.Sleep(200 * time.Millisecond) // several pauses: warn is still once
	close(stop)
	select {
	case err := <-got:
		if !errors.Is(err, net.ErrClosed) {
			t.Errorf("Accept after stop: %v, want net.ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		release()
		t.Fatal("Accept has not returned 5 s after stop while out of descriptors")
	}
	if n := warns.Load(); n != 1 {
		t.Errorf("warn called %d times, want once", n)
	}

	// Close must end the pause itself: its inner listener's Close here
	// leaves the socket open (EMFILE goes on), so an Accept that only
	// waited its pause out and accepted again would never return (with
	// inner closed, the accept after the pause failed with net.ErrClosed
	// all the same, and the test could not fail).
	ln2 := NewRetryListener(keepOpen{inner}, nil, nil)
	ln = ln2
	got = accept()
	time.Sleep(200 * time.Millisecond) // Accept in its pauses
	ln2.Close()
	select {
	case err := <-got:
		if !errors.Is(err, net.ErrClosed) {
			t.Errorf("Accept after Close: %v, want net.ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		release()
		t.Fatal("Accept has not returned 5 s after Close while out of descriptors")
	}
}

// keepOpen is a listener whose Close leaves the socket open.
type keepOpen struct{ net.Listener }

func (keepOpen) Close() error { return nil }

// TestAcceptBackoff: the pauses are 5 ms doubling to a second, and stay
// there, and Reset starts them over (stop closed: no Wait sleeps, each
// returns false); pauses that run out return true and use the one timer,
// not one each.
func TestAcceptBackoff(t *testing.T) {
	stop := make(chan struct{})
	close(stop)
	var b AcceptBackoff
	want := []time.Duration{5, 10, 20, 40, 80, 160, 320, 640, 1000, 1000}
	for i, w := range want {
		if b.Wait(stop, nil) {
			t.Fatalf("Wait #%d with stop closed returned true", i)
		}
		if b.Delay() != w*time.Millisecond {
			t.Errorf("pause #%d: %v, want %v", i, b.Delay(), w*time.Millisecond)
		}
	}
	b.Reset()
	if b.Wait(nil, stop); b.Delay() != 5*time.Millisecond {
		t.Errorf("pause after Reset: %v, want 5ms", b.Delay())
	}
	b.Reset()
	var timer *time.Timer
	for i := range 3 { // 5, 10, 20 ms; no speed asserted
		if !b.Wait(nil, nil) {
			t.Fatalf("Wait #%d with nothing closed returned false", i)
		}
		if timer == nil {
			timer = b.t
		} else if b.t != timer {
			t.Errorf("Wait #%d made a timer of its own", i)
		}
	}
}
