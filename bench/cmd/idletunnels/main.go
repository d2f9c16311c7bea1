// Command idletunnels opens many idle TLS-looking tunnels through a
// transparent proxy, for bench/proxy-idle.sh. As "server" it accepts
// connections, answers the first bytes with one byte and then holds them;
// as "client" it opens -n connections to -target, each sending a ClientHello
// with -sni and waiting for that byte (so the tunnel is established end to
// end), prints "established N", then holds them for -hold, or until
// SIGUSR1 ends the hold early. With -echo K it then checks that K of the
// tunnels (spread over them) still carry bytes: each sends 16 bytes, the
// server echoes what comes after the first bytes, and the client reads them
// back; it prints "echo OK of K" (OK the tunnels that passed).
package main

import (
	"encoding/binary"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: idletunnels server -listen ADDR | client -target ADDR -n N -sni NAME -hold DUR")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "server":
		server(os.Args[2:])
	case "client":
		client(os.Args[2:])
	default:
		fmt.Fprintln(os.Stderr, "idletunnels: unknown mode", os.Args[1])
		os.Exit(2)
	}
}

func server(args []string) {
	fs := flag.NewFlagSet("server", flag.ExitOnError)
	listen := fs.String("listen", ":443", "listen address")
	fs.Parse(args)
	ln, err := net.Listen("tcp", *listen)
	if err != nil {
		fmt.Fprintln(os.Stderr, "idletunnels:", err)
		os.Exit(1)
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			time.Sleep(10 * time.Millisecond)
			continue
		}
		go func() {
			defer c.Close()
			buf := make([]byte, 512)
			if _, err := c.Read(buf); err != nil {
				return
			}
			c.Write([]byte{'k'})
			// Echo what follows (the -echo check; nothing else is
			// sent) through buf: io.Copy(c, c) would splice through a
			// pipe, two more descriptors a connection.
			for {
				n, err := c.Read(buf)
				if n > 0 {
					if _, err := c.Write(buf[:n]); err != nil {
						return
					}
				}
				if err != nil {
					return
				}
			}

		}()
	}
}

// hello is a minimal TLS 1.3 ClientHello record with one SNI.
func hello(sni string) []byte {
	ext := func(typ uint16, body []byte) []byte {
		b := binary.BigEndian.AppendUint16(nil, typ)
		b = binary.BigEndian.AppendUint16(b, uint16(len(body)))
		return append(b, body...)
	}
	var list []byte
	list = append(list, 0)
	list = binary.BigEndian.AppendUint16(list, uint16(len(sni)))
	list = append(list, sni...)
	var exts []byte
	exts = append(exts, ext(0, append(binary.BigEndian.AppendUint16(nil, uint16(len(list))), list...))...)
	exts = append(exts, ext(0x002b, []byte{0x02, 0x03, 0x04})...)
	exts = append(exts, ext(0x000a, []byte{0x00, 0x02, 0x00, 0x1d})...)
	ks := []byte{0x00, 0x24, 0x00, 0x1d, 0x00, 0x20}
	exts = append(exts, ext(0x0033, append(ks, make([]byte, 32)...))...)
	exts = append(exts, ext(0x000d, []byte{0x00, 0x02, 0x04, 0x03})...)
	body := []byte{0x03, 0x03}
	body = append(body, make([]byte, 32)...)
	body = append(body, 0, 0x00, 0x02, 0x13, 0x01, 0x01, 0x00)
	body = binary.BigEndian.AppendUint16(body, uint16(len(exts)))
	body = append(body, exts...)
	hs := append([]byte{0x01, byte(len(body) >> 16), byte(len(body) >> 8), byte(len(body))}, body...)
	rec := binary.BigEndian.AppendUint16([]byte{0x16, 0x03, 0x01}, uint16(len(hs)))
	return append(rec, hs...)
}

func client(args []string) {
	fs := flag.NewFlagSet("client", flag.ExitOnError)
	target := fs.String("target", "", "host:port")
	n := fs.Int("n", 10000, "tunnels to open (bounded by the descriptor limit)")
	sni := fs.String("sni", "www.allowed.test", "server name")
	hold := fs.Duration("hold", 30*time.Second, "how long to hold the tunnels")
	par := fs.Int("c", 32, "concurrent dials")
	echo := fs.Int("echo", 0, "after the hold, check that this many tunnels still carry bytes both ways")
	fs.Parse(args)
	h := hello(*sni)
	var (
		mu    sync.Mutex
		conns []net.Conn
		fails atomic.Int64
		next  atomic.Int64
		wg    sync.WaitGroup
	)
	deadline := time.Now().Add(5 * time.Minute)
	for w := 0; w < *par; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for next.Add(1) <= int64(*n) && time.Now().Before(deadline) {
				c, err := net.DialTimeout("tcp", *target, 5*time.Second)
				if err != nil {
					fails.Add(1)
					continue
				}
				c.SetDeadline(time.Now().Add(10 * time.Second))
				var b [1]byte
				if _, err := c.Write(h); err != nil {
					c.Close()
					fails.Add(1)
					continue
				}
				if _, err := io.ReadFull(c, b[:]); err != nil || b[0] != 'k' {
					c.Close()
					fails.Add(1)
					continue
				}
				c.SetDeadline(time.Time{})
				mu.Lock()
				conns = append(conns, c)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	fmt.Printf("established %d failed %d\n", len(conns), fails.Load())
	os.Stdout.Sync()
	usr1 := make(chan os.Signal, 1)
	signal.Notify(usr1, syscall.SIGUSR1)
	select {
	case <-time.After(*hold):
	case <-usr1:
	}
	if k := min(*echo, len(conns)); k > 0 {
		fmt.Printf("echo %d of %d\n", echoCheck(conns, k), k)
		os.Stdout.Sync()
	}
	for _, c := range conns {
		c.Close()
	}
}

// echoCheck sends 16 bytes on k of conns, spread over them, and reads them
// back; it returns how many came back whole.
func echoCheck(conns []net.Conn, k int) int {
	ok := 0
	for i := 0; i < k; i++ {
		c := conns[i*len(conns)/k]
		msg := []byte(fmt.Sprintf("echo%08d....", i))
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write(msg); err != nil {
			continue
		}
		got := make([]byte, len(msg))
		if _, err := io.ReadFull(c, got); err == nil && string(got) == string(msg) {
			ok++
		}
		c.SetDeadline(time.Time{})
	}
	return ok
}
