package capture

import (
	"context"
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gopacket/gopacket"

	"egressd/policy"
)

// steadySource is a live socket that always has a packet (a ring never
// empty: Run never waits on its timer), counting the reads; its kernel
// drop counter reads drops.
type steadySource struct {
	frame []byte
	reads atomic.Int64
	drops uint64
}

func (s *steadySource) ZeroCopyReadPacketData() ([]byte, gopacket.CaptureInfo, error) {
	s.reads.Add(1)
	return s.frame, gopacket.CaptureInfo{Timestamp: time.Now(), CaptureLength: len(s.frame), Length: len(s.frame)}, nil
}

func (s *steadySource) KernelDrops() (uint64, error) { return s.drops, nil }
func (s *steadySource) Close()                       {}

// TestRunSteadyLoad: under a load that never lets the ring run dry, Run
// still takes the kernel's drop counter in (Stats.KernelDrops, within a
// second or so: Run reads the clock every statsEvery packets, not at
// each) and returns once Capture is closed (it looks between two
// packets, without the mutex).
func TestRunSteadyLoad(t *testing.T) {
	mac, gwMAC := net.HardwareAddr{2, 0, 0, 0, 0xb, 1}, net.HardwareAddr{2, 0, 0, 0, 0xb, 0xfe}
	src := &steadySource{
		frame: udpFrame(t, mac, gwMAC, netip.MustParseAddrPort("198.18.31.10:40000"), netip.MustParseAddrPort("198.51.100.9:9000"), []byte("ping")),
		drops: 7,
	}
	c, err := New(Config{Interfaces: []string{"lo"}, OwnAddrs: []netip.Addr{}}, Deps{Policy: policy.NewStore(testEngine(t, testPolicy)), Sink: &recorder{}})
	if err != nil {
		t.Fatal(err)
	}
	c.openRingHook = func(string) (packetSource, error) { return src, nil }
	if err := c.Open(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ran := make(chan error, 1)
	go func() { ran <- c.Run(ctx) }()
	deadline := time.Now().Add(10 * time.Second)
	for c.Stats().KernelDrops != 7 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if d := c.Stats().KernelDrops; d != 7 {
		t.Errorf("kernel drops %d after %d reads, want 7", d, src.reads.Load())
	}
	if c.Stats().Packets == 0 {
		t.Error("no packet taken")
	}
	c.Close()
	select {
	case err := <-ran:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		cancel()
		t.Fatalf("Run did not return after Close (%d reads)", src.reads.Load())
	}
}
