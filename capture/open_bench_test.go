package capture

import (
	"net/netip"
	"testing"
	"time"

	"github.com/gopacket/gopacket/layers"

	"egressd/policy"
)

// BenchmarkAnswerOpen is what a live report costs capture's Run goroutine
// (which reads no packet meanwhile) with its flow table full: 65536 UDP
// flows open, NTP-like, none reported yet, each decided by address on a
// copy (undecided for the 10 s after it began).
func BenchmarkAnswerOpen(b *testing.B) {
	const n = 65536
	capt, err := New(Config{}, Deps{Policy: policy.NewStore(testEngine(b, testPolicy)), Sink: &recorder{}})
	if err != nil {
		b.Fatal(err)
	}
	p := capt.proc
	now := time.Date(2026, 12, 5, 10, 0, 0, 0, time.UTC)
	for i := range n {
		cli := netip.AddrPortFrom(netip.AddrFrom4([4]byte{192, 0, 2, byte(i % 250)}), uint16(1024+i/250))
		srv := netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 51, 100, byte(i % 200)}), 123)
		p.packet(udpFrame(b, macClient, macGW, cli, srv, make([]byte, 48)), now, layers.LinkTypeEthernet)
	}
	if got := len(openNow(p)); got != n {
		b.Fatalf("%d open flows, want %d", got, n)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		openNow(p)
	}
}
