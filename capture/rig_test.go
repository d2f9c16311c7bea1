package capture

import (
	"net/netip"
	"testing"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"

	"egressd/audit"
)

// liveIP runs one frame with the IP layer ip given (its TTL, hop limit,
// options) through r's pipeline, from a LAN host or (fromGW) the gateway.
func (r *guardRig) liveIP(fromGW bool, ip gopacket.NetworkLayer, ls ...gopacket.SerializableLayer) {
	r.t.Helper()
	smac, dmac := macClient, macGW
	if fromGW {
		smac, dmac = macGW, macClient
	}
	et := layers.EthernetTypeIPv4
	if _, ok := ip.(*layers.IPv6); ok {
		et = layers.EthernetTypeIPv6
	}
	for _, l := range ls {
		switch t := l.(type) {
		case *layers.UDP:
			t.SetNetworkLayerForChecksum(ip)
		case *layers.TCP:
			t.SetNetworkLayerForChecksum(ip)
		}
	}
	all := append([]gopacket.SerializableLayer{&layers.Ethernet{SrcMAC: smac, DstMAC: dmac, EthernetType: et}, ip.(gopacket.SerializableLayer)}, ls...)
	buf := gopacket.NewSerializeBuffer()
	if err := gopacket.SerializeLayers(buf, gopacket.SerializeOptions{FixLengths: true, ComputeChecksums: true}, all...); err != nil {
		r.t.Fatal(err)
	}
	r.now = r.now.Add(time.Millisecond)
	r.c.proc.packet(buf.Bytes(), r.now, layers.LinkTypeEthernet)
}

// The client and server of the synthetic connections of the R13 tests;
// the forwarder gave the server's address out for decoyName.
var (
	synthCli = netip.MustParseAddr("192.0.2.10")
	synthSrv = netip.MustParseAddr("203.0.113.10")
)

// synthConn is a connection on p from synthCli's port cport to
// synthSrv's port sport, the client's first sequence number cseq, the
// server's 5000.
func synthConn(p *pcapWriter, cport, sport uint16, cseq uint32) *tcpConn {
	return &tcpConn{p: p, cli: synthCli, srv: synthSrv, cport: cport, sport: sport, cseq: cseq, sseq: 5000}
}

// decoyRun runs capture over p's packets with testPolicy and decoyName
// given out for synthSrv.
func decoyRun(t *testing.T, p *pcapWriter) fileResult {
	t.Helper()
	return synthRun(t, p.close(), testPolicy, factsMap{synthSrv: {decoyName}}, Config{})
}

// classifyWaitPasses writes, 11 s on, the handshake of another flow (from
// client port cport) whose packet sweeps the flows waiting.
func classifyWaitPasses(p *pcapWriter, cport uint16) {
	p.now = p.now.Add(11 * time.Second)
	synthConn(p, cport, 443, 1000).handshake()
}

// connEvents writes on one capture, for each of conns, a connection from
// client port base+i to port 443 whose client's first sequence number is
// isn, then (unless nil) what after writes, and returns the events of
// decoyRun by client port.
func connEvents(t *testing.T, base uint16, isn uint32, conns []func(c *tcpConn), after func(p *pcapWriter)) map[uint16]audit.Event {
	t.Helper()
	p := newPcap(t)
	for i, f := range conns {
		f(synthConn(p, base+uint16(i), 443, isn))
	}
	if after != nil {
		after(p)
	}
	got := map[uint16]audit.Event{}
	for _, ev := range decoyRun(t, p).events {
		got[ev.ClientPort] = ev
	}
	return got
}
