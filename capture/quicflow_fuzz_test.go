package capture

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/gopacket/gopacket/layers"

	"egressd/audit"
	"egressd/policy"
)

// quicFlowOps encodes datagrams as FuzzQUICFlow reads them: per datagram
// a byte (bit 0: from the client; bits 1-2: which of four client ports;
// bits 3-7: how long after the one before, in quarter seconds, 0 for a
// millisecond), its length (two bytes) and its bytes.
func quicFlowOps(port int, ds []quicDgram) []byte {
	var b []byte
	for _, d := range ds {
		op := byte(port&3) << 1
		if d.fromClient {
			op |= 1
		}
		b = append(b, op)
		b = binary.BigEndian.AppendUint16(b, uint16(len(d.b)))
		b = append(b, d.b...)
	}
	return b
}

// FuzzQUICFlow feeds sequences of datagrams, both ways, on up to four
// QUIC flows (192.0.2.10 ports 47000-47003 to 203.0.113.10 port 443,
// which DNS gave out for decoyName) through the whole pipeline, as a live
// capture in audit mode reads them, with time passing between them (past
// heldWait: the sweep releases kept hellos and drops unfinished
// attempts). Seeds: TestQUICNewAttempt's flows (Version Negotiation,
// Retry, several DCIDs and keys, new connections from one port),
// coalesced Initials. Invariants: no panic (not even a recovered one);
// after each datagram every flow's charge is what its buffers, keys and
// other names hold now (proc.charge), and all flows' charges add up to
// proc.streamBytes; when the flows end, streamBytes is zero (the other
// names given back too); every flow is emitted once.
func FuzzQUICFlow(f *testing.F) {
	for _, c := range newAttemptCases(f) {
		f.Add(quicFlowOps(0, c.dgrams))
	}
	// Two flows interleaved.
	cs := newAttemptCases(f)
	f.Add(append(quicFlowOps(1, cs[0].dgrams), quicFlowOps(2, cs[len(cs)-1].dgrams)...))
	// Coalesced: two client Initials of two DCIDs in one datagram, then
	// a Retry and an Initial coalesced after a Handshake-sized tail.
	hello := handHello(sniExt(decoyName))[5:]
	other := handHello(sniExt("b.allowed.test"))[5:]
	d1, d2 := []byte{1, 2, 3, 4, 5, 6, 7, 8}, []byte{9, 9, 9, 9}
	a := clientInitialV(f, quicV1, d1, nil, 0, 0, hello[:30])
	b := clientInitialV(f, quicV1, d1, nil, 1, 30, hello[30:])
	c := clientInitialV(f, quicV1, d2, nil, 0, 0, other)
	f.Add(quicFlowOps(0, []quicDgram{{true, append(append([]byte{}, a...), b...)}, {true, c}, {false, retryPacket(d2, []byte("tok"))}, {true, append(append([]byte{}, c...), a...)}}))
	f.Add(quicFlowOps(3, []quicDgram{{true, a}, {false, versionNegotiation(d1, quicV2)}, {true, clientInitialV(f, quicV2, d2, nil, 0, 0, hello)}}))
	eng, err := policy.Compile("fuzz.yaml", []byte(testPolicy))
	if err != nil {
		f.Fatal(err)
	}
	cli, srv := netip.MustParseAddr("192.0.2.10"), netip.MustParseAddr("203.0.113.10")
	f.Fuzz(func(t *testing.T, ops []byte) {
		rec := &recorder{}
		c, err := New(Config{MaxFlows: 8, MaxStreamBytes: 64 << 10}, Deps{Policy: policy.NewStore(eng), Sink: rec, DNS: factsMap{srv: {decoyName}}})
		if err != nil {
			t.Fatal(err)
		}
		p := c.proc
		now := time.Unix(1e9, 0)
		check := func(when string) {
			sum := 0
			for _, fl := range p.flows {
				held, total := fl.held, p.streamBytes
				p.charge(fl)
				if fl.held != held {
					t.Fatalf("%s: flow %d holds %d bytes, charged %d", when, fl.cport, fl.held, held)
				}
				if p.streamBytes != total {
					t.Fatalf("%s: streamBytes %d, was %d", when, p.streamBytes, total)
				}
				names := 0
				for _, o := range fl.otherNames {
					names += len(o)
				}
				if fl.held < names {
					t.Fatalf("%s: flow %d holds %d bytes of other names, charged %d in all", when, fl.cport, names, fl.held)
				}
				sum += fl.held
			}
			if sum != p.streamBytes {
				t.Fatalf("%s: flows hold %d bytes, streamBytes %d", when, sum, p.streamBytes)
			}
		}
		for i := 0; len(ops) >= 3 && i < 64; i++ {
			op, n := ops[0], int(binary.BigEndian.Uint16(ops[1:3]))
			ops = ops[3:]
			n = min(n, len(ops), 1500)
			d := ops[:n]
			ops = ops[n:]
			if step := op >> 3; step == 0 {
				now = now.Add(time.Millisecond)
			} else {
				now = now.Add(time.Duration(step) * 250 * time.Millisecond)
			}
			c, s := netip.AddrPortFrom(cli, uint16(47000+int(op>>1&3))), netip.AddrPortFrom(srv, 443)
			if op&1 != 0 {
				p.packet(udpFrame(t, macClient, macGW, c, s, d), now, layers.LinkTypeEthernet)
			} else {
				p.packet(udpFrame(t, macGW, macClient, s, c, d), now, layers.LinkTypeEthernet)
			}
			check(fmt.Sprint("after datagram ", i))
		}
		p.sweep()
		check("after the sweep")
		p.flush("end-of-capture")
		if p.streamBytes != 0 {
			t.Fatalf("the flows ended holding %d bytes", p.streamBytes)
		}
		s := c.Stats()
		flows := 0
		for _, ev := range rec.all() {
			if ev.Kind != audit.KindRequest {
				flows++
			}
		}
		if uint64(flows) != s.Flows {
			t.Fatalf("%d flow events, %d flows counted", flows, s.Flows)
		}
		if s.Panics != 0 {
			t.Fatalf("a decoder panicked (recovered): %d", s.Panics)
		}
	})
}
