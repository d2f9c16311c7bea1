package dnsfilter

import (
	"encoding/binary"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// TestTCPPipelinePastLimitDeliversEveryAnswer: a client that pipelines
// more queries on one connection than the forwarder answers there
// (TCPMaxQueries) gets every answer the forwarder wrote, then a clean end
// of stream. Closing a socket with unread bytes makes the kernel send a
// RST and throw away what it had not sent yet: the client lost answers
// already written (one run read 34 of 128).
func TestTCPPipelinePastLimitDeliversEveryAnswer(t *testing.T) {
	up := newFakeUpstream(t, labZone)
	ts := startServer(t, enforcePolicy, Config{Upstreams: []string{up.Addr}}, Deps{})
	// Warm the cache so the answers come back quickly, while the client's
	// bytes beyond the limit are still unread.
	ask(t, "udp", ts.Addr, "www.allowed.test.", dns.TypeA, false)
	const sent = 300
	var buf []byte
	for i := range sent {
		q := packQuery(t, "www.allowed.test.", dns.TypeA, func(m *dns.Msg) { m.Id = uint16(i) })
		buf = binary.BigEndian.AppendUint16(buf, uint16(len(q)))
		buf = append(buf, q...)
	}
	c, err := net.Dial("tcp", ts.Addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Write(buf); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	dc := &dns.Conn{Conn: c}
	got := 0
	for {
		r, err := dc.ReadMsg()
		if err != nil {
			if !errors.Is(err, io.EOF) {
				t.Errorf("after %d answers: %v, want the end of the stream", got, err)
			}
			break
		}
		if r.Id != uint16(got) || r.Rcode != dns.RcodeSuccess || len(r.Answer) == 0 {
			t.Fatalf("answer %d: %v", got, r)
		}
		got++
	}
	if got != defaultTCPMaxQueries {
		t.Errorf("%d answers of %d pipelined queries, want %d", got, sent, defaultTCPMaxQueries)
	}
	_ = c.Close()
	waitTCPSlotsFree(t, ts)
}
