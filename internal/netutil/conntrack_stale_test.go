package netutil

import (
	"encoding/binary"
	"errors"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// fakeCtSocket is a Conntrack of one socket whose other end (kernel) the
// test holds: it reads the requests and writes the answers, late ones
// included. One end of an AF_UNIX datagram socketpair stands in for the
// netlink socket (K1's TestConntrackNoAnswerBounded does too).
func fakeCtSocket(t *testing.T) (ct *Conntrack, kernel int) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Close(fds[1]) })
	s := &ctSocket{fd: fds[0], seq: 7 << 28, buf: make([]byte, 8192)}
	ct = &Conntrack{free: make(chan *ctSocket, 1), all: []*ctSocket{s}}
	ct.free <- s
	t.Cleanup(func() { ct.Close() })
	return ct, fds[1]
}

// readRequest reads one request from the kernel end and returns its
// sequence number.
func readRequest(t *testing.T, kernel int) uint32 {
	t.Helper()
	pfd := []unix.PollFd{{Fd: int32(kernel), Events: unix.POLLIN}}
	if n, err := unix.Poll(pfd, 5000); err != nil || n == 0 {
		t.Fatalf("no request within 5 s: %v", err)
	}
	b := make([]byte, 4096)
	n, err := unix.Read(kernel, b)
	if err != nil || n < unix.SizeofNlMsghdr {
		t.Fatalf("read request: %d %v", n, err)
	}
	if typ := binary.NativeEndian.Uint16(b[4:6]); typ != unix.NFNL_SUBSYS_CTNETLINK<<8|ipctnlMsgCtGet {
		t.Fatalf("request of type %#x", typ)
	}
	return binary.NativeEndian.Uint32(b[8:12])
}

// ctEntry is the kernel's answer to seq: an entry whose original source
// is src.
func ctEntry(seq uint32, src netip.AddrPort) []byte {
	return ctAnswer(seq, src, netip.MustParseAddrPort("198.18.2.10:443"))
}

func writeDgram(t *testing.T, fd int, msgs ...[]byte) {
	t.Helper()
	var b []byte
	for _, m := range msgs {
		b = append(b, m...)
	}
	if _, err := unix.Write(fd, b); err != nil {
		t.Fatal(err)
	}
}

// TestConntrackLateAnswerNotTaken: a lookup that runs out of time leaves
// the kernel's late answer queued on its socket; the next lookup on that
// socket must not take it for its own (it would give a connection another
// connection's original port). The late answer is skipped by its
// sequence number, in a datagram of its own or ahead of the right one in
// one datagram; an error for an earlier request is skipped too; an
// acknowledgement is not an answer. With no answer of its own the second
// lookup times out rather than take the stale one.
func TestConntrackLateAnswerNotTaken(t *testing.T) {
	local, remote := netip.MustParseAddrPort("198.18.1.1:15001"), netip.MustParseAddrPort("198.18.1.2:50000")
	stale, right := netip.MustParseAddrPort("198.18.1.2:1111"), netip.MustParseAddrPort("198.18.1.2:2222")

	type result struct {
		src netip.AddrPort
		err error
	}
	lookup := func(ct *Conntrack) chan result {
		ch := make(chan result, 1)
		go func() {
			src, err := ct.OriginalSource(local, remote)
			ch <- result{src, err}
		}()
		return ch
	}
	wait := func(ch chan result) result {
		select {
		case r := <-ch:
			return r
		case <-time.After(10 * time.Second):
			t.Fatal("lookup still waits after 10 s")
			return result{}
		}
	}
	// timedOut makes a lookup the kernel end does not answer in time and
	// returns its sequence number.
	timedOut := func(ct *Conntrack, kernel int) uint32 {
		ch := lookup(ct)
		seq := readRequest(t, kernel)
		if r := wait(ch); !errors.Is(r.err, ErrConntrackTimeout) {
			t.Fatalf("unanswered lookup: %v %v, want ErrConntrackTimeout", r.src, r.err)
		}
		return seq
	}

	for _, c := range []struct {
		name    string
		answer  func(old, seq uint32) [][][]byte // datagrams, after the late one
		late    bool                             // the late answer is its own datagram, written before
		want    netip.AddrPort
		wantErr error
	}{
		{"late-then-right", func(old, seq uint32) [][][]byte { return [][][]byte{{ctEntry(seq, right)}} }, true, right, nil},
		{"late-and-right-in-one", func(old, seq uint32) [][][]byte { return [][][]byte{{ctEntry(old, stale), ctEntry(seq, right)}} }, false, right, nil},
		{"late-error-then-right", func(old, seq uint32) [][][]byte {
			return [][][]byte{{nlErr(old, unix.EPERM), ctEntry(seq, right)}}
		}, false, right, nil},
		{"ack-then-right", func(old, seq uint32) [][][]byte { return [][][]byte{{nlErr(seq, 0)}, {ctEntry(seq, right)}} }, true, right, nil},
		{"late-then-enoent", func(old, seq uint32) [][][]byte {
			return [][][]byte{{ctEntry(old, stale), nlErr(seq, unix.ENOENT)}}
		}, true, netip.AddrPort{}, ErrNoConntrack},
		{"late-only", func(old, seq uint32) [][][]byte { return nil }, true, netip.AddrPort{}, ErrConntrackTimeout},
		{"late-and-other-seq-only", func(old, seq uint32) [][][]byte {
			return [][][]byte{{ctEntry(old, stale), ctEntry(seq+1, stale), ctEntry(seq-2, stale)}}
		}, true, netip.AddrPort{}, ErrConntrackTimeout},
	} {
		t.Run(c.name, func(t *testing.T) {
			ct, kernel := fakeCtSocket(t)
			old := timedOut(ct, kernel)
			if c.late {
				writeDgram(t, kernel, ctEntry(old, stale)) // the kernel's answer, late
			}
			ch := lookup(ct)
			seq := readRequest(t, kernel)
			if seq == old {
				t.Fatalf("second lookup reuses sequence number %d", seq)
			}
			for _, d := range c.answer(old, seq) {
				writeDgram(t, kernel, d...)
			}
			r := wait(ch)
			if r.src == stale {
				t.Fatalf("second lookup took the late answer of the first: %s", r.src)
			}
			if c.wantErr != nil {
				if !errors.Is(r.err, c.wantErr) {
					t.Fatalf("got %s, %v; want %v", r.src, r.err, c.wantErr)
				}
				return
			}
			if r.err != nil || r.src != c.want {
				t.Fatalf("got %s, %v; want %s", r.src, r.err, c.want)
			}
		})
	}
}
