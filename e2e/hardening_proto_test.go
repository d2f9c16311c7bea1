package e2e

import (
	"net"
	"sync/atomic"
	"testing"
	"time"
)

// rawProtos are IP protocols that are neither TCP nor UDP, sent by a LAN
// host with root: an ICMP echo (ping tunnels carry data in its payload)
// and IP protocol 253 (RFC 3692, experimental: any GRE, ESP, IP-in-IP or
// SCTP packet looks the same to the gateway).
var rawProtos = []struct {
	name, network string
	msg           []byte
}{
	{"icmp-echo", "ip4:icmp", icmpEcho([]byte("exfil-over-icmp"))},
	{"ipproto-253", "ip4:253", []byte("exfil-over-proto-253")},
}

// icmpEcho is an ICMP echo request (id 0x4832, seq 1) carrying payload.
func icmpEcho(payload []byte) []byte {
	b := append([]byte{8, 0, 0, 0, 0x48, 0x32, 0, 1}, payload...)
	var sum uint32
	for i := 0; i+1 < len(b); i += 2 {
		sum += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		sum += uint32(b[len(b)-1]) << 8
	}
	for sum>>16 != 0 {
		sum = sum&0xffff + sum>>16
	}
	cs := ^uint16(sum)
	b[2], b[3] = byte(cs>>8), byte(cs)
	return b
}

// rawWitness counts packets of one IP protocol that reach an address of
// the internet namespace and that its match takes.
type rawWitness struct{ got atomic.Int64 }

// newRawWitness counts packets of network from the LAN client to
// udpDenyIP (ICMP: echo requests only).
func (tp *topo) newRawWitness(t *testing.T, network string) *rawWitness {
	return tp.newRawWitnessAt(t, network, udpDenyIP, func(b []byte, from net.Addr) bool {
		return from.String() == lanClient4 && (network != "ip4:icmp" || len(b) > 0 && b[0] == 8)
	})
}

// newRawWitnessAt counts packets of network to addr that match takes.
func (tp *topo) newRawWitnessAt(t *testing.T, network, addr string, match func(b []byte, from net.Addr) bool) *rawWitness {
	t.Helper()
	pc, err := tp.inet.ListenPacket(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	w := &rawWitness{}
	done := make(chan struct{})
	t.Cleanup(func() { pc.Close(); <-done })
	go func() {
		defer close(done)
		buf := make([]byte, 4096)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			if match(buf[:n], from) {
				w.got.Add(1)
			}
		}
	}()
	return w
}

// sendRaw sends msg three times from the LAN client to udpDenyIP over a
// raw socket of network and returns how many more packets the witness
// saw, waiting up to 2 s for them.
func (tp *topo) sendRaw(t *testing.T, w *rawWitness, network string, msg []byte) int64 {
	t.Helper()
	return tp.sendRawTo(t, w, network, udpDenyIP, msg)
}

// sendRawTo is sendRaw to dst.
func (tp *topo) sendRawTo(t *testing.T, w *rawWitness, network, dst string, msg []byte) int64 {
	t.Helper()
	before := w.got.Load()
	pc, err := tp.lan.ListenPacket(network, lanClient4)
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	for range 3 {
		if _, err := pc.WriteTo(msg, &net.IPAddr{IP: net.ParseIP(dst)}); err != nil {
			t.Fatalf("%s to %s: %v", network, dst, err)
		}
	}
	for deadline := time.Now().Add(2 * time.Second); w.got.Load()-before < 3 && time.Now().Before(deadline); {
		time.Sleep(20 * time.Millisecond)
	}
	return w.got.Load() - before
}

// TestHardeningProtocols: a LAN host sends packets that are neither TCP
// nor UDP (ICMP echo, IP protocol 253) to an internet address no rule
// names. Enforce mode drops them ("nothing else from the LAN"). Audit
// mode forwards them, as it forwards everything; its report must show
// them as flows enforce would drop (protocol-not-allowed; the echo, which
// a rule listing icmp could allow, no-rule), or the audit a
// site reads before it switches to enforce hides a device's tunnel.
func TestHardeningProtocols(t *testing.T) {
	tp := newTopo(t)
	// The seed's other ports: 5228-5230 (android-mdm) and 10516
	// (health-logging) are opened by name only, so an address no answer
	// gave out is not reachable on them, with or without an allowed name.
	portAddrs := []string{spoofIP4 + ":5228", spoofIP4 + ":5230", spoofIP4 + ":10516"}
	pw := tp.newWitness(t, portAddrs, nil)
	for _, a := range portAddrs {
		if !tp.dialOK(a) {
			t.Fatalf("without egressd, %s is not reachable from the LAN: the test would prove nothing", a)
		}
	}
	pw.settleAfter(t, int64(len(portAddrs)), 0)
	ws := make([]*rawWitness, len(rawProtos))
	for i, p := range rawProtos {
		ws[i] = tp.newRawWitness(t, p.network)
		if n := tp.sendRaw(t, ws[i], p.network, p.msg); n == 0 {
			t.Fatalf("without egressd, %s from the LAN does not reach %s: the test would prove nothing", p.name, udpDenyIP)
		}
	}

	t.Run("enforce", func(t *testing.T) {
		d := newDaemon(t, tp, "enforce")
		d.start()
		defer d.stop()
		for i, p := range rawProtos {
			if n := tp.sendRaw(t, ws[i], p.network, p.msg); n != 0 {
				t.Errorf("enforce: %d of 3 %s packets reached %s", n, p.name, udpDenyIP)
			}
		}
		base := pw.tcp.Load()
		for _, a := range portAddrs {
			for _, sni := range []string{"", fcmName, intakeName} {
				spec := helloSpec{}
				if sni != "" {
					spec.sni = [][]string{{sni}}
				}
				o := tp.sendHello(a, buildHello(spec), 0, 0)
				if !o.denied {
					t.Errorf("enforce: hello (SNI %q) to %s: %v", sni, a, o)
				}
				wantEvent(t, d, "hello to "+a, byClientPort(o.port), "deny", "no-rule|sni-mismatch|port-not-allowed")
			}
			body, port, err := tp.rawHTTP(a, "not tls\r\n")
			if err == nil && body != "" {
				t.Errorf("enforce: bytes that are not TLS to %s got %q", a, body)
			}
			wantEvent(t, d, "bytes to "+a, byClientPort(port), "deny", "no-rule")
		}
		if n := pw.tcp.Load() - base; n != 0 {
			t.Errorf("enforce: the witness accepted %d TCP connections on 5228, 5230, 10516", n)
		}
	})

	t.Run("audit", func(t *testing.T) {
		d := newDaemon(t, tp, "audit")
		d.start()
		defer d.stop()
		for i, p := range rawProtos {
			if n := tp.sendRaw(t, ws[i], p.network, p.msg); n == 0 {
				t.Errorf("audit: %s did not reach %s (audit mode forwards everything)", p.name, udpDenyIP)
			}
		}
		// A control sent after them: once the report has it, capture has
		// read the packets before it.
		if err := tp.udpEcho(net.JoinHostPort(udpDenyIP, "7777")); err != nil {
			t.Fatalf("audit: UDP control: %v", err)
		}
		d.waitDropped(udpDenyIP, udpDenyPort, "udp", 1)
		protos := map[string]bool{}
		for _, dr := range d.report().Dropped {
			if dr.IP == udpDenyIP || dr.Dest == udpDenyIP {
				protos[dr.Proto] = true
			}
		}
		for _, ev := range d.allEvents() {
			if ev.Kind == "flow" && ev.Dest == udpDenyIP && ev.Client == lanClient4 {
				protos[ev.Proto] = true
			}
		}
		delete(protos, "udp")
		if len(protos) < len(rawProtos) {
			t.Errorf("audit: the report and event log show %d other protocols to %s (%v), want %d: ICMP and protocol 253 went out unrecorded", len(protos), udpDenyIP, protos, len(rawProtos))
		}
		for _, ev := range d.allEvents() {
			// An echo request is decided by the policy with the protocol
			// icmp (no rule names the address); protocol 253 by none.
			want := "protocol-not-allowed"
			if ev.Proto == "icmp" {
				want = "no-rule"
			}
			if ev.Kind == "flow" && ev.Dest == udpDenyIP && ev.Proto != "udp" && (ev.Reason != want || ev.Verdict != "deny") {
				t.Errorf("audit: %+v, want it denied as %s", ev, want)
			}
		}
	})
}
