package proxy

import (
	"bytes"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// parkedOrigin is the origin's side of an upgraded stream whose Write
// delivers the bytes, then returns only once the record is done (or after
// a second): the relay goroutine that wrote the client's bytes descheduled
// between its write and its count, as the box under load did it.
type parkedOrigin struct {
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
	<-o.closed
	return 0, net.ErrClosed
}

func (o *parkedOrigin) Write(b []byte) (int, error) {
	o.mu.Lock()
	o.got.Write(b)
	o.mu.Unlock()
	close(o.delivered)
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
// under load).
func TestUpgradeRecordCountsWriteInFlight(t *testing.T) {
	for _, tc := range []struct {
		what string
		end  func(b *liveRWBody, o *parkedOrigin)
	}{
		{"closed", func(b *liveRWBody, _ *parkedOrigin) { b.Close() }},
		{"revoked", func(b *liveRWBody, o *parkedOrigin) {
			// The reload's close func closes the origin's connection; the
			// relay's read of it ends the record.
			o.Close()
			b.Read(make([]byte, 16))
		}},
	} {
		t.Run(tc.what, func(t *testing.T) {
			o := newParkedOrigin()
			b := &liveRWBody{liveBody: &liveBody{ReadCloser: o}}
			var out atomic.Uint64
			var dones atomic.Int32
			b.done = func() {
				out.Store(b.written.Load())
				dones.Add(1)
				close(o.recorded)
			}
			wrote := make(chan error, 1)
			go func() {
				_, err := b.Write([]byte("hello"))
				wrote <- err
			}()
			<-o.delivered
			tc.end(b, o)
			if err := <-wrote; err != nil {
				t.Fatal(err)
			}
			if n := dones.Load(); n != 1 {
				t.Fatalf("done called %d times, want 1", n)
			}
			if n := out.Load(); n != 5 {
				t.Errorf("record's BytesOut = %d, want 5 (the bytes the origin got: %q)", n, o.got.String())
			}
		})
	}
}
