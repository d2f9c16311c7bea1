package capture

import (
	"context"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/afpacket"

	"egressd/policy"
)

// replaySource is a live socket that hands out n frames of a traffic
// sample in turn (their time stamps moved on by an hour at each pass, so
// earlier flows have ended), then nothing (the ring's timeout); done is
// closed when the last one is out. Run's goroutine only reads it.
type replaySource struct {
	frames []benchFrame
	n, i   int
	shift  time.Duration
	done   chan struct{}
	once   sync.Once
}

func (s *replaySource) ZeroCopyReadPacketData() ([]byte, gopacket.CaptureInfo, error) {
	if s.i >= s.n {
		s.once.Do(func() { close(s.done) })
		return nil, gopacket.CaptureInfo{}, afpacket.ErrTimeout
	}
	j := s.i % len(s.frames)
	if j == 0 && s.i > 0 {
		s.shift += time.Hour
	}
	s.i++
	fr := s.frames[j]
	return fr.data, gopacket.CaptureInfo{Timestamp: fr.ts.Add(s.shift), CaptureLength: len(fr.data), Length: len(fr.data)}, nil
}

func (s *replaySource) KernelDrops() (uint64, error) { return 0, nil }
func (s *replaySource) Close()                       {}

// BenchmarkLiveRun measures live capture's own loop (Run: the socket
// reads, the loop's checks and clocks) with the pipeline behind it, over
// BenchmarkClassify's traffic handed out by a socket in memory bound to
// lo: packets per second of CPU time. No root needed.
func BenchmarkLiveRun(b *testing.B) {
	frames := benchTraffic(b, 2048)
	c, err := New(Config{Interfaces: []string{"lo"}, OwnAddrs: []netip.Addr{}}, Deps{Policy: policy.NewStore(testEngine(b, testPolicy)), Sink: &countSink{}})
	if err != nil {
		b.Fatal(err)
	}
	src := &replaySource{frames: frames, n: b.N, done: make(chan struct{})}
	c.openRingHook = func(string) (packetSource, error) { return src, nil }
	if err := c.Open(); err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ran := make(chan error, 1)
	b.ReportAllocs()
	b.ResetTimer()
	cpu0 := cpuTime()
	go func() { ran <- c.Run(ctx) }()
	<-src.done
	b.StopTimer()
	cpu := cpuTime() - cpu0
	cancel()
	if err := <-ran; err != nil {
		b.Fatal(err)
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "pkts/s")
	b.ReportMetric(float64(b.N)/cpu.Seconds(), "pkts/cpu-s")
	if s := c.Stats(); s.Malformed != 0 || s.Packets != uint64(b.N) || (b.N >= len(frames) && s.Hellos == 0) {
		b.Fatalf("stats %+v", s)
	}
}
