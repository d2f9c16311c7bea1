package capture

import (
	"context"
	"errors"
	"io"
	"net/netip"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/gopacket/gopacket/pcapgo"

	"egressd/policy"
)

// TestRunPacketTimes: Run times a flow by its packets' ring stamps, not by
// its clock, which it reads only every statsEvery packets while the ring
// never runs dry: the event of a connection whose packets a socket hands
// over in one go (hundreds of them, 7 s apart in the middle, a minute
// before the clock) starts at its SYN's stamp and lasts to its second
// FIN's, to the nanosecond.
func TestRunPacketTimes(t *testing.T) {
	p := newPcap(t)
	p.now = time.Now().Add(-time.Minute).Truncate(time.Microsecond) // pcap stamps are µs
	c := synthConn(p, 47600, 443, 1000)
	c.handshake()
	c.send(true, realClientHello(t, decoyName), 1400, nil, nil)
	p.now = p.now.Add(7 * time.Second)
	for range 3 * statsEvery {
		c.send(true, make([]byte, 100), 100, nil, nil)
	}
	c.close()
	frames := readFrames(t, p.close())
	// The flow ends at the second FIN (the last ACK comes after its event).
	first, last := frames[0].ts, frames[len(frames)-2].ts

	src := &replaySource{frames: frames, n: len(frames), done: make(chan struct{})}
	rec, stop := runOn(t, Config{}, src)
	select {
	case <-src.done:
	case <-time.After(10 * time.Second):
		t.Fatalf("Run did not read %d frames in 10 s", len(frames))
	}
	stop()
	n := 0
	for _, ev := range rec.all() {
		if ev.ClientPort != 47600 {
			continue
		}
		n++
		if !ev.Time.Equal(first) {
			t.Errorf("flow starts %s, want its SYN's stamp %s (%v off)", ev.Time, first, ev.Time.Sub(first))
		}
		if want := last.Sub(first).Seconds(); ev.Duration != want {
			t.Errorf("flow lasts %v s, want %v s (its packets' stamps)", ev.Duration, want)
		}
	}
	if n != 1 {
		t.Errorf("%d events of the flow, want 1: %+v", n, rec.all())
	}
}

// readFrames reads a capture file's frames with their stamps.
func readFrames(t *testing.T, path string) []benchFrame {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	r, err := pcapgo.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	var out []benchFrame
	for {
		data, ci, err := r.ReadPacketData()
		if errors.Is(err, io.EOF) {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, benchFrame{ts: ci.Timestamp, data: data})
	}
}

// runOn runs capture's Run on src, one socket on "lo" (cfg's interfaces and
// own addresses are set so), with testPolicy, until stop, which ends Run
// and fails the test on its error; rec gets the events.
func runOn(t *testing.T, cfg Config, src packetSource) (rec *recorder, stop func()) {
	t.Helper()
	rec = &recorder{}
	cfg.Interfaces, cfg.OwnAddrs = []string{"lo"}, []netip.Addr{}
	cp, err := New(cfg, Deps{Policy: policy.NewStore(testEngine(t, testPolicy)), Sink: rec})
	if err != nil {
		t.Fatal(err)
	}
	cp.openRingHook = func(string) (packetSource, error) { return src, nil }
	if err := cp.Open(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ran := make(chan error, 1)
	go func() { ran <- cp.Run(ctx) }()
	var once sync.Once
	stop = func() {
		t.Helper()
		once.Do(func() {
			cancel()
			if err := <-ran; err != nil {
				t.Fatal(err)
			}
		})
	}
	t.Cleanup(func() { cancel() })
	return rec, stop
}
