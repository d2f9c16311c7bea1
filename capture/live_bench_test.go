package capture

import (
	"context"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"testing"
	"time"

	"egressd/internal/testnet"
	"egressd/policy"
)

// BenchmarkLiveBulk pushes bulk TCP (8 parallel connections, 256 MiB per
// iteration, each connection bounded to 30 s) through a gateway namespace
// that routes between a LAN namespace and a WAN namespace, while capture
// reads the gateway's LAN interface through AF_PACKET, as egressd does. It
// reports the throughput, the packets capture saw and the kernel's drop
// counter for the capture socket (tpacket stats), which must stay at zero.
//
//	down: the WAN server sends, the LAN client receives (a download)
//	up:   the LAN client sends, the WAN server receives (an upload)
//
// CAPTURE_RING_MB sizes the ring (default: Config's); CAPTURE_FULL_FRAMES=1
// turns the snap filter off (whole frames in the ring).
func BenchmarkLiveBulk(b *testing.B) {
	testnet.RequireRoot(b)
	for _, dir := range []string{"down", "up"} {
		b.Run(dir, func(b *testing.B) { liveBulk(b, dir == "up") })
	}
}

func liveBulk(b *testing.B, upload bool) {
	cli := testnet.New(b, "capbc")
	gw := testnet.New(b, "capbg")
	srv := testnet.New(b, "capbs")
	testnet.Link(b, cli, "lan0", []string{"198.18.1.2/24"}, gw, "lan1", []string{"198.18.1.1/24"})
	testnet.Link(b, gw, "wan1", []string{"198.18.2.1/24"}, srv, "wan0", []string{"198.18.2.2/24"})
	gw.MustRun("sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
	cli.MustRun("ip", "route", "add", "default", "via", "198.18.1.1")
	srv.MustRun("ip", "route", "add", "default", "via", "198.18.2.1")

	ln, err := srv.Listen("tcp", "198.18.2.2:5001")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	const perIter = 256 << 20
	const conns = 8
	// pump moves perIter/conns bytes: the sender writes, the receiver
	// drains to EOF and returns what it read.
	send := func(c net.Conn) {
		buf := make([]byte, 256<<10)
		for sent := 0; sent < perIter/conns; sent += len(buf) {
			if _, err := c.Write(buf); err != nil {
				return
			}
		}
		c.(*net.TCPConn).CloseWrite()
	}
	recv := func(c net.Conn) int64 {
		n, _ := io.Copy(io.Discard, c)
		return n
	}
	got := make(chan int64, conns)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(30 * time.Second))
				if upload {
					got <- recv(c)
				} else {
					send(c)
					io.Copy(io.Discard, c) // until the client closes
				}
			}()
		}
	}()

	rec := &recorder{}
	c := startLive(b, gw, Config{Interfaces: []string{"lan1"}, OwnAddrs: []netip.Addr{}, RingMB: ringMB(), FullFrames: os.Getenv("CAPTURE_FULL_FRAMES") != ""},
		Deps{Policy: policy.NewStore(testEngine(b, testPolicy)), Sink: rec})
	b.SetBytes(perIter)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for j := 0; j < conns; j++ {
			go func() {
				dctx, dcancel := context.WithTimeout(context.Background(), 30*time.Second)
				defer dcancel()
				conn, err := cli.DialContext(dctx, "tcp", "198.18.2.2:5001")
				if err != nil {
					got <- 0
					return
				}
				defer conn.Close()
				conn.SetDeadline(time.Now().Add(30 * time.Second))
				if upload {
					send(conn)
					io.Copy(io.Discard, conn) // until the server closes
				} else {
					got <- recv(conn)
				}
			}()
		}
		var moved int64
		for j := 0; j < conns; j++ {
			moved += <-got
		}
		if moved < perIter {
			b.Fatalf("moved %d of %d bytes", moved, perIter)
		}
	}
	b.StopTimer()
	time.Sleep(200 * time.Millisecond) // TPACKET_V3 hands blocks over after their timeout
	if err := c.stop(); err != nil {
		b.Fatal(err)
	}
	s := c.Stats()
	b.ReportMetric(float64(s.Packets), "captured-pkts")
	b.ReportMetric(float64(s.Bytes)/float64(s.Packets), "wire-bytes/pkt")
	b.ReportMetric(float64(s.CapturedBytes)/float64(s.Packets), "ring-bytes/pkt")
	b.ReportMetric(float64(s.Snapped)/float64(s.Packets)*100, "snapped-%")
	b.ReportMetric(float64(s.KernelDrops), "kernel-drops")
	b.ReportMetric(float64(s.KernelDrops)/float64(s.Packets+s.KernelDrops)*100, "drop-%")
	// The bulk bytes capture credited to the flows are at least the bytes
	// moved, however the frames were cut (when the kernel dropped none);
	// TCP retransmissions are on the wire too and count.
	var flows, bulk uint64
	for _, ev := range rec.all() {
		if ev.DestPort == 5001 {
			flows++
			bulk += ev.BytesIn + ev.BytesOut
		}
	}
	if flows != uint64(conns*b.N) {
		b.Errorf("capture reported %d bulk flows, want %d", flows, conns*b.N)
	}
	want := uint64(perIter) * uint64(b.N)
	if s.KernelDrops == 0 && bulk < want {
		b.Errorf("capture counted %d bulk bytes, want at least the %d moved", bulk, want)
	}
	b.ReportMetric(float64(bulk)/float64(want), "counted/moved")
}

// ringMB is the ring size for BenchmarkLiveBulk: CAPTURE_RING_MB, else the
// default.
func ringMB() int {
	n, _ := strconv.Atoi(os.Getenv("CAPTURE_RING_MB"))
	return n
}
