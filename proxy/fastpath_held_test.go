package proxy

import (
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"
)

// TestFastPathHeldPacketsBounded: one client's partial hellos must not
// fill the kernel's queue. Every fast connection of the client sends the
// start of a TLS record one byte per segment (TCP_NODELAY, as a slow or
// hostile client does) and stops; the fast path holds each segment, and
// the client's kernel retransmits them, until the hello deadline. Held
// without a bound they fill the queue (nfq.DefaultMaxLen, 4096 packets),
// and the kernel then drops every queued packet, the SYNs of every other
// client's new TLS connections to the fast ports included (no
// fail-open): one device stops the LAN's HTTPS. Another client's
// connection must still be made and go by the fast path.
func TestFastPathHeldPacketsBounded(t *testing.T) {
	tp := newTopo(t, topoOpts{fastQueue: 3302, config: func(c *Config) {
		c.FirstByteWait = 5 * time.Second
		c.HelloTimeout = 30 * time.Second // the partial hellos stay held through the test
	}})
	tp.facts.add(clientV4, srvV4, "www.allowed.test")
	tp.facts.add(client2V4, srvV4, "www.allowed.test")
	dest := netip.AddrPortFrom(srvV4, 443)

	const conns, bytesEach = 600, 10 // 6,000 segments and more, under MaxConnsPerClient
	for n := range conns {
		var c *net.TCPConn
		err := tp.c.Do(func() error {
			d := net.Dialer{Timeout: 5 * time.Second, LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(clientV4, 0))}
			nc, err := d.Dial("tcp", dest.String())
			if err == nil {
				c = nc.(*net.TCPConn)
			}
			return err
		})
		if err != nil {
			// The queue is full already: the client's own SYNs are dropped.
			t.Logf("the attacking client's connection %d: %v", n, err)
			break
		}
		t.Cleanup(func() { c.Close() })
		c.SetNoDelay(true)
		for i := range bytesEach {
			if _, err := c.Write([]byte{[]byte("\x16\x03\x01\x40\x00\x01\x00\x3f\xfc\x03")[i]}); err != nil {
				break // refused (reset): the client is over a bound
			}
		}
	}
	// The segments and their retransmissions reach the queue.
	time.Sleep(time.Second)

	fast := fastSYNs(tp.proxy, "fast")
	c := tp.dialAtFirstWriteFrom(t, client2V4, dest) // t.Fatal if its SYNs are all dropped (5 s)
	body, err := tp.tlsGet(c, "www.allowed.test", "/other-client", nil)
	if err != nil || !strings.Contains(body, "sni=www.allowed.test") {
		t.Fatalf("another client's GET while one client holds %d partial hellos: %q, %v", conns, body, err)
	}
	if got := fastSYNs(tp.proxy, "fast") - fast; got != 1 {
		t.Errorf("fast_syns_total{result=fast} rose by %v for the other client, want 1", got)
	}
}
