// Command udpfloor is the floor of a Go UDP DNS responder on this machine,
// for bench/dns.sh (DNSBENCH_BIN=udpfloor's binary, SYSTEMS=egressd): it
// reads and writes the way dnsfilter's listener does (recvmmsg and sendmmsg
// through Go's netpoller, up to 16 datagrams a call) but does no other
// work: a name containing "allowed" gets one A record (198.18.0.1) made in
// place, any other REFUSED. Whatever latency it adds over unbound is the
// Go runtime's and the netpoller's, not dnsfilter's. With -raw it reads
// from a socket the netpoller never sees instead (what dnsfilter's IPv4
// listeners now do on Linux).
package main

import (
	"bytes"
	"flag"
	"fmt"
	"net"
	"os"
	"time"

	"golang.org/x/net/ipv4"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:5399", "listen address (UDP)")
	// dnsbench's other flags, accepted and ignored.
	flag.String("upstream", "", "ignored")
	flag.String("allow", "", "ignored")
	flag.Bool("no-cache", false, "ignored")
	raw := flag.Bool("raw", false, "Linux: read from a socket the netpoller never sees (blocking recvmmsg)")
	ticker := flag.Duration("ticker", 0, "also run a timer at this period, doing nothing (the forwarder has timers)")
	flag.Parse()
	if *ticker > 0 {
		go func() {
			for range time.Tick(*ticker) {
			}
		}()
	}
	serve := run
	if *raw {
		serve = runRaw
	}
	if err := serve(*listen); err != nil {
		fmt.Fprintln(os.Stderr, "udpfloor:", err)
		os.Exit(1)
	}
}

// batch is how many datagrams one recvmmsg or sendmmsg carries, as in
// dnsfilter.
const batch = 16

func run(listen string) error {
	c, err := net.ListenPacket("udp4", listen)
	if err != nil {
		return err
	}
	pc := ipv4.NewPacketConn(c)
	in := make([]ipv4.Message, batch)
	out := make([]ipv4.Message, 0, batch)
	qbuf := make([][]byte, batch)
	abuf := make([][]byte, batch)
	for i := range in {
		qbuf[i], abuf[i] = make([]byte, 1500), make([]byte, 1500)
		in[i].Buffers = [][]byte{qbuf[i]}
	}
	for {
		n, err := pc.ReadBatch(in, 0)
		if err != nil {
			return err
		}
		out = out[:0]
		for i := range n {
			if a := answer(abuf[i][:0], qbuf[i][:in[i].N]); a != nil {
				out = append(out, ipv4.Message{Buffers: [][]byte{a}, Addr: in[i].Addr})
			}
		}
		for len(out) > 0 {
			k, err := pc.WriteBatch(out, 0)
			if err != nil {
				break
			}
			out = out[k:]
		}
	}
}

// answer appends to a the response to query q: its header and question,
// then one A record or REFUSED; nil for a query it cannot read.
func answer(a, q []byte) []byte {
	if len(q) < 12 {
		return nil
	}
	p := 12
	for p < len(q) && q[p] != 0 {
		if q[p] >= 64 {
			return nil // no compression in a question
		}
		p += 1 + int(q[p])
	}
	p += 5 // root label, type, class
	if p > len(q) {
		return nil
	}
	a = append(a, q[:p]...)
	a[2] |= 0x80   // QR
	a[3] = 0x80    // RA, rcode 0
	clear(a[6:12]) // no answers, authority or additional yet
	if bytes.Contains(q[12:p], []byte("allowed")) {
		a[7] = 1
		return append(a, 0xc0, 12, 0, 1, 0, 1, 0, 0, 1, 0, 0, 4, 198, 18, 0, 1)
	}
	a[3] |= 5 // REFUSED
	return a
}
