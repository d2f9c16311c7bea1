package dnsfilter

import (
	"net"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// TestUDPReadersMemory: the UDP readers' batches hold queryBufSize bytes
// a datagram. They held 64 KiB each (16 a reader: 1 MiB a reader, 4 MiB of
// egressd run's 5.5 MiB of heap at rest on two processors), for queries
// that are a few hundred bytes.
func TestUDPReadersMemory(t *testing.T) {
	before := heapInUse()
	ts := startServer(t, auditPolicy, Config{UDPReaders: 4}, Deps{})
	ask(t, "udp", ts.Addr, "a.allowed.test.", dns.TypeA, true) // every reader has started
	grown := int64(heapInUse()) - int64(before)
	t.Logf("a server with 4 UDP readers: %d KiB of heap", grown>>10)
	if limit := int64(2 << 20); grown > limit {
		t.Errorf("a server with 4 UDP readers holds %d KiB of heap, over %d KiB", grown>>10, limit>>10)
	}
}

// TestOversizedUDPQuery: a UDP query longer than queryBufSize (padded) is
// cut by the kernel and dropped, counted as malformed; one that fits is
// answered.
func TestOversizedUDPQuery(t *testing.T) {
	ts := startServer(t, auditPolicy, Config{UDPReaders: 1}, Deps{})
	send := func(pad int) (*dns.Msg, error) {
		m := new(dns.Msg)
		m.SetQuestion("a.allowed.test.", dns.TypeA)
		m.SetEdns0(1232, false)
		m.IsEdns0().Option = append(m.IsEdns0().Option, &dns.EDNS0_PADDING{Padding: make([]byte, pad)})
		b, err := m.Pack()
		if err != nil {
			return nil, err
		}
		c, err := net.Dial("udp", ts.Addr)
		if err != nil {
			return nil, err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(time.Second))
		if _, err := c.Write(b); err != nil {
			return nil, err
		}
		buf := make([]byte, 65536)
		n, err := c.Read(buf)
		if err != nil {
			return nil, err
		}
		r := new(dns.Msg)
		return r, r.Unpack(buf[:n])
	}
	if r, err := send(queryBufSize - 200); err != nil {
		t.Fatalf("a padded query within %d bytes: %v %v", queryBufSize, r, err)
	}
	malformed := counterValue(ts.m.dropped.WithLabelValues("malformed"))
	if r, err := send(queryBufSize); err == nil {
		t.Errorf("a query over %d bytes was answered: %v", queryBufSize, r)
	}
	if got := counterValue(ts.m.dropped.WithLabelValues("malformed")) - malformed; got != 1 {
		t.Errorf("%v queries counted as malformed, want 1", got)
	}
}
