package proxy

import (
	"bytes"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// parkedOrigin is the origin's side of an upgraded stream whose Write
// delivers the bytes, then returns only once the record is done (or after
// a second): the relay goroutine that wrote the client's bytes descheduled
// between its write and its count, as the box under load did it. Ended,
// its Read says EOF at once, and its Write blocks until it is closed: an
// origin that ended its side and reads no more.
type parkedOrigin struct {
	ended     bool
	mu        sync.Mutex
	got       bytes.Buffer
	delivered chan struct{} // closed by the first Write, the bytes delivered
	recorded  chan struct{} // closed by the record's done
	closed    chan struct{}
	closeOnce sync.Once
}

func newParkedOrigin() *parkedOrigin {
	return &parkedOrigin{delivered: make(chan struct{}), recorded: make(chan struct{}), closed: make(chan struct{})}
}

func (o *parkedOrigin) Read([]byte) (int, error) {
	if o.ended {
		return 0, io.EOF
	}
	<-o.closed
	return 0, net.ErrClosed
}

func (o *parkedOrigin) Write(b []byte) (int, error) {
	o.mu.Lock()
	o.got.Write(b)
	o.mu.Unlock()
	close(o.delivered)
	if o.ended {
		<-o.closed
		return len(b), nil
	}
	select {
	case <-o.recorded:
	case <-time.After(time.Second):
	}
	return len(b), nil
}

func (o *parkedOrigin) Close() error {
	o.closeOnce.Do(func() { close(o.closed) })
	return nil
}

// TestUpgradeRecordCountsWriteInFlight: the record of an upgraded stream
// (explicit proxy, 101) counts the client's bytes a relay goroutine had
// written to the origin but not yet counted when the stream ended: ended
// by goproxy closing the body, or by a reload's revocation closing the
// origin's connection under the read. It said BytesOut 0 for a stream
// whose bytes the origin had echoed (TestReloadExplicitUpgrade, once
// under load). Waiting for the count does not wait for ever on a Write
// the origin no longer reads: the origin's end closes its connection
// first.
func TestUpgradeRecordCountsWriteInFlight(t *testing.T) {
	for _, tc := range []struct {
		what  string
		ended bool
		end   func(b *liveRWBody, o *parkedOrigin)
	}{
		{"closed", false, func(b *liveRWBody, _ *parkedOrigin) { b.Close() }},
		{"revoked", false, func(b *liveRWBody, o *parkedOrigin) {
			// The reload's close func closes the origin's connection; the
			// relay's read of it ends the record.
			o.Close()
			b.Read(make([]byte, 16))
		}},
		{"origin-ended", true, func(b *liveRWBody, _ *parkedOrigin) { b.Read(make([]byte, 16)) }},
	} {
		t.Run(tc.what, func(t *testing.T) {
			o := newParkedOrigin()
			o.ended = tc.ended
			b := &liveRWBody{liveBody: &liveBody{ReadCloser: o}}
			var out atomic.Uint64
			var dones atomic.Int32
			b.done = func() {
				out.Store(b.written.settled())
				dones.Add(1)
				close(o.recorded)
			}
			wrote := make(chan error, 1)
			go func() {
				_, err := b.Write([]byte("hello"))
				wrote <- err
			}()
			<-o.delivered
			go tc.end(b, o)
			select {
			case err := <-wrote:
				if err != nil {
					t.Fatal(err)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("the write in flight never returned: the end waits for it without closing the origin")
			}
			<-o.recorded
			if n := dones.Load(); n != 1 {
				t.Fatalf("done called %d times, want 1", n)
			}
			if n := out.Load(); n != 5 {
				t.Errorf("record's BytesOut = %d, want 5 (the bytes the origin got: %q)", n, o.got.String())
			}
		})
	}
}

// parkedClient is a client's connection (inspected: goproxy's TLS
// termination writes to it) whose Write is a parkedOrigin's.
type parkedClient struct {
	net.Conn // nil: only Write and Close are called
	o        *parkedOrigin
}

func (c parkedClient) Write(b []byte) (int, error) { return c.o.Write(b) }
func (c parkedClient) Close() error                { return c.o.Close() }

// TestInspectedRecordCountsWriteInFlight: the record of an inspected
// connection counts the bytes a goroutine had written to the client but
// not yet counted when the connection was closed: a WebSocket inside an
// inspected connection has goproxy write the origin's bytes to the client
// while another goroutine ends it (tls.Conn.Close does not wait for a
// Write in flight: it closes the connection under it).
func TestInspectedRecordCountsWriteInFlight(t *testing.T) {
	o := newParkedOrigin()
	ic := &inspectedClient{Conn: parkedClient{o: o}}
	var in atomic.Uint64
	ic.done = func() {
		in.Store(ic.written.settled())
		close(o.recorded)
	}
	wrote := make(chan error, 1)
	go func() {
		_, err := ic.Write([]byte("hello"))
		wrote <- err
	}()
	<-o.delivered
	ic.Close()
	if err := <-wrote; err != nil {
		t.Fatal(err)
	}
	if n := in.Load(); n != 5 {
		t.Errorf("record's BytesIn = %d, want 5 (the bytes the client got: %q)", n, o.got.String())
	}
}
