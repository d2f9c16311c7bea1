package nfq

import (
	"context"
	"net"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// benchWindow is how many datagrams the benchmarks keep in the queue at
// most: below the queue's length, so that none is dropped.
const benchWindow = 256

// benchQueue sends b.N UDP datagrams from cli to srv over the veth pair,
// each queued at srv's input hook and accepted by the reader serve starts;
// it reports the CPU time of the whole process (sender, kernel path and
// reader) per packet besides ns/op. Without serve nothing is queued: the
// path's cost without the queue.
func benchQueue(b *testing.B, q uint16, serve func(c *Conn, fn func(Packet)) (stop func())) {
	tp := newTopo(b)
	sem := make(chan struct{}, benchWindow)
	done := make(chan struct{})
	var seen, received int
	pc, err := tp.srv.ListenPacket("udp", "192.0.2.2:7002")
	if err != nil {
		b.Fatal(err)
	}
	defer pc.Close()
	if rc, err := pc.(*net.UDPConn).SyscallConn(); err == nil {
		rc.Control(func(fd uintptr) { // room for the window: none dropped
			unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 4<<20)
		})
	}
	go func() { // drain, so the socket drops nothing it need not
		buf := make([]byte, 64)
		for {
			if _, _, err := pc.ReadFrom(buf); err != nil {
				return
			}
			if serve == nil {
				<-sem
				if received++; received == b.N {
					close(done)
				}
			}
		}
	}()
	if serve != nil {
		tp.queueRule(b, unix.IPPROTO_UDP, 7002, q)
		c := tp.open(b, Config{Queue: q})
		stop := serve(c, func(p Packet) {
			if err := c.Verdict(p.ID, Accept); err != nil {
				b.Error(err)
			}
			<-sem
			if seen++; seen == b.N {
				close(done)
			}
		})
		defer stop()
	}
	uc, err := tp.cli.DialContext(context.Background(), "udp", "192.0.2.2:7002")
	if err != nil {
		b.Fatal(err)
	}
	defer uc.Close()
	msg := []byte("benchmark datagram")
	var ru0, ru1 syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru0)
	b.ReportAllocs()
	b.ResetTimer()
	for range b.N {
		sem <- struct{}{}
		if _, err := uc.Write(msg); err != nil {
			b.Fatal(err)
		}
	}
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		b.Fatalf("%d of %d packets through", max(seen, received), b.N)
	}
	b.StopTimer()
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru1)
	cpu := time.Duration(ru1.Utime.Nano()+ru1.Stime.Nano()-ru0.Utime.Nano()-ru0.Stime.Nano()) * time.Nanosecond
	b.ReportMetric(float64(cpu.Nanoseconds())/float64(b.N), "cpu-ns/pkt")
}

// BenchmarkNoQueue: the same datagrams, not queued: the path's own cost.
func BenchmarkNoQueue(b *testing.B) { benchQueue(b, 0, nil) }

// BenchmarkQueue: Serve, through the netpoller.
func BenchmarkQueue(b *testing.B) {
	benchQueue(b, 20, func(c *Conn, fn func(Packet)) func() {
		done := serve(c, fn)
		return func() { c.Close(); <-done }
	})
}

// BenchmarkQueueBlocking: the alternative Serve did not take, a reader on
// a thread of its own blocked in recvmmsg on a blocking socket (the same
// parsing and verdicts), for the comparison in the package doc.
func BenchmarkQueueBlocking(b *testing.B) {
	benchQueue(b, 21, func(c *Conn, fn func(Packet)) func() {
		if err := unix.SetNonblock(c.fd, false); err != nil {
			b.Fatal(err)
		}
		quit := make(chan struct{})
		done := make(chan struct{})
		go func() {
			defer close(done)
			bt := newBatch()
			var p Packet
			for {
				select {
				case <-quit:
					return
				default:
				}
				// Blocks (the 5 s receive timeout Open sets ends
				// it when idle); MSG_WAITFORONE: return after the first.
				r, _, e := unix.Syscall6(unix.SYS_RECVMMSG, uintptr(c.fd), uintptr(unsafe.Pointer(&bt.hdrs[0])), batchSize, 0x10000, 0, 0)
				if e != 0 {
					continue
				}
				for i := 0; i < int(r); i++ {
					c.handle(bt.msg(i), &p, fn)
				}
			}
		}()
		return func() {
			close(quit)
			unix.SetsockoptTimeval(c.fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Usec: 1000})
			<-done
		}
	})
}
