package capture

import (
	"sync"
	"testing"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/afpacket"
)

// lateBlockSource is a socket in memory whose first read finds the ring
// empty, and whose later reads hand over a connection's frames the kernel
// stamped before that look (back by early, a millisecond apart): a
// TPACKET_V3 block the kernel had not handed over yet, up to its block
// timeout.
type lateBlockSource struct {
	frames []benchFrame
	early  time.Duration
	look   time.Time
	i      int
	done   chan struct{}
	once   sync.Once
}

func (s *lateBlockSource) ZeroCopyReadPacketData() ([]byte, gopacket.CaptureInfo, error) {
	if s.look.IsZero() {
		s.look = time.Now()
		return nil, gopacket.CaptureInfo{}, afpacket.ErrTimeout
	}
	if s.i >= len(s.frames) {
		s.once.Do(func() { close(s.done) })
		return nil, gopacket.CaptureInfo{}, afpacket.ErrTimeout
	}
	fr := s.frames[s.i]
	ts := s.stamp(s.i)
	s.i++
	return fr.data, gopacket.CaptureInfo{Timestamp: ts, CaptureLength: len(fr.data), Length: len(fr.data)}, nil
}

// stamp is frame i's kernel stamp.
func (s *lateBlockSource) stamp(i int) time.Time {
	return s.look.Add(-s.early + time.Duration(i)*time.Millisecond)
}

func (s *lateBlockSource) KernelDrops() (uint64, error) { return 0, nil }
func (s *lateBlockSource) Close()                       {}

// TestRunIdleLookLateBlock: a look at the ring that finds no packet does
// not mean the kernel handed over every packet it took before: a
// TPACKET_V3 block is handed over when full or at its timeout (64 ms by
// default). Run lets packet time go on to the clock when the ring looks
// empty, so idle flows end; a connection whose frames the kernel stamped
// 64 ms before that look, and handed over after it, still starts at its
// SYN's stamp and lasts to its second FIN's (not from the look, with no
// duration).
func TestRunIdleLookLateBlock(t *testing.T) {
	p := newPcap(t)
	c := synthConn(p, 47610, 443, 1000)
	c.handshake()
	c.send(true, realClientHello(t, decoyName), 1400, nil, nil)
	c.close()
	frames := readFrames(t, p.close())
	const early = 64 * time.Millisecond
	if time.Duration(len(frames))*time.Millisecond >= early {
		t.Fatalf("%d frames: they do not fit before the look", len(frames))
	}

	src := &lateBlockSource{frames: frames, early: early, done: make(chan struct{})}
	rec, stop := runOn(t, Config{}, src)
	select {
	case <-src.done:
	case <-time.After(10 * time.Second):
		t.Fatalf("Run did not read %d frames in 10 s", len(frames))
	}
	stop()
	// The flow ends at the second FIN (the last ACK comes after its event).
	first, last := src.stamp(0), src.stamp(len(frames)-2)
	n := 0
	for _, ev := range rec.all() {
		if ev.ClientPort != 47610 {
			continue
		}
		n++
		if !ev.Time.Equal(first) {
			t.Errorf("flow starts %s, want its SYN's stamp %s (%v late)", ev.Time, first, ev.Time.Sub(first))
		}
		if want := last.Sub(first).Seconds(); ev.Duration != want {
			t.Errorf("flow lasts %v s, want %v s (its packets' stamps)", ev.Duration, want)
		}
	}
	if n != 1 {
		t.Errorf("%d events of the flow, want 1: %+v", n, rec.all())
	}
}

// TestRunIdleEndsLateBlock: with packet time held ringLag behind the
// clock when the ring looks empty, an idle link still ends its flows: a
// datagram handed over late (stamped 64 ms before the look) ends as idle,
// UDPIdle later, at the next sweep (5 s of packet time), by Run's clock
// alone; its event starts at its stamp, with no duration.
func TestRunIdleEndsLateBlock(t *testing.T) {
	p := newPcap(t)
	p.udp(true, synthCli, synthSrv, 40123, 123, []byte("ntp"))
	frames := readFrames(t, p.close())

	src := &lateBlockSource{frames: frames, early: 64 * time.Millisecond, done: make(chan struct{})}
	rec, stop := runOn(t, Config{UDPIdle: time.Second}, src)
	var got []int
	deadline := time.Now().Add(20 * time.Second)
	for {
		got = got[:0]
		for i, ev := range rec.all() {
			if ev.ClientPort == 40123 {
				got = append(got, i)
			}
		}
		if len(got) > 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	stop()
	all := rec.all()
	if len(got) != 1 {
		t.Fatalf("%d events of the datagram's flow in 20 s of an idle ring, want 1 (ended idle); all events, with the shutdown's: %+v", len(got), all)
	}
	ev := all[got[0]]
	if ev.Close != "idle" {
		t.Errorf("flow closed %q, want idle: %+v", ev.Close, ev)
	}
	if first := src.stamp(0); !ev.Time.Equal(first) || ev.Duration != 0 {
		t.Errorf("flow starts %s and lasts %v s, want its datagram's stamp %s and 0 s", ev.Time, ev.Duration, first)
	}
}
