package capture

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/afpacket"

	"egressd/internal/testnet"
	"egressd/policy"
)

// scriptSource is a capture socket, safe for concurrent use, that hands
// out the frames pushed to it, then nothing (the ring's timeout), or the
// error it was told to fail with.
type scriptSource struct {
	mu     sync.Mutex
	frames [][]byte
	err    error
	closed bool
}

func (s *scriptSource) push(frame []byte) {
	s.mu.Lock()
	s.frames = append(s.frames, frame)
	s.mu.Unlock()
}

func (s *scriptSource) fail(err error) {
	s.mu.Lock()
	s.err = err
	s.mu.Unlock()
}

func (s *scriptSource) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

func (s *scriptSource) ZeroCopyReadPacketData() ([]byte, gopacket.CaptureInfo, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.frames) > 0 {
		b := s.frames[0]
		s.frames = s.frames[1:]
		return b, gopacket.CaptureInfo{Timestamp: time.Now(), CaptureLength: len(b), Length: len(b)}, nil
	}
	if s.err != nil {
		return nil, gopacket.CaptureInfo{}, s.err
	}
	return nil, gopacket.CaptureInfo{}, afpacket.ErrTimeout
}

func (s *scriptSource) KernelDrops() (uint64, error) { return 0, nil }
func (s *scriptSource) Close() {
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
}

// TestSocketReadErrorIsolated: one of two capture sockets fails to read
// (an error afpacket does not say is a timeout or a pending socket
// error). Capture closes that socket only, counts and logs it, says it
// is not listening there (NotListening: /readyz), reads the other on,
// and opens the failed one again through Follow once Changes says so;
// an open that fails is tried again after a longer wait; the new
// socket's packets are read. Before, Run returned the error and
// capture ended on every LAN interface.
func TestSocketReadErrorIsolated(t *testing.T) {
	testnet.RequireRoot(t)
	gw := testnet.New(t, "h3sfail")
	for _, n := range []string{"lana", "lanb"} {
		gw.MustRun("ip", "link", "add", n, "type", "veth", "peer", "name", n+"p")
		gw.MustRun("ip", "link", "set", n, "up")
		gw.MustRun("ip", "link", "set", n+"p", "up")
	}
	var mu sync.Mutex
	opened := map[string][]*scriptSource{}
	last := func(name string) (*scriptSource, int) {
		mu.Lock()
		defer mu.Unlock()
		l := opened[name]
		return l[len(l)-1], len(l)
	}
	logs := &lockedBuffer{}
	c, err := New(Config{Interfaces: []string{"lana", "lanb"}, OwnAddrs: []netip.Addr{}}, Deps{Policy: policy.NewStore(testEngine(t, testPolicy)), Sink: &recorder{}, Logger: slog.New(slog.NewTextHandler(logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	refuse, tries := 0, 0 // opens of lana to refuse; opens of lana asked
	c.openRingHook = func(name string) (packetSource, error) {
		mu.Lock()
		defer mu.Unlock()
		if name == "lana" {
			tries++
			if refuse > 0 {
				refuse--
				return nil, errors.New("capture test: open refused")
			}
		}
		s := &scriptSource{}
		opened[name] = append(opened[name], s)
		return s, nil
	}
	t.Cleanup(func() { c.Close() })
	if err := gw.Do(c.Open); err != nil {
		t.Fatal(err)
	}
	follow := func() bool {
		var changed bool
		gw.Do(func() error { changed = c.Follow(); return nil })
		return changed
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()

	mac, gwMAC := net.HardwareAddr{2, 0, 0, 0, 0xa, 1}, net.HardwareAddr{2, 0, 0, 0, 0xa, 0xfe}
	frame := func(port uint16) []byte {
		return udpFrame(t, mac, gwMAC, netip.AddrPortFrom(netip.MustParseAddr("198.18.21.10"), port), netip.MustParseAddrPort("198.51.100.9:9000"), []byte("ping"))
	}
	waitFor := func(what string, cond func() bool) bool {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); !cond(); {
			select {
			case err := <-done:
				t.Fatalf("%s: Run returned %v", what, err)
			default:
			}
			if time.Now().After(deadline) {
				t.Errorf("%s: not after 10s (stats %+v)", what, c.Stats())
				return false
			}
			time.Sleep(10 * time.Millisecond)
		}
		return true
	}
	a, _ := last("lana")
	b, _ := last("lanb")
	a.push(frame(40000))
	b.push(frame(40001))
	waitFor("a packet from each socket", func() bool { return c.Stats().Packets >= 2 })

	mu.Lock()
	refuse = 1 // the first reopen fails too: tried again after a longer wait
	mu.Unlock()
	a.fail(errors.New("capture test: injected read error"))
	if !waitFor("the failed socket closed", func() bool { return a.isClosed() && c.Stats().SocketErrors == 1 }) {
		t.FailNow()
	}
	if !follow() {
		t.Errorf("Follow after a socket failed reports no change")
	}
	not := c.NotListening()
	if len(not) != 1 || !strings.Contains(not[0].Error(), "read lana: capture test: injected read error") {
		t.Errorf("NotListening after lana's socket failed: %v, want lana's read error", not)
	}
	if got := strings.Join(c.Listening(), ","); got != "lanb" {
		t.Errorf("Listening after lana's socket failed: %q, want lanb", got)
	}
	b.push(frame(40002))
	waitFor("lanb's packet after lana's socket failed", func() bool { return c.Stats().Packets >= 3 })

	// Changes says when to call Follow again: the reopen is due.
	for n := 0; n < 40; n++ {
		if _, k := last("lana"); k == 2 {
			break
		}
		select {
		case <-c.Changes():
		case <-time.After(5 * time.Second):
		}
		follow()
	}
	a2, k := last("lana")
	if k != 2 {
		t.Fatalf("lana's socket opened %d times, want 2 (opened again after it failed)", k)
	}
	if not := c.NotListening(); len(not) != 0 {
		t.Errorf("NotListening after lana's socket was opened again: %v", not)
	}
	mu.Lock()
	if tries != 3 {
		t.Errorf("lana's socket asked to open %d times, want 3 (at start, refused, opened)", tries)
	}
	mu.Unlock()
	a2.push(frame(40003))
	b.push(frame(40004))
	waitFor("packets from the new socket and the other", func() bool { return c.Stats().Packets >= 5 })
	if n := c.Stats().SocketErrors; n != 1 {
		t.Errorf("SocketErrors %d, want 1", n)
	}
	out := logs.String()
	if n := strings.Count(out, "capture: reading lana failed"); n != 1 {
		t.Errorf("%d log lines say lana's socket failed, want 1:\n%s", n, out)
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Run: %v", err)
	}
}

// lockedBuffer is a log's output, written and read by several goroutines.
type lockedBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
