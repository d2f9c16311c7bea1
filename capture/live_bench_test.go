package capture

import (
	"context"
	"io"
	"net"
	"os"
	"strconv"
	"testing"
	"time"

	"egressd/internal/testnet"
	"egressd/policy"
)

// BenchmarkLiveBulk pushes bulk TCP (8 parallel connections, 256 MiB per
// iteration, at most 30 s) across a veth pair between two test namespaces
// while capture reads the gateway side through AF_PACKET, and reports the
// throughput, the packets capture saw and the kernel's drop counter for the
// capture socket, which must stay at zero.
func BenchmarkLiveBulk(b *testing.B) {
	testnet.RequireRoot(b)
	cli := testnet.New(b, "capbc")
	gw := testnet.New(b, "capbg")
	testnet.Link(b, cli, "lan0", []string{"198.18.1.2/24"}, gw, "lan1", []string{"198.18.1.1/24"})
	ln, err := gw.Listen("tcp", "198.18.1.1:5001")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	const perIter = 256 << 20
	const conns = 8
	go func() {
		buf := make([]byte, 256<<10)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(30 * time.Second))
				for sent := 0; sent < perIter/conns; sent += len(buf) {
					if _, err := c.Write(buf); err != nil {
						return
					}
				}
			}()
		}
	}()
	c, err := New(Config{Interface: "lan1", RingMB: ringMB()}, Deps{Policy: policy.NewStore(testEngine(b, testPolicy))})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	if err := gw.Do(c.Open); err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- c.Run(ctx) }()
	b.SetBytes(perIter)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		done := make(chan int64, conns)
		for j := 0; j < conns; j++ {
			go func() {
				dctx, dcancel := context.WithTimeout(context.Background(), 30*time.Second)
				defer dcancel()
				conn, err := cli.DialContext(dctx, "tcp", "198.18.1.1:5001")
				if err != nil {
					done <- 0
					return
				}
				defer conn.Close()
				conn.(*net.TCPConn).SetDeadline(time.Now().Add(30 * time.Second))
				n, _ := io.Copy(io.Discard, conn)
				done <- n
			}()
		}
		var got int64
		for j := 0; j < conns; j++ {
			got += <-done
		}
		if got < perIter {
			b.Fatalf("moved %d of %d bytes", got, perIter)
		}
	}
	b.StopTimer()
	time.Sleep(200 * time.Millisecond)
	cancel()
	if err := <-errc; err != nil {
		b.Fatal(err)
	}
	s := c.Stats()
	b.ReportMetric(float64(s.Packets), "captured-pkts")
	b.ReportMetric(float64(s.KernelDrops), "kernel-drops")
	b.ReportMetric(float64(s.KernelDrops)/float64(s.Packets+s.KernelDrops)*100, "drop-%")
}

// ringMB is the ring size for BenchmarkLiveBulk: CAPTURE_RING_MB, else the
// default.
func ringMB() int {
	n, _ := strconv.Atoi(os.Getenv("CAPTURE_RING_MB"))
	return n
}
