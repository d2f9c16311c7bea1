package proxy

import (
	"errors"
	"testing"

	"egressd/internal/httpwire"
)

// TestClearStream: the follower of an inspected connection's cleartext
// keeps one verdict per head, in order, across reads that split heads
// and bodies; a refused head is kept and the stream not followed past it;
// a request whose head it did not find (read as a body) is errNoHead.
func TestClearStream(t *testing.T) {
	cs := newClearStream(1024)
	in := "POST /a HTTP/1.1\r\nHost: a.test\r\nContent-Length: 5\r\n\r\nhello" +
		"GET /b HTTP/1.1\r\nHost: a.test\r\n\r\n" +
		"GET http://a.test/c HTTP/1.1\r\nHost: b.test\r\n\r\n" +
		"GET /d HTTP/1.1\r\nHost: a.test\r\n\r\n"
	for i := 0; i < len(in); i += 7 {
		cs.feed([]byte(in[i:min(i+7, len(in))]))
	}
	for i, want := range []error{nil, nil, httpwire.ErrHostMismatch, nil, nil} {
		if err := cs.next(); !errors.Is(err, want) || (want == nil && err != nil) {
			t.Errorf("head %d: %v, want %v", i, err, want)
		}
	}
	cs = newClearStream(1024)
	cs.feed([]byte("GET /a HTTP/1.1\r\nHost: a.test\r\n\r\n"))
	if err := cs.next(); err != nil {
		t.Errorf("first head: %v", err)
	}
	if err := cs.next(); !errors.Is(err, errNoHead) {
		t.Errorf("a head not found: %v, want %v", err, errNoHead)
	}
}
