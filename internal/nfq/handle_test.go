package nfq

import (
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// TestNoAllocs: the per-packet path allocates nothing: a packet message
// handed to the callback, a verdict with and without a mark.
func TestNoAllocs(t *testing.T) {
	tp := newTopo(t)
	c := tp.open(t, Config{Queue: 30})
	if n := testing.AllocsPerRun(100, func() { c.Verdict(123456, Accept); c.VerdictMark(123456, Repeat, 7) }); n != 0 {
		t.Errorf("verdicts: %v allocations", n)
	}
	pkt, _ := BuildTCP(c4, s4, 1, 2, ACK, []byte("data"))
	msg := c.message(msgPacket, 0, 0, append(attr(attrPacketHdr, []byte{0, 0, 0, 9, 8, 0, 1}), attr(attrPayload, pkt)...))
	var p Packet
	var got uint32
	fn := func(p Packet) {
		if seg, err := ParseTCP(p.Data); err == nil && string(seg.Payload) == "data" {
			got = p.ID
		}
	}
	if n := testing.AllocsPerRun(100, func() { c.handle(msg, &p, fn) }); n != 0 {
		t.Errorf("handle: %v allocations", n)
	}
	if got != 9 || p.Proto != unix.ETH_P_IP || p.Hook != 1 {
		t.Errorf("handled %+v, id %d", p, got)
	}
}

// FuzzHandle: the netlink messages Serve reads, however malformed, never
// make it panic, and a packet it hands over lies inside the message.
func FuzzHandle(f *testing.F) {
	c := &Conn{queue: 1}
	pkt, _ := BuildTCP(c4, s4, 1, 2, ACK, []byte("data"))
	f.Add(c.message(msgPacket, 0, 0, append(attr(attrPacketHdr, []byte{0, 0, 0, 9, 8, 0, 1}), attr(attrPayload, pkt)...)))
	f.Add(c.message(msgPacket, 0, 0, append(attr(attrMark, []byte{0, 0, 0, 1}), attr(attrInDev, []byte{0, 0, 0, 2})...)))
	f.Fuzz(func(t *testing.T, b []byte) {
		var p Packet
		c.handle(b, &p, func(p Packet) {
			if len(p.Data) == 0 {
				return
			}
			start := uintptr(unsafe.Pointer(&p.Data[0])) - uintptr(unsafe.Pointer(&b[0]))
			if start >= uintptr(len(b)) || start+uintptr(len(p.Data)) > uintptr(len(b)) {
				t.Fatal("data outside the message")
			}
		})
	})
}
