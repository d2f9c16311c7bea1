// Command tcpfloor is the floor of a transparent TCP proxy written in Go on
// this machine, for bench/proxy-cpu.sh (systems floor-goroutine,
// floor-epoll and floor-hybrid): it takes connections an nftables REDIRECT sent to it, reads
// the original destination and the first bytes, dials the destination,
// replays the bytes and splices both ways with half-closes, and does nothing
// else. Its "policy" is that the first bytes contain -allow (no parser, no
// log, no record, no limits), so whatever CPU it spends per connection is
// what the way it is written costs, not what egressd's proxy does besides.
//
// Three ways: -mode goroutine (a goroutine per connection and one more per
// direction, Go's net package and netpoller, as egressd's proxy is built),
// -mode epoll (Linux: one goroutine locked to a thread runs its own
// edge-triggered epoll over non-blocking sockets, as nginx, HAProxy and
// sniproxy are built; no net package, no goroutine per connection), and
// -mode hybrid (Linux: the goroutine way up to the replay of the first
// bytes, then both sockets are taken out of Go's netpoller and spliced by
// an epoll loop).
// All listen with TCP_DEFER_ACCEPT and splice through pipes, as egressd.
// IPv4 only (the benchmark topology's).
package main

import (
	"bytes"
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"syscall"
	"time"
)

func main() {
	portFlag := flag.Int("port", 0, "port to listen on, all IPv4 addresses (default $PROXY_PORT)")
	allow := flag.String("allow", ".allowed.test", "forward a connection only when its first bytes contain this")
	mode := flag.String("mode", "goroutine", "goroutine, epoll or hybrid")
	flag.Parse()
	port := *portFlag
	if port == 0 {
		fmt.Sscan(os.Getenv("PROXY_PORT"), &port)
	}
	if port <= 0 || port > 65535 || *allow == "" {
		fmt.Fprintln(os.Stderr, "tcpfloor: -port (or PROXY_PORT) and -allow are required")
		os.Exit(2)
	}
	var err error
	switch *mode {
	case "goroutine":
		err = serveGoroutines(port, []byte(*allow), spliceBoth)
	case "epoll":
		err = serveEpoll(port, []byte(*allow))
	case "hybrid":
		err = serveHybrid(port, []byte(*allow))
	default:
		err = fmt.Errorf("unknown -mode %q", *mode)
	}
	fmt.Fprintln(os.Stderr, "tcpfloor:", err)
	os.Exit(1)
}

// serveGoroutines accepts and forwards each connection on a goroutine of
// its own; tunnel moves the bytes once the first ones were replayed.
func serveGoroutines(port int, allow []byte, tunnel func(c, u *net.TCPConn)) error {
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) { serr = deferAccept(int(fd)) })
		if err != nil {
			return err
		}
		return serr
	}}
	ln, err := lc.Listen(context.Background(), "tcp4", fmt.Sprintf(":%d", port))
	if err != nil {
		return err
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				continue
			}
			time.Sleep(10 * time.Millisecond) // out of descriptors, say
			continue
		}
		go forward(c.(*net.TCPConn), allow, tunnel)
	}
}

func forward(c *net.TCPConn, allow []byte, tunnel func(c, u *net.TCPConn)) {
	defer c.Close()
	rc, err := c.SyscallConn()
	if err != nil {
		return
	}
	var dst netip.AddrPort
	var derr error
	if err := rc.Control(func(fd uintptr) { dst, derr = origDst(int(fd)) }); err != nil || derr != nil {
		return
	}
	buf := make([]byte, 4096)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	n, err := c.Read(buf)
	if err != nil || !bytes.Contains(buf[:n], allow) {
		return
	}
	c.SetReadDeadline(time.Time{})
	d := net.Dialer{Timeout: 5 * time.Second}
	uc, err := d.Dial("tcp4", dst.String())
	if err != nil {
		return
	}
	u := uc.(*net.TCPConn)
	defer u.Close()
	if _, err := u.Write(buf[:n]); err != nil {
		return
	}
	tunnel(c, u)
}

// spliceBoth copies both ways, each on a goroutine, with splice(2) (io.Copy
// between two TCP connections), and half-closes.
func spliceBoth(c, u *net.TCPConn) {
	done := make(chan struct{})
	go func() {
		io.Copy(c, u)
		c.CloseWrite()
		close(done)
	}()
	io.Copy(u, c)
	u.CloseWrite()
	<-done
}
