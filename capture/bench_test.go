package capture

import (
	"context"
	"net/netip"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"github.com/gopacket/gopacket/pcapgo"

	"egressd/audit"
	"egressd/policy"
)

type benchFrame struct {
	ts   time.Time
	data []byte
}

// benchTraffic builds a LAN's worth of traffic: flows TCP connections
// (handshake, a real ClientHello, 20 data segments each way, FIN) from 250
// clients to 1000 servers, interleaved 64 at a time, plus a DNS exchange
// per connection. About 48 frames per connection.
func benchTraffic(tb testing.TB, flows int) []benchFrame {
	tb.Helper()
	hello := realClientHello(tb, "bench.allowed.test")
	var frames []benchFrame
	now := time.Date(2026, 11, 24, 10, 0, 0, 0, time.UTC)
	opts := gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}
	emit := func(fromClient bool, ls ...gopacket.SerializableLayer) {
		src, dst := macClient, macGW
		if !fromClient {
			src, dst = dst, src
		}
		buf := gopacket.NewSerializeBuffer()
		all := append([]gopacket.SerializableLayer{&layers.Ethernet{SrcMAC: src, DstMAC: dst, EthernetType: layers.EthernetTypeIPv4}}, ls...)
		if err := gopacket.SerializeLayers(buf, opts, all...); err != nil {
			tb.Fatal(err)
		}
		now = now.Add(10 * time.Microsecond)
		frames = append(frames, benchFrame{now, append([]byte(nil), buf.Bytes()...)})
	}
	data := make([]byte, 1400)
	const batch = 64
	for base := 0; base < flows; base += batch {
		type st struct {
			cli, srv   netip.Addr
			cport      uint16
			cseq, sseq uint32
		}
		var conns []*st
		for i := base; i < base+batch && i < flows; i++ {
			conns = append(conns, &st{
				cli:   netip.AddrFrom4([4]byte{192, 0, 2, byte(i % 250)}),
				srv:   netip.AddrFrom4([4]byte{203, 0, 113, byte(i % 1000 / 4)}),
				cport: uint16(20000 + i%40000), cseq: uint32(i * 7919), sseq: uint32(i * 104729),
			})
		}
		seg := func(c *st, fromClient bool, syn, ack, fin bool, payload []byte) {
			src, dst, sp, dp, seq, an := c.cli, c.srv, c.cport, uint16(443), c.cseq, c.sseq
			if !fromClient {
				src, dst, sp, dp, seq, an = dst, src, dp, sp, c.sseq, c.cseq
			}
			ip := &layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolTCP, SrcIP: src.AsSlice(), DstIP: dst.AsSlice()}
			t := &layers.TCP{SrcPort: layers.TCPPort(sp), DstPort: layers.TCPPort(dp), Seq: seq, Ack: an, SYN: syn, ACK: ack, FIN: fin, Window: 65535}
			t.SetNetworkLayerForChecksum(ip)
			emit(fromClient, ip, t, gopacket.Payload(payload))
			n := uint32(len(payload))
			if syn || fin {
				n++
			}
			if fromClient {
				c.cseq += n
			} else {
				c.sseq += n
			}
		}
		for _, c := range conns { // DNS lookup first
			res := netip.MustParseAddr("198.51.100.53")
			q := &layers.UDP{SrcPort: layers.UDPPort(c.cport), DstPort: 53}
			ip := &layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolUDP, SrcIP: c.cli.AsSlice(), DstIP: res.AsSlice()}
			q.SetNetworkLayerForChecksum(ip)
			emit(true, ip, q, gopacket.Payload(dnsQuery(tb, "bench.allowed.test")))
			r := &layers.UDP{SrcPort: 53, DstPort: layers.UDPPort(c.cport)}
			ip2 := &layers.IPv4{Version: 4, TTL: 64, Protocol: layers.IPProtocolUDP, SrcIP: res.AsSlice(), DstIP: c.cli.AsSlice()}
			r.SetNetworkLayerForChecksum(ip2)
			emit(false, ip2, r, gopacket.Payload(dnsResponse(tb, "bench.allowed.test", []netip.Addr{c.srv})))
		}
		for _, c := range conns {
			seg(c, true, true, false, false, nil)
		}
		for _, c := range conns {
			seg(c, false, true, true, false, nil)
			seg(c, true, false, true, false, nil)
		}
		for _, c := range conns {
			seg(c, true, false, true, false, hello[:1200])
			seg(c, true, false, true, false, hello[1200:])
		}
		for r := 0; r < 20; r++ {
			for _, c := range conns {
				seg(c, false, false, true, false, data)
				seg(c, true, false, true, false, data[:100])
			}
		}
		for _, c := range conns {
			seg(c, true, false, true, true, nil)
			seg(c, false, false, true, true, nil)
			seg(c, true, false, true, false, nil)
		}
	}
	return frames
}

// BenchmarkClassify measures the pipeline alone (decode, flows, names,
// policy, events) over frames in memory, on one core: packets per second.
func BenchmarkClassify(b *testing.B) {
	frames := benchTraffic(b, 2048)
	eng := testEngine(b, testPolicy)
	c, err := New(Config{}, Deps{Policy: policy.NewStore(eng), Sink: &recorder{}})
	if err != nil {
		b.Fatal(err)
	}
	rec := &countSink{}
	c.deps.Sink = rec
	b.ReportAllocs()
	b.ResetTimer()
	cpu0 := cpuTime()
	pkts := 0
	shift := time.Duration(0)
	for i := 0; i < b.N; i++ {
		fr := frames[i%len(frames)]
		if i%len(frames) == 0 && i > 0 {
			shift += time.Hour // a new round: earlier flows have ended
		}
		c.proc.packet(fr.data, fr.ts.Add(shift), layers.LinkTypeEthernet)
		pkts++
	}
	b.StopTimer()
	b.ReportMetric(float64(pkts)/b.Elapsed().Seconds(), "pkts/s")
	// The box may be shared: packets per second of CPU time used by the
	// process (this goroutine and the GC) is the per-core figure.
	b.ReportMetric(float64(pkts)/(cpuTime()-cpu0).Seconds(), "pkts/cpu-s")
	if s := c.Stats(); s.Malformed != 0 || (b.N >= len(frames) && s.Hellos == 0) {
		b.Fatalf("stats %+v", s)
	}
}

// BenchmarkReadFile measures the offline audit path end to end: pcapgo
// reading a file, then the pipeline.
func BenchmarkReadFile(b *testing.B) {
	frames := benchTraffic(b, 2048)
	path := filepath.Join(b.TempDir(), "bench.pcap")
	f, err := os.Create(path)
	if err != nil {
		b.Fatal(err)
	}
	w := pcapgo.NewWriter(f)
	w.WriteFileHeader(65536, layers.LinkTypeEthernet)
	for _, fr := range frames {
		w.WritePacket(gopacket.CaptureInfo{Timestamp: fr.ts, CaptureLength: len(fr.data), Length: len(fr.data)}, fr.data)
	}
	f.Close()
	eng := testEngine(b, testPolicy)
	b.ReportAllocs()
	b.ResetTimer()
	cpu0 := cpuTime()
	pkts := uint64(0)
	for i := 0; i < b.N; i++ {
		c, err := New(Config{}, Deps{Policy: policy.NewStore(eng), Sink: &countSink{}})
		if err != nil {
			b.Fatal(err)
		}
		s, err := c.ReadFile(context.Background(), path, nil)
		if err != nil || s.Flows == 0 {
			b.Fatalf("%v %+v", err, s)
		}
		pkts += s.Packets
	}
	b.StopTimer()
	b.ReportMetric(float64(pkts)/b.Elapsed().Seconds(), "pkts/s")
	b.ReportMetric(float64(pkts)/(cpuTime()-cpu0).Seconds(), "pkts/cpu-s")
	b.ReportMetric(float64(len(frames)), "pkts/file")
}

// countSink counts events (a sink that keeps nothing, like a ledger would
// aggregate).
type countSink struct{ n int }

func (s *countSink) Emit(audit.Event) { s.n++ }

// cpuTime is the process's user plus system CPU time.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
