package e2e

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"github.com/gopacket/gopacket/pcapgo"
	"github.com/miekg/dns"

	"egressd/internal/testnet"
)

// TestCaptureGarbage (THREATS.md G3: "replay all pcaps plus random
// garbage at line rate; RSS stays bounded and the process does not
// crash"): the live `egressd run`, in enforce and in audit mode, reads on
// its LAN interface every frame of every real capture under
// ../shared/pcaps (addresses rewritten into the test ranges, the MACs the
// LAN link's, payloads kept), then random and mutated garbage (truncated
// headers, bad lengths and IHLs, IPv6 extension-header chains, VLAN tag
// stacks, random EtherTypes, overlapping fragments) as fast as one packet
// socket sends them, bounded in count and time. egressd must stay up (the
// same process, /metrics answering), serve a legitimate client's DNS
// query and TLS connection during and after, keep its RSS under
// garbageRSSBound, log no panic, and capture must account for every frame
// the LAN link delivered: read (packets_total) or dropped by the kernel
// (kernel_drops_total).
func TestCaptureGarbage(t *testing.T) {
	frames := replayFrames(t)
	tp := newTopo(t)
	for _, mode := range []string{"enforce", "audit"} {
		t.Run(mode, func(t *testing.T) { captureGarbage(t, tp, mode, frames) })
	}
}

// garbageRSSBound is the RSS egressd must stay under. README "Memory": at
// rest 87 MB (64 MiB of it capture's ring); what garbage can fill is
// capture's flow table (65,536 flows, 42 MB in the SYN flood), the
// fragment buffers (16 MiB), the name-search buffers (64 MiB) and the
// ledger's recent flows (11 MB), and Go lets the heap grow to twice what
// is live: 87 + 2 × 133 ≈ 353 MB; the SYN flood, which fills the flow
// table alone, measured 266 MB.
const garbageRSSBound = 384 << 10 // KiB

// Bounds of the garbage phase (E2E_GARBAGE scales the count).
const garbageDur = 6 * time.Second

func captureGarbage(t *testing.T, tp *topo, mode string, replay [][]byte) {
	d := newDaemon(t, tp, mode)
	d.start()
	defer d.stop()
	pid := d.proc.Cmd.Process.Pid
	if err := tp.legitGet(); err != nil {
		t.Fatalf("legitimate client before the garbage: %v", err)
	}
	fs, src, dst := tp.lanFrameSender(t)
	defer fs.close()

	// Watch egressd while the frames go: RSS, /metrics, and a legitimate
	// client (a DNS query, then a TLS connection) in turn.
	w := newWatcher()
	var peakKB, metricsBad atomic.Int64
	var dnsOK, dnsBad, tlsOK, tlsBad atomic.Int64
	var firstErr atomic.Value
	w.every(100*time.Millisecond, func() {
		if kb, _, _ := d.rss(); int64(kb) > peakKB.Load() {
			peakKB.Store(int64(kb))
		}
		if code, _, err := d.get("/metrics"); err != nil || code != 200 {
			metricsBad.Add(1)
		}
	})
	w.every(200*time.Millisecond, func() {
		if m, err := tp.dnsQuery(dockerName, dns.TypeA, 2*time.Second); err != nil || m.Rcode != dns.RcodeSuccess || len(m.Answer) == 0 {
			dnsBad.Add(1)
			firstErr.CompareAndSwap(nil, fmt.Sprintf("dns: %v %v", m, err))
		} else {
			dnsOK.Add(1)
		}
		if err := tp.legitGet(); err != nil {
			tlsBad.Add(1)
			firstErr.CompareAndSwap(nil, fmt.Sprintf("tls: %v", err))
		} else {
			tlsOK.Add(1)
		}
	})

	c0 := captureTotals(d)
	link0 := lanFrames(tp)
	// (a) Every frame of every real capture, once.
	var st sendTally
	start := time.Now()
	for _, f := range replay {
		st.send(fs, withMACs(f, src, dst))
	}
	replayTook := time.Since(start)
	replaySent := st.sent
	// (b) Garbage, as fast as the socket takes it.
	g := newGarbage(replay)
	n := envInt("E2E_GARBAGE", 400000)
	start = time.Now()
	for i := 0; i < n; i++ {
		if i%256 == 0 && time.Since(start) > garbageDur {
			break
		}
		st.send(fs, withMACs(g.frame(), src, dst))
	}
	garbageTook := time.Since(start)
	garbageSent := st.sent - replaySent
	if st.err != nil {
		t.Errorf("packet socket: %v", st.err)
	}
	sent := st.sent
	w.end()
	// Capture reads the ring after the burst: wait (10 s at most) until
	// every frame the gateway's LAN interface had received or sent by
	// now is read or counted as dropped by the kernel. (The link is not
	// quiet: the gateway asks for the garbage's LAN addresses. So its
	// count is taken once, and capture's is to reach it.)
	link := lanFrames(tp) - link0
	var c1 captureCounts
	for deadline := time.Now().Add(10 * time.Second); d.alive(); time.Sleep(200 * time.Millisecond) {
		c1 = captureTotals(d)
		if c1.packets-c0.packets+c1.drops-c0.drops >= float64(link) || time.Now().After(deadline) {
			break
		}
	}
	if !d.alive() {
		t.Fatalf("egressd exited under the garbage: %v\n%s", d.proc.Cmd.ProcessState, tail(d.logs(), 8192))
	}
	if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); err != nil || d.proc.Cmd.Process.Pid != pid {
		t.Fatalf("egressd's PID %d is gone: %v", pid, err)
	}
	rssKB, hwmKB, _ := d.rss()
	if hwmKB > int(peakKB.Load()) {
		peakKB.Store(int64(hwmKB))
	}
	delta := c1.sub(c0)
	t.Logf("%s mode: replayed %d of the captures' %d frames in %v; garbage %d frames in %v (%.0f/s); %d refused by the socket (%d of them too long); the LAN interface received and sent %d frames",
		mode, replaySent, len(replay), replayTook.Round(time.Millisecond), garbageSent, garbageTook.Round(time.Millisecond), float64(garbageSent)/garbageTook.Seconds(), st.refused, st.tooLong, link)
	t.Logf("%s mode: capture read %.0f packets (%.0f malformed, %.0f other-VLAN, %.0f fragments, %.0f decode panics), the kernel dropped %.0f; %s", mode, delta.packets, delta.malformed, delta.otherVLAN, delta.fragments, delta.panics, delta.drops, d.captureCounters())
	t.Logf("%s mode: RSS now %d KiB, peak %d KiB (bound %d); /metrics failed %d times; legitimate client during: DNS %d ok %d failed, TLS %d ok %d failed (first failure: %v)",
		mode, rssKB, peakKB.Load(), garbageRSSBound, metricsBad.Load(), dnsOK.Load(), dnsBad.Load(), tlsOK.Load(), tlsBad.Load(), firstErr.Load())

	if code, body, err := d.get("/metrics"); err != nil || code != 200 {
		t.Errorf("/metrics after the garbage: %d %v", code, err)
	} else if !strings.Contains(body, "egress_capture_packets_total") {
		t.Errorf("/metrics after the garbage has no capture counters")
	}
	if m, err := tp.dnsQuery(dockerName, dns.TypeA, 3*time.Second); err != nil || m.Rcode != dns.RcodeSuccess || len(m.Answer) == 0 {
		t.Errorf("legitimate DNS query after the garbage: %v %v", m, err)
	}
	if err := tp.legitGet(); err != nil {
		t.Errorf("legitimate TLS client after the garbage: %v", err)
	}
	if dnsOK.Load() == 0 || tlsOK.Load() == 0 {
		t.Errorf("the legitimate client was not served during the garbage: DNS %d ok, TLS %d ok (first failure: %v)", dnsOK.Load(), tlsOK.Load(), firstErr.Load())
	}
	if peakKB.Load() > garbageRSSBound {
		t.Errorf("egressd's RSS peaked at %d KiB, over the bound %d KiB", peakKB.Load(), garbageRSSBound)
	}
	if delta.panics != 0 {
		t.Errorf("capture recovered %.0f panics decoding the frames", delta.panics)
	}
	if logs := d.logs(); strings.Contains(logs, "panic") || strings.Contains(logs, "goroutine ") {
		t.Errorf("egressd logged a panic:\n%s", tail(logs, 8192))
	}
	// Accounting: every frame the LAN interface received or sent is read or counted as a
	// kernel drop, nothing lost silently; the garbage is counted as
	// malformed, tagged frames as other VLANs' and fragments as such.
	if got := delta.packets + delta.drops; got < float64(link) {
		t.Errorf("capture read %.0f and the kernel dropped %.0f: %.0f of the %d frames the LAN interface received and sent (%d of them the test's) are neither read nor counted",
			delta.packets, delta.drops, float64(link)-got, link, sent)
	}
	if delta.malformed == 0 || delta.malformed > delta.packets {
		t.Errorf("capture counted %.0f malformed of %.0f packets read: want some, at most all", delta.malformed, delta.packets)
	}
	if delta.otherVLAN == 0 || delta.fragments == 0 {
		t.Errorf("capture counted %.0f other-VLAN frames and %.0f fragments: the garbage's tags and fragments did not reach it", delta.otherVLAN, delta.fragments)
	}
}

// captureCounts are capture's counters on /metrics the test accounts for.
type captureCounts struct{ packets, drops, malformed, otherVLAN, fragments, panics float64 }

func captureTotals(d *daemon) captureCounts {
	return captureCounts{
		packets:   d.metric("egress_capture_packets_total"),
		drops:     d.metric("egress_capture_kernel_drops_total"),
		malformed: d.metric("egress_capture_malformed_packets_total"),
		otherVLAN: d.metric("egress_capture_other_vlan_frames_total"),
		fragments: d.metric("egress_capture_fragments_total"),
		panics:    d.metric("egress_capture_decode_panics_total"),
	}
}

func (c captureCounts) sub(o captureCounts) captureCounts {
	return captureCounts{c.packets - o.packets, c.drops - o.drops, c.malformed - o.malformed, c.otherVLAN - o.otherVLAN, c.fragments - o.fragments, c.panics - o.panics}
}

// lanFrames is how many frames the gateway's LAN interface has received
// and sent so far: every one passes capture's socket (the veth counts a
// frame received before the kernel looks at it, so those it then drops
// for an unknown EtherType or VLAN too).
func lanFrames(tp *topo) int64 {
	var n int64
	for _, c := range []string{"rx_packets", "tx_packets"} {
		out, _ := tp.gw.Run("cat", "/sys/class/net/lan0/statistics/"+c)
		v, _ := strconv.ParseInt(strings.TrimSpace(out), 10, 64)
		n += v
	}
	return n
}

// frameSender writes whole Ethernet frames out of one interface through a
// packet socket (SOCK_RAW: the frame as given, headers and all).
type frameSender struct {
	fd int
	sa *syscall.SockaddrLinklayer
}

// lanFrameSender opens a packet socket on the LAN host's eth0 and
// returns it with the MAC addresses of the LAN link: the host's (a
// frame's source) and the gateway's lan0 (its destination).
func (tp *topo) lanFrameSender(t *testing.T) (fs *frameSender, src, dst net.HardwareAddr) {
	t.Helper()
	src, err := net.ParseMAC(macOf(t, tp.lan, "eth0"))
	if err != nil {
		t.Fatal(err)
	}
	dst, err = net.ParseMAC(macOf(t, tp.gw, "lan0"))
	if err != nil {
		t.Fatal(err)
	}
	fs, err = openFrameSender(tp.lan, "eth0")
	if err != nil {
		t.Fatalf("packet socket: %v", err)
	}
	return fs, src, dst
}

// openFrameSender opens a packet socket in ns for sending out of dev.
func openFrameSender(ns *testnet.NS, dev string) (*frameSender, error) {
	fs := &frameSender{fd: -1}
	err := ns.Do(func() error {
		ifi, err := net.InterfaceByName(dev)
		if err != nil {
			return err
		}
		fs.fd, err = syscall.Socket(syscall.AF_PACKET, syscall.SOCK_RAW, 0) // sends only
		fs.sa = &syscall.SockaddrLinklayer{Ifindex: ifi.Index, Halen: 6}
		return err
	})
	return fs, err
}

func (fs *frameSender) send(frame []byte) error {
	copy(fs.sa.Addr[:6], frame[:6])
	return syscall.Sendto(fs.fd, frame, 0, fs.sa)
}

func (fs *frameSender) close() { syscall.Close(fs.fd) }

// sendTally counts frames sent, retrying a full queue (1,000 times at
// most) and counting the frames the kernel refuses.
type sendTally struct {
	sent, refused, tooLong int64
	err                    error
}

func (st *sendTally) send(fs *frameSender, frame []byte) {
	if len(frame) > 1514 {
		st.refused++
		st.tooLong++
		return
	}
	for try := 0; try < 1000; try++ {
		err := fs.send(frame)
		switch {
		case err == nil:
			st.sent++
			return
		case errors.Is(err, syscall.ENOBUFS) || errors.Is(err, syscall.EAGAIN):
			time.Sleep(100 * time.Microsecond)
		case errors.Is(err, syscall.EINVAL) || errors.Is(err, syscall.EMSGSIZE):
			st.refused++
			return
		default:
			if st.err == nil {
				st.err = err
			}
			st.refused++
			return
		}
	}
	st.refused++
}

// withMACs returns body (an Ethernet frame from its EtherType on) behind
// the destination and source MACs.
func withMACs(body []byte, src, dst net.HardwareAddr) []byte {
	f := make([]byte, 12+len(body))
	copy(f, dst)
	copy(f[6:], src)
	copy(f[12:], body)
	return f
}

// pcapsDir finds the real captures: ../shared/pcaps beside the repository
// (../../../shared/pcaps from a worktree under wt/).
func pcapsDir(t *testing.T) string {
	for _, d := range []string{"../../shared/pcaps", "../../../shared/pcaps"} {
		if _, err := os.Stat(filepath.Join(d, "SHA256SUMS")); err == nil {
			return d
		}
	}
	t.Fatalf("the real captures are missing: expected in ../../shared/pcaps, read in place")
	return ""
}

// replayFrames reads every frame of every capture file and returns each
// from its EtherType on (behind an EtherType made from the IP version
// where the link is not Ethernet), with every IP address rewritten into
// the test ranges (addrMap) and the checksums fixed to match.
func replayFrames(t *testing.T) [][]byte {
	dir := pcapsDir(t)
	var files []string
	filepath.WalkDir(dir, func(p string, e os.DirEntry, err error) error {
		if err == nil && (strings.HasSuffix(p, ".pcap") || strings.HasSuffix(p, ".pcapng")) {
			files = append(files, p)
		}
		return nil
	})
	if len(files) < 38 {
		t.Fatalf("%s holds %d capture files, want at least 38", dir, len(files))
	}
	am := addrMap{}
	var out [][]byte
	for _, name := range files {
		f, err := os.Open(name)
		if err != nil {
			t.Fatal(err)
		}
		var src interface {
			ReadPacketData() ([]byte, gopacket.CaptureInfo, error)
		}
		var link layers.LinkType
		// By the magic number, not the name: some .pcap files are pcapng.
		if r, err := pcapgo.NewReader(f); err == nil {
			src, link = r, r.LinkType()
		} else {
			f.Seek(0, io.SeekStart)
			r, err := pcapgo.NewNgReader(f, pcapgo.DefaultNgReaderOptions)
			if err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			src, link = r, r.LinkType()
		}
		for {
			data, _, err := src.ReadPacketData()
			if err == io.EOF {
				break
			}
			if err != nil {
				t.Logf("%s: %v (after %d frames)", name, err, len(out))
				break
			}
			if b := ethBody(data, link); b != nil {
				am.rewrite(b)
				out = append(out, b)
			}
		}
		f.Close()
	}
	return out
}

// ethBody returns a copy of a captured frame from its EtherType on.
func ethBody(data []byte, link layers.LinkType) []byte {
	var et uint16
	switch link {
	case layers.LinkTypeEthernet:
		if len(data) < 14 {
			return nil
		}
		return append([]byte(nil), data[12:]...)
	case layers.LinkTypeLinuxSLL:
		if len(data) < 16 {
			return nil
		}
		et, data = binary.BigEndian.Uint16(data[14:]), data[16:]
	case layers.LinkTypeNull, layers.LinkTypeLoop:
		if len(data) < 4 {
			return nil
		}
		data = data[4:]
	case layers.LinkTypeRaw, layers.LinkTypeIPv4, layers.LinkTypeIPv6, 12, 14:
	default:
		return nil
	}
	if et == 0 && len(data) > 0 {
		et = 0x0800
		if data[0]>>4 == 6 {
			et = 0x86dd
		}
	}
	return append(binary.BigEndian.AppendUint16(nil, et), data...)
}

// addrMap rewrites IP addresses into the test ranges, each address of a
// capture to one test address: private, link-local and loopback ones (the
// captures' clients) into the LAN, 198.18.1.100-199 and 2001:db8:1::1:0/112;
// the rest (servers, multicast) into 198.19.0.0/16 and 2001:db8:ff::/64,
// which no host holds.
type addrMap map[netip.Addr]netip.Addr

func (m addrMap) get(a netip.Addr) netip.Addr {
	if b, ok := m[a]; ok {
		return b
	}
	i := len(m)
	lan := a.IsPrivate() || a.IsLinkLocalUnicast() || a.IsLoopback() || a.IsUnspecified()
	var b netip.Addr
	switch {
	case a.Is4() && lan:
		b = netip.AddrFrom4([4]byte{198, 18, 1, byte(100 + i%100)})
	case a.Is4():
		b = netip.AddrFrom4([4]byte{198, 19, byte(i >> 8), byte(i)})
	case lan:
		b = netip.MustParseAddr(fmt.Sprintf("2001:db8:1::1:%x", i&0xffff))
	default:
		b = netip.MustParseAddr(fmt.Sprintf("2001:db8:ff::%x", i&0xffff))
	}
	m[a] = b
	return b
}

// rewrite rewrites the addresses of the IP header in b (from its
// EtherType on, behind any VLAN tags), in place: the IPv4 header's
// checksum is recomputed and a TCP, UDP or ICMPv6 checksum adjusted for
// the change (RFC 1624), so the payload is untouched.
func (m addrMap) rewrite(b []byte) {
	et, ip := vlanInner(b)
	switch {
	case et == 0x0800 && len(ip) >= 20:
		ihl := int(ip[0]&0xf) * 4
		old := append([]byte(nil), ip[12:20]...)
		for _, off := range []int{12, 16} {
			a := m.get(netip.AddrFrom4([4]byte(ip[off : off+4]))).As4()
			copy(ip[off:], a[:])
		}
		if ihl >= 20 && ihl <= len(ip) {
			ip[10], ip[11] = 0, 0
			binary.BigEndian.PutUint16(ip[10:], icmpChecksum(ip[:ihl]))
			if binary.BigEndian.Uint16(ip[6:])&0x1fff == 0 {
				fixL4(ip[ihl:], ip[9], old, ip[12:20])
			}
		}
	case et == 0x86dd && len(ip) >= 40:
		old := append([]byte(nil), ip[8:40]...)
		for _, off := range []int{8, 24} {
			a := m.get(netip.AddrFrom16([16]byte(ip[off : off+16]))).As16()
			copy(ip[off:], a[:])
		}
		fixL4(ip[40:], ip[6], old, ip[8:40])
	}
}

// vlanInner skips the VLAN tags of b (from its EtherType on) and returns
// the inner EtherType and what follows it.
func vlanInner(b []byte) (uint16, []byte) {
	for len(b) >= 2 {
		et := binary.BigEndian.Uint16(b)
		if (et == 0x8100 || et == 0x88a8 || et == 0x9100) && len(b) >= 6 {
			b = b[4:]
			continue
		}
		return et, b[2:]
	}
	return 0, nil
}

// fixL4 adjusts the checksum of the TCP, UDP or ICMPv6 header at seg for
// addresses changed from old to new (the pseudo-header's).
func fixL4(seg []byte, proto byte, old, cur []byte) {
	off := map[byte]int{6: 16, 17: 6, 58: 2}
	o, ok := off[proto]
	if !ok || len(seg) < o+2 {
		return
	}
	c := binary.BigEndian.Uint16(seg[o:])
	if proto == 17 && c == 0 {
		return // no checksum (IPv4)
	}
	s := uint32(^c)
	for i := 0; i+1 < len(old); i += 2 {
		s += uint32(^binary.BigEndian.Uint16(old[i:]))
		s += uint32(binary.BigEndian.Uint16(cur[i:]))
	}
	for s>>16 != 0 {
		s = s&0xffff + s>>16
	}
	binary.BigEndian.PutUint16(seg[o:], ^uint16(s))
}

// garbage makes random and mutated frames (from their EtherType on), from
// a seed logged nowhere but fixed per run of the generator's sequence.
type garbage struct {
	r      *rand.Rand
	replay [][]byte
	am     addrMap
	i      int
	buf    []byte
}

func newGarbage(replay [][]byte) *garbage {
	return &garbage{r: rand.New(rand.NewPCG(0x6734, 0x9a3b)), replay: replay, am: addrMap{}, buf: make([]byte, 0, 2048)}
}

// frame returns the next garbage frame; it is valid until the next call.
func (g *garbage) frame() []byte {
	r := g.r
	g.i++
	b := g.buf[:0]
	switch g.i % 10 {
	case 0: // a real frame cut short
		f := g.replay[r.IntN(len(g.replay))]
		b = append(b, f[:r.IntN(len(f)+1)]...)
	case 1: // a real frame with bytes flipped past the EtherType
		b = append(b, g.replay[r.IntN(len(g.replay))]...)
		for range 1 + r.IntN(8) {
			if len(b) > 2 {
				b[2+r.IntN(len(b)-2)] ^= byte(1 + r.IntN(255))
			}
		}
	case 2: // IPv4 with a bad IHL, total length, flags, protocol
		b = g.ip4(b, r.IntN(16), r.IntN(1<<16), uint16(r.IntN(1<<16)), byte(r.IntN(256)), r.IntN(120))
	case 3: // IPv4 TCP or UDP, lengths and TCP data offset random
		p := []byte{6, 17}[r.IntN(2)]
		b = g.ip4(b, 5, 20+r.IntN(100), 0, p, r.IntN(80))
		if p == 6 && len(b) > 2+20+13 {
			b[2+20+12] = byte(r.IntN(256))
		}
	case 4: // IPv6 with a chain of extension headers
		b = g.ip6Chain(b)
	case 5: // a stack of VLAN tags
		for range 1 + r.IntN(6) {
			b = binary.BigEndian.AppendUint16(b, []uint16{0x8100, 0x88a8, 0x9100}[r.IntN(3)])
			b = binary.BigEndian.AppendUint16(b, uint16(r.IntN(1<<16)))
		}
		if r.IntN(2) == 0 {
			b = g.ip4(b, 5, 0, 0, 17, 8+r.IntN(64))
		} else {
			b = g.ip6Chain(b)
		}
	case 6: // a random EtherType (not ARP or RARP), random bytes
		et := uint16(r.IntN(1 << 16))
		if et == 0x0806 || et == 0x8035 {
			et = 0x88b5
		}
		b = binary.BigEndian.AppendUint16(b, et)
		b = g.random(b, r.IntN(200))
	case 7: // overlapping IPv4 fragments, a few IDs
		b = g.ip4(b, 5, 0, 0, []byte{6, 17, 1}[r.IntN(3)], 8*(1+r.IntN(20)))
		ip := b[2:]
		binary.BigEndian.PutUint16(ip[4:], uint16(r.IntN(64)))
		fo := uint16(r.IntN(8200)) // up to past 65,535 bytes
		if r.IntN(2) == 0 {
			fo |= 0x2000 // more fragments
		}
		binary.BigEndian.PutUint16(ip[6:], fo)
		binary.BigEndian.PutUint16(ip[2:], uint16(len(ip)))
		ip[10], ip[11] = 0, 0
		binary.BigEndian.PutUint16(ip[10:], icmpChecksum(ip[:20]))
	case 8: // overlapping IPv6 fragments
		b = g.ip6Head(b, 44)
		fo := uint16(r.IntN(8192)) << 3
		if r.IntN(2) == 0 {
			fo |= 1
		}
		b = append(b, []byte{6, 17, 58}[r.IntN(3)], 0)
		b = binary.BigEndian.AppendUint16(b, fo)
		b = binary.BigEndian.AppendUint32(b, uint32(r.IntN(64)))
		b = g.random(b, 8*r.IntN(20))
		binary.BigEndian.PutUint16(b[2+4:], uint16(len(b)-2-40))
	case 9: // random bytes behind an IP EtherType
		b = binary.BigEndian.AppendUint16(b, []uint16{0x0800, 0x86dd}[r.IntN(2)])
		b = g.random(b, r.IntN(120))
	}
	g.sanitize(b)
	g.buf = b
	return b
}

func (g *garbage) random(b []byte, n int) []byte {
	for range n {
		b = append(b, byte(g.r.Uint32()))
	}
	return b
}

// ip4 appends an IPv4 header (IHL ihl words, total length tot, flags and
// fragment offset fo, protocol p; the checksum right for what it says)
// and n bytes of random payload.
func (g *garbage) ip4(b []byte, ihl, tot int, fo uint16, p byte, n int) []byte {
	b = binary.BigEndian.AppendUint16(b, 0x0800)
	h := len(b)
	b = append(b, 0x40|byte(ihl), 0)
	b = binary.BigEndian.AppendUint16(b, uint16(tot))
	b = binary.BigEndian.AppendUint16(b, uint16(g.r.IntN(1<<16)))
	b = binary.BigEndian.AppendUint16(b, fo)
	b = append(b, byte(g.r.IntN(256)), p, 0, 0)
	b = append(b, 198, 18, 1, byte(100+g.r.IntN(100)), 198, 19, byte(g.r.IntN(256)), byte(g.r.IntN(256)))
	b = g.random(b, n)
	if hl := ihl * 4; hl >= 20 && h+hl <= len(b) {
		binary.BigEndian.PutUint16(b[h+10:], icmpChecksum(b[h:h+hl]))
	}
	return b
}

// ip6Head appends an IPv6 header (next header nh), its payload length to
// be set by the caller.
func (g *garbage) ip6Head(b []byte, nh byte) []byte {
	b = binary.BigEndian.AppendUint16(b, 0x86dd)
	b = append(b, 0x60, 0, 0, 0, 0, 0, nh, byte(g.r.IntN(256)))
	b = append(b, 0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 1, 0, byte(g.r.IntN(256)))
	return append(b, 0x20, 0x01, 0x0d, 0xb8, 0, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, byte(g.r.IntN(256)), byte(g.r.IntN(256)))
}

// ip6Chain appends an IPv6 packet with a chain of up to 12 extension
// headers (hop-by-hop, routing, destination options, fragment, AH,
// mobility), their lengths random, some past the packet's end, then a
// random transport; the payload length is right or random.
func (g *garbage) ip6Chain(b []byte) []byte {
	exts := []byte{0, 43, 60, 44, 51, 135}
	next := func() byte {
		if g.r.IntN(4) == 0 {
			return []byte{6, 17, 58, 59, byte(g.r.IntN(256))}[g.r.IntN(5)]
		}
		return exts[g.r.IntN(len(exts))]
	}
	nh := next()
	b = g.ip6Head(b, nh)
	start := len(b)
	for k := 0; k < 12 && (nh == 0 || nh == 43 || nh == 60 || nh == 44 || nh == 51 || nh == 135); k++ {
		nh = next()
		l := g.r.IntN(6)
		b = append(b, nh, byte(l))
		b = g.random(b, 6+8*l)
		if g.r.IntN(8) == 0 {
			break // the chain cut short
		}
	}
	b = g.random(b, g.r.IntN(64))
	pl := len(b) - start
	if g.r.IntN(4) == 0 {
		pl = g.r.IntN(1 << 16)
	}
	binary.BigEndian.PutUint16(b[start-40+4:], uint16(pl))
	return b
}

// sanitize keeps every address of an IP header in the garbage (behind any
// VLAN tags) in the test ranges: flipped bytes and random ones must not
// send to an address no test holds.
func (g *garbage) sanitize(b []byte) {
	et, ip := vlanInner(b)
	var offs []int
	var n int
	switch {
	case et == 0x0800 && len(ip) >= 20:
		offs, n = []int{12, 16}, 4
	case et == 0x86dd && len(ip) >= 40:
		offs, n = []int{8, 24}, 16
	}
	for _, off := range offs {
		a, _ := netip.AddrFromSlice(ip[off : off+n])
		if !testRange(a) {
			t := g.am.get(a).AsSlice()
			copy(ip[off:], t)
		}
	}
}
