package proxy

import (
	"context"
	"fmt"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"egressd/audit"
	"egressd/internal/nfq"
	"egressd/policy"
)

// fastFlowsIn is egress_proxy_fast_flows, the flow table's length at the
// last sweep.
func fastFlowsIn(p *Proxy) float64 {
	var m dto.Metric
	_ = p.met.fastFlows.Write(&m)
	return m.GetGauge().GetValue()
}

// waitFlows waits (10 s at most) until the sweep has the table at n
// flows or fewer.
func waitFlows(t *testing.T, p *Proxy, n float64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for fastFlowsIn(p) > n {
		if time.Now().After(deadline) {
			t.Fatalf("the flow table has %v flows, want %v", fastFlowsIn(p), n)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestServeQueueKeep: a decided flow stays in the table for the keep time
// (Config.fastKeep) so that a packet queued before its mark took hold is
// answered as decided; past it, a flow that was denied, or allowed and
// marked, is gone (a segment of it is unknown: the denied mark). A client
// silent at first (a protocol where the server speaks first), allowed on
// the address with nothing held and so not marked, stays until its first
// segment, which gets the allowed mark: before, it left the table with
// the others, and its first segment after the keep time cut the
// connection it had been allowed.
func TestServeQueueKeep(t *testing.T) {
	const keep = 300 * time.Millisecond
	r := newFastRig(t, func(c *Config) { c.FirstByteWait, c.fastKeep = 2*time.Second, keep })
	dest := netip.AddrPortFrom(srvV4, 443)
	pending := gotVerdict{v: nfq.Accept, mark: fastMarks.Pending | operatorBit, setMark: true}
	repeatAllowed := gotVerdict{v: nfq.Repeat, mark: fastMarks.Allowed | operatorBit, setMark: true}
	repeatDenied := gotVerdict{v: nfq.Repeat, mark: fastMarks.Denied | operatorBit, setMark: true}
	connect := func(port uint16) (netip.AddrPort, uint32) {
		t.Helper()
		client := netip.AddrPortFrom(clientV4, port)
		syn, isn := r.connect(t, client, dest)
		if syn != pending {
			t.Fatalf("SYN: verdict %+v, want %+v", syn, pending)
		}
		return client, isn
	}
	eventOf := func(client netip.AddrPort) audit.Event {
		t.Helper()
		return r.evs.wait(t, "of the flow", func(ev audit.Event) bool { return ev.ClientPort == client.Port() })
	}
	segment := func(client netip.AddrPort, seq uint32, b []byte) gotVerdict {
		t.Helper()
		return r.q.wait(t, []uint32{r.send(hookForward, tcpPacket(client, dest, seq, 5000, nfq.ACK|nfq.PSH, b))})[0]
	}

	silent, silentISN := connect(42001)
	silent2, silent2ISN := connect(42002)
	marked, markedISN := connect(42003)
	hello := goClientHello(t, "www.allowed.test")
	checkAllowed(t, r.q.wait(t, r.stream(marked, dest, markedISN, hello, 1000, false)))
	denied, deniedISN := connect(42004)
	checkDenied(t, r.q.wait(t, r.stream(denied, dest, deniedISN, goClientHello(t, "evil.example"), 1000, false)))
	if ev := eventOf(denied); ev.Verdict != policy.Deny {
		t.Fatalf("event %+v: want denied", ev)
	}
	// A client that resets its connection before sending a byte: allowed
	// on the address with nothing held, but not kept for a first segment
	// (it has ended).
	reset, resetISN := connect(42005)
	if g := r.q.wait(t, []uint32{r.send(hookForward, tcpPacket(reset, dest, resetISN+1, 5000, nfq.RST|nfq.ACK, nil))})[0]; g != (gotVerdict{v: nfq.Accept}) {
		t.Fatalf("an RST without bytes: verdict %+v, want accept", g)
	}
	if ev := eventOf(reset); ev.Close != closeEarly {
		t.Fatalf("event %+v: want close %s", ev, closeEarly)
	}
	for _, c := range []netip.AddrPort{silent, silent2} {
		if ev := eventOf(c); ev.Verdict != policy.Allow || ev.Close != closeFast || ev.BytesOut != 0 {
			t.Fatalf("silent client: event %+v: want allowed on the address, close %s, no bytes", ev, closeFast)
		}
	}
	// Past the keep time of the silent flows' decision (the last), and
	// the sweeps after it: the marked, the denied and the reset flow are
	// gone, the silent ones kept.
	time.Sleep(keep + 4*(keep/4))
	waitFlows(t, r.p, 2)
	time.Sleep(2 * (keep / 4))
	if n := fastFlowsIn(r.p); n != 2 {
		t.Errorf("the flow table has %v flows past the keep time, want the 2 silent ones", n)
	}

	unknown := counterValue(r.p.met.fastErrors.WithLabelValues("unknown-flow"))
	// The silent client speaks: its first segment gets the allowed mark
	// (the connection is the kernel's), a later one queued before the
	// mark took hold is accepted.
	if g := segment(silent, silentISN+1, []byte("EHLO client.test\r\n")); g != repeatAllowed {
		t.Fatalf("the silent client's first segment past the keep time: verdict %+v, want %+v", g, repeatAllowed)
	}
	if g := segment(silent, silentISN+1+18, []byte("QUIT\r\n")); g != (gotVerdict{v: nfq.Accept}) {
		t.Fatalf("the silent client's second segment: verdict %+v, want accept", g)
	}
	// A SYN with another ISN on the 4-tuple of a silent flow kept past
	// the keep time is a new connection (as when the flow had left the
	// table), not one dropped as the same connection's.
	if syn := r.send(hookPrerouting, tcpPacket(silent2, dest, silent2ISN+1<<20, 0, nfq.SYN, nil)); r.q.wait(t, []uint32{syn})[0] != pending {
		t.Fatalf("a new SYN on a silent flow's ports past the keep time: verdict %+v, want %+v", r.q.wait(t, []uint32{syn})[0], pending)
	}
	// The marked and the denied flow left the table: their segments are
	// unknown, denied.
	if g := segment(marked, markedISN+1+uint32(len(hello)), []byte("more")); g != repeatDenied {
		t.Fatalf("a segment of the allowed, marked flow past the keep time: verdict %+v, want %+v (unknown)", g, repeatDenied)
	}
	if g := segment(denied, deniedISN+1, []byte("again")); g != repeatDenied {
		t.Fatalf("a segment of the denied flow past the keep time: verdict %+v, want %+v (unknown)", g, repeatDenied)
	}
	if n := counterValue(r.p.met.fastErrors.WithLabelValues("unknown-flow")) - unknown; n != 2 {
		t.Errorf("unknown-flow errors rose by %v, want 2 (the marked and the denied flow)", n)
	}
	// Marked, the silent flow leaves the table after the keep time too.
	waitFlows(t, r.p, 1) // the new connection on silent2's ports, pending
	if g := segment(silent, silentISN+1+24, []byte("late")); g != repeatDenied {
		t.Fatalf("a segment of the silent flow past the keep time after its mark: verdict %+v, want %+v (unknown)", g, repeatDenied)
	}
}

// TestServeQueueSilentBound: a silent client's flow, allowed on the
// address and not marked, is kept at most Config.fastKeepSilent: its
// first segment after that is unknown, denied (the bound keeps clients
// that never speak again from filling the table for good).
func TestServeQueueSilentBound(t *testing.T) {
	r := newFastRig(t, func(c *Config) {
		c.FirstByteWait, c.fastKeep, c.fastKeepSilent = 200*time.Millisecond, 100*time.Millisecond, 600*time.Millisecond
	})
	client, dest := netip.AddrPortFrom(clientV4, 42101), netip.AddrPortFrom(srvV4, 443)
	_, isn := r.connect(t, client, dest)
	ev := r.evs.wait(t, "of the flow", func(ev audit.Event) bool { return ev.ClientPort == client.Port() })
	if ev.Verdict != policy.Allow {
		t.Fatalf("event %+v: want allowed on the address", ev)
	}
	at := time.Now()
	waitFlows(t, r.p, 0)
	if d := time.Since(at); d < 400*time.Millisecond {
		t.Errorf("the silent flow left the table %v after its decision, want the silent bound (600 ms)", d)
	}
	id := r.send(hookForward, tcpPacket(client, dest, isn+1, 5000, nfq.ACK|nfq.PSH, []byte("late")))
	if g := r.q.wait(t, []uint32{id})[0]; g != (gotVerdict{v: nfq.Repeat, mark: fastMarks.Denied | operatorBit, setMark: true}) {
		t.Fatalf("the silent client's first segment past the bound: verdict %+v, want repeat denied", g)
	}
}

// TestServeQueueResetWithPayload: an RST that carries bytes, on a pending
// flow, must not take them out undecided. Before, the queue accepted it
// as it was (for the server to forget the connection), bytes and all,
// and the flow, ended, was allowed on the address without them read.
// Now it is dropped, the flow refused (stream-mismatch: bytes outside the
// stream), and the server reset by the fast path at the sequence number
// it expects (a reset without bytes).
func TestServeQueueResetWithPayload(t *testing.T) {
	r := newFastRig(t)
	dest := netip.AddrPortFrom(srvV4, 443)
	hello := goClientHello(t, "www.allowed.test")
	for _, c := range []struct {
		name string
		held int // bytes of the hello held before the reset
	}{
		{"nothing held", 0},
		{"part of a hello held", 100},
	} {
		t.Run(c.name, func(t *testing.T) {
			client := netip.AddrPortFrom(clientV4, 42200+uint16(c.held))
			_, isn := r.connect(t, client, dest)
			var ids []uint32
			if c.held > 0 {
				ids = r.stream(client, dest, isn, hello[:c.held], c.held, false)
			}
			r.inj.mu.Lock()
			r.inj.sent = nil
			r.inj.mu.Unlock()
			errs := counterValue(r.p.met.fastErrors.WithLabelValues("reset-payload"))
			rst := r.send(hookForward, tcpPacket(client, dest, isn+1+uint32(c.held), 5000, nfq.RST|nfq.ACK, []byte("secret bytes in a reset")))
			if g := r.q.wait(t, []uint32{rst})[0]; g != (gotVerdict{v: nfq.Drop}) {
				t.Fatalf("an RST with bytes on a pending flow: verdict %+v, want drop", g)
			}
			if n := counterValue(r.p.met.fastErrors.WithLabelValues("reset-payload")) - errs; n != 1 {
				t.Errorf("fast_errors_total{op=reset-payload} rose by %v, want 1", n)
			}
			ev := r.evs.wait(t, "of the flow", func(ev audit.Event) bool { return ev.ClientPort == client.Port() })
			if ev.Verdict != policy.Deny || ev.Reason != ReasonStreamMismatch || ev.Close != closeFastDenied {
				t.Errorf("event %+v: want denied %s, close %s", ev, ReasonStreamMismatch, closeFastDenied)
			}
			if len(ids) > 0 {
				checkDenied(t, r.q.wait(t, ids))
			}
			r.inj.mu.Lock()
			sent := r.inj.sent
			r.inj.mu.Unlock()
			var toServer []injected
			for _, s := range sent {
				if s.to == dest {
					toServer = append(toServer, s)
				}
			}
			if len(toServer) != 1 || toServer[0].flags&nfq.RST == 0 || toServer[0].seq != isn+1 || toServer[0].ack != 5000 || len(toServer[0].payload) != 0 {
				t.Errorf("sent to the server %+v, want one reset at %d, ack 5000, no bytes", toServer, isn+1)
			}
			// Later segments of the connection are denied.
			id := r.send(hookForward, tcpPacket(client, dest, isn+1, 5000, nfq.ACK|nfq.PSH, hello))
			if g := r.q.wait(t, []uint32{id})[0]; g.v == nfq.Accept || g.v == nfq.Repeat && g.mark != fastMarks.Denied|operatorBit {
				t.Errorf("a segment after: verdict %+v, want dropped or repeat denied", g)
			}
		})
	}
	t.Run("reset without bytes", func(t *testing.T) {
		// Passed: the server forgets the connection.
		client := netip.AddrPortFrom(clientV4, 42400)
		_, isn := r.connect(t, client, dest)
		rst := r.send(hookForward, tcpPacket(client, dest, isn+1, 5000, nfq.RST|nfq.ACK, nil))
		if g := r.q.wait(t, []uint32{rst})[0]; g != (gotVerdict{v: nfq.Accept}) {
			t.Fatalf("an RST without bytes on a pending flow: verdict %+v, want accept", g)
		}
	})
}

// TestServeQueueSilentReload: a silent client's flow, allowed on the
// address with nothing held, has no mark until its first segment: its
// conntrack entry carries the pending mark, which a reload's firewall
// sweep does not look at (it cuts fast-allowed connections, marked with
// the enforced bit), and the fast path's table keeps the flow allowed up
// to fastKeepSilent. Its first segment after a reload is decided again
// under the policy now running, as a reload decides the proxy's own
// connections: still allowed, it gets the allowed mark; no longer, it is
// cut (the denied mark, resets both ways). Before, it got the allowed
// mark under a policy that no longer allowed it, and the kernel forwarded
// the connection.
func TestServeQueueSilentReload(t *testing.T) {
	r := newFastRig(t, func(c *Config) { c.FirstByteWait = 200 * time.Millisecond })
	dest := netip.AddrPortFrom(srvV4, 443)
	repeatAllowed := gotVerdict{v: nfq.Repeat, mark: fastMarks.Allowed | operatorBit, setMark: true}
	repeatDenied := gotVerdict{v: nfq.Repeat, mark: fastMarks.Denied | operatorBit, setMark: true}
	reload := func(src string) {
		t.Helper()
		eng, err := policy.Compile("p", []byte(src))
		if err != nil {
			t.Fatal(err)
		}
		r.p.deps.Policy.Swap(eng)
		r.p.Redecide()
	}
	kept, keptISN := netip.AddrPortFrom(clientV4, 42501), uint32(0)
	revoked, revokedISN := netip.AddrPortFrom(clientV4, 42502), uint32(0)
	_, keptISN = r.connect(t, kept, dest)
	_, revokedISN = r.connect(t, revoked, dest)
	for _, c := range []netip.AddrPort{kept, revoked} {
		ev := r.evs.wait(t, "of the flow", func(ev audit.Event) bool { return ev.ClientPort == c.Port() })
		if ev.Verdict != policy.Allow || ev.Close != closeFast {
			t.Fatalf("silent client: event %+v: want allowed on the address, close %s", ev, closeFast)
		}
	}
	// A reload that still allows it: the first segment gets the allowed
	// mark.
	reload(fmt.Sprintf(testPolicy, "enforce"))
	id := r.send(hookForward, tcpPacket(kept, dest, keptISN+1, 5000, nfq.ACK|nfq.PSH, []byte("EHLO client.test\r\n")))
	if g := r.q.wait(t, []uint32{id})[0]; g != repeatAllowed {
		t.Fatalf("a silent client's first segment after a reload that still allows it: verdict %+v, want %+v", g, repeatAllowed)
	}
	// A reload that no longer allows it: cut.
	reload("version: 1\nmode: enforce\nrules:\n  - name: vpn\n    to: [198.18.2.4/32]\n    ports: [8443/tcp]\n")
	r.inj.mu.Lock()
	r.inj.sent = nil
	r.inj.mu.Unlock()
	revokedBefore := counterValue(r.p.met.revoked.WithLabelValues(string(policy.ModeEnforce)))
	id = r.send(hookForward, tcpPacket(revoked, dest, revokedISN+1, 5000, nfq.ACK|nfq.PSH, []byte("EHLO client.test\r\n")))
	if g := r.q.wait(t, []uint32{id})[0]; g != repeatDenied {
		t.Fatalf("a silent client's first segment after a reload that denies it: verdict %+v, want %+v", g, repeatDenied)
	}
	if n := counterValue(r.p.met.revoked.WithLabelValues(string(policy.ModeEnforce))) - revokedBefore; n != 1 {
		t.Errorf("reload_revoked_total{mode=enforce} rose by %v, want 1", n)
	}
	r.inj.mu.Lock()
	sent := r.inj.sent
	r.inj.mu.Unlock()
	var toServer, toClient bool
	for _, s := range sent {
		switch {
		case s.to == dest && s.from == revoked && s.flags&nfq.RST != 0 && s.seq == revokedISN+1 && s.ack == 5000:
			toServer = true
		case s.to == revoked && s.from == dest && s.flags&nfq.RST != 0 && s.seq == 5000:
			toClient = true
		}
	}
	if !toServer || !toClient {
		t.Errorf("sent %+v: want a reset to the server (seq %d, ack 5000) and one to the client (seq 5000)", sent, revokedISN+1)
	}
	// Its later segments are dropped.
	id = r.send(hookForward, tcpPacket(revoked, dest, revokedISN+1+18, 5000, nfq.ACK|nfq.PSH, []byte("QUIT\r\n")))
	if g := r.q.wait(t, []uint32{id})[0]; g != (gotVerdict{v: nfq.Drop}) {
		t.Fatalf("a later segment of the cut flow: verdict %+v, want drop", g)
	}
}

// TestServeQueuePendingReload: a flow being decided when a reload goes in
// (its SYN came under the old policy, its hello completes after) is
// decided under the policy running at its decision. The firewall's sweep
// runs once the new ruleset is in and reads marked connections only: one
// still pending then (its conntrack mark has no enforced bit) that gets
// the allowed mark after is not cut, so the decision must not be the old
// policy's. Before, the flow was decided with the engine loaded at its
// SYN and let out under a policy that no longer allowed it.
func TestServeQueuePendingReload(t *testing.T) {
	r := newFastRig(t)
	dest := netip.AddrPortFrom(srvV4, 443)
	hello := goClientHello(t, "www.allowed.test")
	client := netip.AddrPortFrom(clientV4, 42601)
	_, isn := r.connect(t, client, dest)
	ids := r.stream(client, dest, isn, hello[:100], 100, false)
	eng, err := policy.Compile("p", []byte("version: 1\nmode: enforce\nrules:\n  - name: vpn\n    to: [198.18.2.4/32]\n    ports: [8443/tcp]\n"))
	if err != nil {
		t.Fatal(err)
	}
	r.p.deps.Policy.Swap(eng)
	r.p.Redecide()
	ids = append(ids, r.send(hookForward, tcpPacket(client, dest, isn+1+100, 5000, nfq.ACK|nfq.PSH, hello[100:])))
	checkDenied(t, r.q.wait(t, ids))
	ev := r.evs.wait(t, "of the flow", func(ev audit.Event) bool { return ev.ClientPort == client.Port() })
	if ev.Verdict != policy.Deny || ev.Close != closeFastDenied || !ev.Enforced {
		t.Errorf("event %+v: want denied under the policy running at the decision, close %s", ev, closeFastDenied)
	}
}

// TestServeQueueClientShare: one client's flows take at most an eighth
// of the flow table (Config.FastFlows): past it, its new connections go
// to the proxy (fast_syns table-full), while another client's are still
// fast. Flows kept for a silent client stay up to 10 minutes, so one
// client opening and closing connections unused filled the whole table
// alone, and every client's new connections went to the proxy, before.
func TestServeQueueClientShare(t *testing.T) {
	r := newFastRig(t, func(c *Config) { c.FastFlows = 16 })
	pending := gotVerdict{v: nfq.Accept, mark: fastMarks.Pending | operatorBit, setMark: true}
	full := counterValue(r.p.met.fastSYNs.WithLabelValues("table-full"))
	for i, want := range []gotVerdict{pending, pending, {v: nfq.Accept}} {
		if g, _ := r.connect(t, netip.AddrPortFrom(clientV4, 42701+uint16(i)), netip.AddrPortFrom(srvV4, 443)); g != want {
			t.Fatalf("client's SYN %d: verdict %+v, want %+v", i+1, g, want)
		}
	}
	if n := counterValue(r.p.met.fastSYNs.WithLabelValues("table-full")) - full; n != 1 {
		t.Errorf("fast_syns_total{result=table-full} rose by %v, want 1", n)
	}
	if g, _ := r.connect(t, netip.AddrPortFrom(clientV6, 42701), netip.AddrPortFrom(srvV6, 443)); g != pending {
		t.Fatalf("another client's SYN: verdict %+v, want %+v", g, pending)
	}
}

// TestServeQueueClientShareMarked: a client's flows whose connection has
// its mark (decided on a hello, handed to the kernel) do not count toward
// its share of the table: a client opening connections at a high rate (a
// site behind a router is one client) keeps the fast path. Before, the
// share counted every flow kept for stragglers (30 s): past 2 connections
// a second a client's new ones all went to the proxy (a bench run of
// 1,100 a second: 6,803 of some 30,000 fast).
func TestServeQueueClientShareMarked(t *testing.T) {
	r := newFastRig(t, func(c *Config) { c.FastFlows = 16 })
	pending := gotVerdict{v: nfq.Accept, mark: fastMarks.Pending | operatorBit, setMark: true}
	dest := netip.AddrPortFrom(srvV4, 443)
	for i := range 6 { // three times the client's share of 2
		client := netip.AddrPortFrom(clientV4, 42801+uint16(i))
		g, isn := r.connect(t, client, dest)
		if g != pending {
			t.Fatalf("client's SYN %d: verdict %+v, want %+v", i+1, g, pending)
		}
		ids := r.stream(client, dest, isn, goClientHello(t, "www.allowed.test"), 2000, false)
		checkAllowed(t, r.q.wait(t, ids))
	}
}

// TestServeQueueKeepExpiry: the cases of the sweep's expiry lists
// (fastQueue.keepFor) that the tests above do not reach. A flow kept for
// its silent client, cut at its first segment by a reload that denies
// it, leaves the table fastKeep after the cut (it moves from the silent
// list to the other), not at the silent bound. A new connection on the
// ports of a decided flow taken out of the table before its keep ended
// (syn) is kept its own keep: the flow it replaced, due earlier, does
// not take it out. The old sweep read every flow of the table; these
// guard the lists that replaced it (each fails with keepFor not moving
// the flow, and with a flow left in its list at remove and the sweep
// taking out the key's flow).
func TestServeQueueKeepExpiry(t *testing.T) {
	dest := netip.AddrPortFrom(srvV4, 443)
	pending := gotVerdict{v: nfq.Accept, mark: fastMarks.Pending | operatorBit, setMark: true}
	repeatDenied := gotVerdict{v: nfq.Repeat, mark: fastMarks.Denied | operatorBit, setMark: true}
	t.Run("cut", func(t *testing.T) {
		const keep = 300 * time.Millisecond
		r := newFastRig(t, func(c *Config) {
			c.FirstByteWait, c.fastKeep, c.fastKeepSilent = 200*time.Millisecond, keep, time.Minute
		})
		client := netip.AddrPortFrom(clientV4, 42701)
		_, isn := r.connect(t, client, dest)
		if ev := r.evs.wait(t, "of the flow", func(ev audit.Event) bool { return ev.ClientPort == client.Port() }); ev.Verdict != policy.Allow {
			t.Fatalf("event %+v: want allowed on the address", ev)
		}
		eng, err := policy.Compile("p", []byte("version: 1\nmode: enforce\nrules:\n  - name: vpn\n    to: [198.18.2.4/32]\n    ports: [8443/tcp]\n"))
		if err != nil {
			t.Fatal(err)
		}
		r.p.deps.Policy.Swap(eng)
		r.p.Redecide()
		// Read before the segment is sent: the cut keeps the flow from
		// later on, so it cannot leave the table before sent+keep however
		// slowly the box runs (read after the verdict, a slow wake-up
		// could make a correct keep look short).
		sent := time.Now()
		id := r.send(hookForward, tcpPacket(client, dest, isn+1, 5000, nfq.ACK|nfq.PSH, []byte("EHLO client.test\r\n")))
		if g := r.q.wait(t, []uint32{id})[0]; g != repeatDenied {
			t.Fatalf("the first segment after a reload that denies it: verdict %+v, want %+v (cut)", g, repeatDenied)
		}
		waitFlows(t, r.p, 0)
		if d := time.Since(sent); d < keep {
			t.Errorf("the cut flow left the table %v after its segment was sent, want at least the keep time (%v)", d, keep)
		}
		id = r.send(hookForward, tcpPacket(client, dest, isn+1+18, 5000, nfq.ACK|nfq.PSH, []byte("QUIT\r\n")))
		if g := r.q.wait(t, []uint32{id})[0]; g != repeatDenied {
			t.Fatalf("a segment of the cut flow past its keep: verdict %+v, want %+v (unknown)", g, repeatDenied)
		}
	})
	t.Run("reused-ports", func(t *testing.T) {
		// The fast path's queue without its goroutines (newBenchFast),
		// swept at chosen times: the check does not hang on how fast the
		// box runs (it used to sleep past the first flow's keep and had
		// to be within the second's).
		bf := newBenchFast(t, 1)
		s, key := bf.s, bf.keys[0]
		flowOf := func() *fastFlow {
			s.mu.Lock()
			defer s.mu.Unlock()
			return s.flows[key]
		}
		expiresOf := func(fl *fastFlow) time.Time {
			fl.mu.Lock()
			defer fl.mu.Unlock()
			return fl.expires
		}
		listed := func() (n int) {
			s.emu.Lock()
			defer s.emu.Unlock()
			for _, l := range []*expiryList{&s.kept, &s.keptSilent} {
				for fl := l.head; fl != nil; fl = fl.enext {
					n++
				}
			}
			return n
		}
		bf.flow(t, 0) // decided on its hello, marked: kept s.keep
		first := flowOf()
		firstExp := expiresOf(first)
		for !time.Now().After(firstExp.Add(-s.keep)) {
			// The second is decided after the first on the clock.
		}
		// A new connection on its ports: the decided flow, marked, is
		// taken out; the new one decided and kept from its decision.
		client, dest := key.client, key.dest
		isn2 := uint32(1 << 24) // flow 0's ISN is 0
		s.packet(nfq.Packet{ID: 3, Mark: operatorBit, Hook: hookPrerouting, InIf: lanIf, HWAddr: clientHW, HWAddrLen: 6, Data: tcpPacket(client, dest, isn2, 0, nfq.SYN, nil)})
		if g := *bf.q; g.id != 3 || g.v != nfq.Accept || g.mark != pending.mark {
			t.Fatalf("a new SYN on a decided flow's ports: verdict %+v, want %+v", g, pending)
		}
		hello := goClientHello(t, "www.allowed.test")
		s.packet(nfq.Packet{ID: 4, Mark: operatorBit, Hook: hookForward, InIf: lanIf, Data: tcpPacket(client, dest, isn2+1, 5000, nfq.ACK|nfq.PSH, hello)})
		if g := *bf.q; g.id != 4 || g.v != nfq.Repeat || g.mark != fastMarks.Allowed|operatorBit {
			t.Fatalf("the new connection's hello: verdict %+v, want repeat-allowed", g)
		}
		second := flowOf()
		if second == nil || second == first {
			t.Fatalf("the table's flow of the ports is %p, want the new connection's (the first: %p)", second, first)
		}
		if n := listed(); n != 1 {
			t.Errorf("the expiry lists hold %d flows, want 1 (the new connection's; the replaced one unlisted)", n)
		}
		// A sweep at the end of the second's keep: past the first's,
		// not past the second's.
		s.sweepOnce(expiresOf(second))
		if fl := flowOf(); fl != second {
			t.Fatalf("after a sweep past the replaced flow's keep, within the new one's: the table's flow is %p, want %p (the new connection's)", fl, second)
		}
		// A segment the second's mark had not caught yet (its hello
		// again) is answered as decided: accepted, not unknown.
		s.packet(nfq.Packet{ID: 5, Mark: operatorBit, Hook: hookForward, InIf: lanIf, Data: tcpPacket(client, dest, isn2+1, 5000, nfq.ACK|nfq.PSH, hello[:1000])})
		if g := *bf.q; g.id != 5 || g.v != nfq.Accept || g.mark != 0 {
			t.Fatalf("a segment of the new connection within its keep, past the replaced flow's: verdict %+v, want accept", g)
		}
		// Past the second's keep: out of the table and of the lists.
		s.sweepOnce(expiresOf(second).Add(time.Nanosecond))
		if fl := flowOf(); fl != nil {
			t.Errorf("after a sweep past the new connection's keep the table still has its flow")
		}
		if n := listed(); n != 0 {
			t.Errorf("the expiry lists hold %d flows with the table empty, want 0", n)
		}
	})
}

// TestFastSweepRaces: the sweep (sweepOnce, on its own goroutine: a
// look in two past the keep of flows marked, one in 128 past every keep)
// against the queue's goroutine taking,
// deciding and replacing flows on the same ports (hello flows decided on
// it, silent ones by workers, then their first segment, or a cut: keepFor
// from several goroutines). Under -race: no data race, no lock taken out
// of order (a deadlock ends the test at its deadline); between rounds,
// each expiry list in the order of its deadlines and every decided flow of
// the table in a list (else it would never leave); a last sweep past
// every keep leaves neither flows nor listed ones behind.
func TestFastSweepRaces(t *testing.T) {
	const n, rounds = 64, 6
	bf := newBenchFast(t, n)
	s := bf.s
	s.q = &syncQueue{}                           // verdicts from workers too
	s.p.cfg.FirstByteWait = 5 * time.Millisecond // silent flows decided soon, by workers
	s.p.cfg.fastHandshake = time.Nanosecond      // no handshake allowance on top
	hello := goClientHello(t, "www.allowed.test")
	var sweeping sync.Mutex // held by a look of the sweep, and by check: the lists at rest
	stop := make(chan struct{})
	swept := make(chan int)
	go func() {
		i := 0
		defer func() { swept <- i }()
		for ; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			now := time.Now()
			switch {
			case i%128 == 0:
				now = now.Add(s.keepSilent + s.keep)
			case i%2 == 0:
				now = now.Add(s.keep)
			}
			sweeping.Lock()
			s.sweepOnce(now)
			sweeping.Unlock()
			time.Sleep(100 * time.Microsecond)
		}
	}()
	check := func(when string) {
		t.Helper()
		sweeping.Lock()
		defer sweeping.Unlock()
		s.emu.Lock()
		for _, l := range []*expiryList{&s.kept, &s.keptSilent} {
			for fl := l.head; fl != nil && fl.enext != nil; fl = fl.enext {
				if fl.enext.expires.Before(fl.expires) {
					s.emu.Unlock()
					t.Fatalf("%s: an expiry list out of order: %v before %v", when, fl.expires, fl.enext.expires)
				}
			}
		}
		s.emu.Unlock()
		s.mu.Lock()
		defer s.mu.Unlock()
		for _, fl := range s.flows {
			fl.mu.Lock() // then emu, as remove takes them
			s.emu.Lock()
			decided, listed := fl.state != fastPending, fl.elist != nil
			s.emu.Unlock()
			fl.mu.Unlock()
			if decided && !listed {
				t.Fatalf("%s: a decided flow of the table (%v to %v) in no expiry list: it would never leave", when, fl.key.client, fl.key.dest)
			}
		}
	}
	for round := range rounds {
		for i := range n {
			client, dest := bf.keys[i].client, bf.keys[i].dest
			isn := uint32(0x10000*i) + uint32(round)<<24
			s.packet(nfq.Packet{ID: 1, Mark: operatorBit, Hook: hookPrerouting, InIf: lanIf, HWAddr: clientHW, HWAddrLen: 6, Data: tcpPacket(client, dest, isn, 0, nfq.SYN, nil)})
			if i%2 == 0 {
				s.packet(nfq.Packet{ID: 2, Mark: operatorBit, Hook: hookForward, InIf: lanIf, Data: tcpPacket(client, dest, isn+1, 5000, nfq.ACK|nfq.PSH, hello)})
			}
		}
		time.Sleep(20 * time.Millisecond) // the silent ones decided by workers, most of them
		check(fmt.Sprintf("round %d, before the silent ones' first segments", round))
		for i := 1; i < n; i += 2 {
			client, dest := bf.keys[i].client, bf.keys[i].dest
			isn := uint32(0x10000*i) + uint32(round)<<24
			s.packet(nfq.Packet{ID: 3, Mark: operatorBit, Hook: hookForward, InIf: lanIf, Data: tcpPacket(client, dest, isn+1, 5000, nfq.ACK|nfq.PSH, []byte("EHLO client.test\r\n"))})
		}
		check(fmt.Sprintf("round %d", round))
	}
	close(stop)
	looks := <-swept
	if looks < rounds {
		t.Errorf("the sweep looked %d times, want at least %d", looks, rounds)
	}
	s.wg.Wait() // every flow concluded
	check("at the end")
	s.sweepOnce(time.Now().Add(s.keepSilent + s.keep))
	s.mu.Lock()
	left := len(s.flows)
	s.mu.Unlock()
	s.emu.Lock()
	listed := s.kept.head != nil || s.keptSilent.head != nil
	s.emu.Unlock()
	if left != 0 || listed {
		t.Errorf("after a sweep past every keep: %d flows in the table, flows listed %v; want none", left, listed)
	}
	m := s.p.met
	t.Logf("decided on the queue %v, by workers %v; SYNs isn-mismatch %v; segments of no flow %v, cut %v; sweeps %d",
		counterValue(m.fastOnQueue), counterValue(m.fastOnWorker), counterValue(m.fastSYNs.WithLabelValues("isn-mismatch")),
		counterValue(m.fastErrors.WithLabelValues("unknown-flow")), counterValue(m.fastErrors.WithLabelValues("late-conflict")), looks)
}

// syncQueue is a Queue whose verdicts may come from several goroutines
// (workers'): it counts them.
type syncQueue struct {
	mu sync.Mutex
	n  int
}

func (q *syncQueue) Serve(ctx context.Context, fn func(nfq.Packet)) error { return nil }

func (q *syncQueue) Verdict(id uint32, v nfq.Verdict) error {
	q.mu.Lock()
	q.n++
	q.mu.Unlock()
	return nil
}

func (q *syncQueue) VerdictMark(id uint32, v nfq.Verdict, mark uint32) error {
	return q.Verdict(id, v)
}

// TestFastSweepRekept: a flow allowed with nothing marked (its client
// silent at first, decided on the address) whose first segment comes as
// the sweep takes it out of the table, past its keep. The queue's
// goroutine found the flow in the table, then let its lock go while the
// policy decided it again (fastQueue.again: the DNS's names of the
// address, asked here, run the sweep then), and kept it (keepFor) after
// the sweep removed it: before this test's commit the flow went back
// into an expiry list with no table entry behind it, skipped there by
// each sweep until its deadline (fastKeep, 30 s), holding its memory.
// Now a flow out of the table is not listed again: the lists and the
// table agree; and its segment is unknown, cut, as after the sweep
// (before session 39's review it was let through, the flow gone).
func TestFastSweepRekept(t *testing.T) {
	bf := newBenchFast(t, 1)
	s, key := bf.s, bf.keys[0]
	s.p.cfg.FirstByteWait = 5 * time.Millisecond // decided silent, by a worker
	s.p.cfg.fastHandshake = time.Nanosecond
	hf := &sweepFacts{DNSFacts: s.p.deps.DNS}
	s.p.deps.DNS = hf
	client, dest := key.client, key.dest
	expires := silentDecided(t, bf)
	swept := false
	sweep := func() {
		// The queue's goroutine, deciding the first segment again, holds
		// no lock: the sweep past the flow's keep takes it out.
		s.sweepOnce(expires.Add(time.Nanosecond))
		s.mu.Lock()
		swept = s.flows[key] == nil
		s.mu.Unlock()
	}
	hf.hook.Store(&sweep)
	s.packet(nfq.Packet{ID: 2, Mark: operatorBit, Hook: hookForward, InIf: lanIf, Data: tcpPacket(client, dest, 1, 5000, nfq.ACK|nfq.PSH, []byte("EHLO client.test\r\n"))})
	hf.hook.Store(nil)
	if !swept {
		t.Fatal("the sweep did not take the flow out while its first segment was decided again (the window this test is about was not reached)")
	}
	// Its keep ended as it came: unknown, cut (the denied mark), as it is
	// a moment later; before, it was let through (repeat allowed) with
	// the flow gone, its next queued segment then unknown, cut.
	if g := *bf.q; g.id != 2 || g.v != nfq.Repeat || g.mark != fastMarks.Denied|operatorBit {
		t.Errorf("the first segment, its flow swept out as it came: verdict %+v, want 2 repeat denied (unknown)", g)
	}
	s.mu.Lock()
	left := len(s.flows)
	s.mu.Unlock()
	var listed []*fastFlow
	s.emu.Lock()
	for _, l := range []*expiryList{&s.kept, &s.keptSilent} {
		for f := l.head; f != nil; f = f.enext {
			listed = append(listed, f)
		}
	}
	s.emu.Unlock()
	if left != 0 || len(listed) != 0 {
		t.Errorf("after the sweep took the flow out as its first segment kept it: %d flows in the table, %d in the expiry lists; want none (a listed flow of no table entry)", left, len(listed))
	}
}

// sweepFacts is the proxy's DNS facts, calling hook (when set) at each
// NamesFor: a test runs the sweep there, while the fast path decides a
// flow again with its lock let go.
type sweepFacts struct {
	DNSFacts
	hook atomic.Pointer[func()]
}

func (f *sweepFacts) NamesFor(client, addr netip.Addr) []string {
	if h := f.hook.Load(); h != nil {
		(*h)()
	}
	return f.DNSFacts.NamesFor(client, addr)
}

// TestFastSilentLapsed: a silent client's flow, allowed on the address
// with nothing marked, whose keep (fastKeepSilent) has ended when its
// first segment comes, before the sweep (once a second) took it out of
// the table: the segment is unknown, cut (the denied mark), as the
// README says of a client silent for longer and as it is once the sweep
// has run (TestServeQueueSilentBound). Before, the flow found in the
// table let it through (repeat allowed) and was kept fastKeep more: how
// late a speaker could be depended on the sweep's tick. Here no sweep
// runs (the rig has none): the segment comes in that window.
func TestFastSilentLapsed(t *testing.T) {
	bf := newBenchFastTo(t, 1, discardEvents{}, func(c *Config) { c.fastKeepSilent = 20 * time.Millisecond })
	s, key := bf.s, bf.keys[0]
	s.p.cfg.FirstByteWait = 5 * time.Millisecond // decided silent, by a worker
	s.p.cfg.fastHandshake = time.Nanosecond
	expires := silentDecided(t, bf)
	time.Sleep(time.Until(expires) + 10*time.Millisecond)
	unknown := counterValue(s.p.met.fastErrors.WithLabelValues("unknown-flow"))
	s.packet(nfq.Packet{ID: 2, Mark: operatorBit, Hook: hookForward, InIf: lanIf, Data: tcpPacket(key.client, key.dest, 1, 5000, nfq.ACK|nfq.PSH, []byte("EHLO client.test\r\n"))})
	if g := *bf.q; g.id != 2 || g.v != nfq.Repeat || g.mark != fastMarks.Denied|operatorBit {
		t.Errorf("the first segment past the silent keep, before a sweep: verdict %+v, want 2 repeat denied (unknown)", g)
	}
	if n := counterValue(s.p.met.fastErrors.WithLabelValues("unknown-flow")) - unknown; n != 1 {
		t.Errorf("fast_errors_total{op=unknown-flow} rose by %v, want 1", n)
	}
	// Not kept again: the next sweep takes it out.
	s.sweepOnce(time.Now())
	s.mu.Lock()
	left := len(s.flows)
	s.mu.Unlock()
	if left != 0 {
		t.Errorf("%d flows in the table after a sweep past the silent keep, want 0", left)
	}
}

// silentDecided sends bf's first SYN and waits for its flow's decision as
// a silent client's (allowed by a worker, nothing marked), and returns
// when the flow's keep ends.
func silentDecided(t *testing.T, bf *benchFast) time.Time {
	t.Helper()
	s, key := bf.s, bf.keys[0]
	s.packet(nfq.Packet{ID: 1, Mark: operatorBit, Hook: hookPrerouting, InIf: lanIf, HWAddr: clientHW, HWAddrLen: 6, Data: bf.syn[0]})
	if g := *bf.q; g.id != 1 || g.mark != fastMarks.Pending|operatorBit {
		t.Fatalf("SYN: verdict %+v, want accept-pending", g)
	}
	s.wg.Wait() // decided by a worker: allowed, nothing held
	s.mu.Lock()
	fl := s.flows[key]
	s.mu.Unlock()
	if fl == nil {
		t.Fatal("the silent flow is not in the table after its decision")
	}
	fl.mu.Lock()
	st, marked, expires := fl.state, fl.marked, fl.expires
	fl.mu.Unlock()
	if st != fastAllowed || marked {
		t.Fatalf("the silent flow: state %v, marked %v; want allowed, nothing marked", st, marked)
	}
	return expires
}
