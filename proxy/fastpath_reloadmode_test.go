package proxy

import (
	"bytes"
	"fmt"
	"net/netip"
	"testing"
	"time"

	"egressd/audit"
	"egressd/internal/nfq"
	"egressd/policy"
)

// TestServeQueueRefusalAcrossReloadMode: a flow pending (its SYN taken
// under enforce mode, its hello not complete) when a reload switches the
// mode, then refused by the decision for a reason of the fast path's own
// (other bytes where bytes were held: stream-mismatch; plain HTTP:
// fast-path-http) or the peek's on the bytes (hello-bad), is refused in the mode of the policy running at the
// decision, as its allow would be decided (fastQueue.again): after a
// switch to audit mode it goes on (its held packets accepted without the
// fast-allowed mark, nothing sent to either side), recorded as a
// deny not enforced; after a switch to audit mode and back to enforce,
// refused (dropped, the denied mark, the deny answer and resets),
// enforced. The policy running allows the connection's host: no reload
// revoked it. Before, every such refusal took the mode of the SYN's
// policy: after the switch to audit mode the connection was refused with
// resets, recorded enforced in enforce mode, under an audit policy.
func TestServeQueueRefusalAcrossReloadMode(t *testing.T) {
	hello := goClientHello(t, "www.allowed.test")
	other := bytes.Repeat([]byte{0x16}, 100) // other bytes where hello[:100] is held
	httpReq := []byte("GET /x HTTP/1.1\r\nHost: www.allowed.test\r\n\r\n")
	for _, c := range []struct {
		name   string
		reason string
		answer []byte
		// before sends what comes before the reload, after what comes
		// after it; each returns the ids of the packets the flow holds.
		before, after func(r *fastRig, client, dest netip.AddrPort, isn uint32) []uint32
	}{
		{
			name: "stream-mismatch", reason: ReasonStreamMismatch, answer: tlsAlertAccessDenied,
			before: func(r *fastRig, client, dest netip.AddrPort, isn uint32) []uint32 {
				return r.stream(client, dest, isn, hello[:100], 100, false)
			},
			after: func(r *fastRig, client, dest netip.AddrPort, isn uint32) []uint32 {
				return r.stream(client, dest, isn, other, 100, false)
			},
		},
		{
			// Refused by the peek, on the bytes: a TLS record that is
			// not a ClientHello.
			name: "hello-bad", reason: ReasonHelloBad, answer: tlsAlertAccessDenied,
			before: func(*fastRig, netip.AddrPort, netip.AddrPort, uint32) []uint32 { return nil },
			after: func(r *fastRig, client, dest netip.AddrPort, isn uint32) []uint32 {
				return r.stream(client, dest, isn, []byte("\x16\x03\x01\x00\x04\x02\x00\x00\x00"), 100, false)
			},
		},
		{
			// Denied by the SYN's policy: no rule allows the server name.
			name: "no-rule", reason: policy.ReasonNoRule, answer: tlsAlertAccessDenied,
			before: func(*fastRig, netip.AddrPort, netip.AddrPort, uint32) []uint32 { return nil },
			after: func(r *fastRig, client, dest netip.AddrPort, isn uint32) []uint32 {
				return r.stream(client, dest, isn, goClientHello(t, "evil.example"), 600, false)
			},
		},
		{
			name: "fast-path-http", reason: ReasonFastPathHTTP, answer: []byte("HTTP/1.1 403 Forbidden\r\n"),
			before: func(*fastRig, netip.AddrPort, netip.AddrPort, uint32) []uint32 { return nil },
			after: func(r *fastRig, client, dest netip.AddrPort, isn uint32) []uint32 {
				return r.stream(client, dest, isn, httpReq, 10, false)
			},
		},
	} {
		for _, m := range []struct {
			name  string
			modes []policy.Mode // the reloads, in turn
		}{
			{"to-audit", []policy.Mode{policy.ModeAudit}},
			{"to-audit-and-back", []policy.Mode{policy.ModeAudit, policy.ModeEnforce}},
		} {
			t.Run(c.name+"/"+m.name, func(t *testing.T) {
				r := newFastRig(t) // the first-byte wait (5 s) outlasts the test's steps
				dest := netip.AddrPortFrom(srvV4, 443)
				client := netip.AddrPortFrom(clientV4, 42811)
				syn, isn := r.connect(t, client, dest)
				if syn.mark&fastMarks.Pending == 0 {
					t.Fatalf("SYN: verdict %+v, want fast", syn)
				}
				ids := c.before(r, client, dest, isn)
				mode := policy.ModeEnforce
				for _, mode = range m.modes {
					fastReload(t, r, fmt.Sprintf(testPolicy, mode))
				}
				revoked := counterValue(r.p.met.revoked.WithLabelValues(string(mode)))
				ids = append(ids, c.after(r, client, dest, isn)...)
				ev := r.evs.wait(t, "of the flow", func(ev audit.Event) bool { return ev.ClientPort == client.Port() })
				got := r.q.wait(t, ids)
				toClient := r.inj.sentTo(client)
				enforced := mode == policy.ModeEnforce
				if enforced {
					checkDenied(t, got)
					if len(toClient) != 2 || !bytes.HasPrefix(toClient[0].payload, c.answer) || toClient[1].flags&nfq.RST == 0 {
						t.Errorf("sent to the client %+v: want the deny answer and a reset", toClient)
					}
				} else {
					checkUnmarked(t, got)
					if len(toClient) != 0 {
						t.Errorf("sent to the client %+v: want nothing (audit mode)", toClient)
					}
				}
				close := closeFast
				if enforced {
					close = closeFastDenied
				}
				if ev.Verdict != policy.Deny || ev.Reason != c.reason || ev.Mode != mode || ev.Enforced != enforced || ev.Close != close {
					t.Errorf("event %+v: want denied %s in %s mode, enforced %v, close %s", ev, c.reason, mode, enforced, close)
				}
				if n := counterValue(r.p.met.revoked.WithLabelValues(string(mode))) - revoked; n != 0 {
					t.Errorf("reload_revoked_total{mode=%s} rose by %v, want 0: the policy running allows the host", mode, n)
				}
			})
		}
	}
}

// TestServeQueueShutdownAcrossReloadAudit: a flow still pending at the
// shutdown after a reload to audit mode is refused as at any shutdown
// (its held packets dropped, the denied mark; recorded denied shutdown,
// enforced, close shutdown), as the transparent proxy refuses a
// connection at its shutdown in either mode (refuseAtShutdown), and its
// event has the mode of the policy running then (audit). Before, its
// event said enforce mode, the SYN's policy's.
func TestServeQueueShutdownAcrossReloadAudit(t *testing.T) {
	r := newFastRig(t) // the first-byte wait (5 s) outlasts the test's steps
	dest := netip.AddrPortFrom(srvV4, 443)
	partial := netip.AddrPortFrom(clientV4, 42821)
	_, isn := r.connect(t, partial, dest)
	ids := r.stream(partial, dest, isn, goClientHello(t, "www.allowed.test")[:100], 100, false)
	fastReload(t, r, fmt.Sprintf(testPolicy, policy.ModeAudit))
	if err := r.stop(); err != nil {
		t.Fatalf("ServeQueue: %v", err)
	}
	checkDenied(t, r.q.wait(t, ids))
	ev := r.evs.wait(t, "of the flow", func(ev audit.Event) bool { return ev.ClientPort == partial.Port() })
	if ev.Verdict != policy.Deny || !ev.Enforced || ev.Mode != policy.ModeAudit || ev.Reason != ReasonShutdown || ev.Close != closeShutdown {
		t.Errorf("event %+v: want denied %s in audit mode, enforced, close %s", ev, ReasonShutdown, closeShutdown)
	}
}

// TestServeQueueDenyAcrossReloadAllowed: a flow pending when a reload
// puts in a policy that allows its server name, which the SYN's policy
// denied, is decided under the policy running at the decision, as a new
// connection would be: allowed under the new rule (its held packets
// accepted, the last with the allowed mark). Before, the deny of the
// SYN's policy stood, reset and recorded no-rule.
func TestServeQueueDenyAcrossReloadAllowed(t *testing.T) {
	r := newFastRig(t)
	dest := netip.AddrPortFrom(srvV4, 443)
	client := netip.AddrPortFrom(clientV4, 42831)
	_, isn := r.connect(t, client, dest)
	fastReload(t, r, "version: 1\nmode: enforce\nrules:\n  - name: widened\n    to: [\"*.allowed.test\", evil.example]\n    ports: [443/tcp]\n")
	ids := r.stream(client, dest, isn, goClientHello(t, "evil.example"), 600, false)
	ev := r.evs.wait(t, "of the flow", func(ev audit.Event) bool { return ev.ClientPort == client.Port() })
	checkAllowed(t, r.q.wait(t, ids))
	if ev.Verdict != policy.Allow || ev.Rule != "widened" || ev.Name != "evil.example" || ev.Close != closeFast {
		t.Errorf("event %+v: want allowed under rule widened, name evil.example, close %s", ev, closeFast)
	}
}

// TestServeQueuePartialHelloAcrossAuditSwitch: a flow with part of its
// hello held when a reload switches to audit mode, whose rest never comes
// to the queue (the audit ruleset queues nothing more: the client's later
// segments, and its retransmissions of those held, pass to the server),
// is decided at its hello deadline: hello-timeout, in audit mode a deny
// not enforced, its held packets let through without the fast-allowed mark. Before,
// the hello-timeout took the SYN's policy's mode, enforce: the
// connection, going on in audit mode, was cut by resets both ways.
func TestServeQueuePartialHelloAcrossAuditSwitch(t *testing.T) {
	r := newFastRig(t, func(c *Config) { c.FirstByteWait, c.HelloTimeout = 200*time.Millisecond, 600*time.Millisecond })
	dest := netip.AddrPortFrom(srvV4, 443)
	client := netip.AddrPortFrom(clientV4, 42841)
	_, isn := r.connect(t, client, dest)
	ids := r.stream(client, dest, isn, goClientHello(t, "www.allowed.test")[:100], 100, false)
	fastReload(t, r, fmt.Sprintf(testPolicy, policy.ModeAudit))
	ev := r.evs.wait(t, "of the flow", func(ev audit.Event) bool { return ev.ClientPort == client.Port() })
	checkUnmarked(t, r.q.wait(t, ids))
	if ev.Verdict != policy.Deny || ev.Reason != ReasonHelloTimeout || ev.Mode != policy.ModeAudit || ev.Enforced || ev.Close != closeFast {
		t.Errorf("event %+v: want denied %s in audit mode, not enforced, close %s", ev, ReasonHelloTimeout, closeFast)
	}
	r.inj.mu.Lock()
	defer r.inj.mu.Unlock()
	if len(r.inj.sent) != 0 {
		t.Errorf("sent %+v: want nothing (audit mode)", r.inj.sent)
	}
}

// TestServeQueueDenyAcrossReloadSpoofed: a flow pending when a reload
// puts in a policy that allows its server name, which the SYN's policy
// denied, under a rule of its own, toward an address our DNS gave out
// for another rule's name only: the name is not vouched for the address
// (THREATS A2) under the new policy either, so it is refused
// sni-mismatch in enforce mode (dropped, the denied mark, the TLS alert
// and a reset); after a reload to audit mode it goes on, recorded as a
// deny sni-mismatch not enforced. The decision made again on a deny
// (fastQueue.again) redoes the vouching, on local facts: a spoofed SNI
// does not ride through a reload. (The SYN's policy's deny, no-rule, was
// kept before: the reason says the new policy decided it.)
func TestServeQueueDenyAcrossReloadSpoofed(t *testing.T) {
	for _, mode := range []policy.Mode{policy.ModeEnforce, policy.ModeAudit} {
		t.Run(string(mode), func(t *testing.T) {
			r := newFastRig(t)
			dest := netip.AddrPortFrom(srvV4, 443) // our DNS gave it out for www.allowed.test
			client := netip.AddrPortFrom(clientV4, 42851)
			_, isn := r.connect(t, client, dest)
			fastReload(t, r, fmt.Sprintf("version: 1\nmode: %s\nrules:\n  - name: allowed\n    to: [\"*.allowed.test\"]\n    ports: [443/tcp]\n  - name: evil\n    to: [evil.example]\n    ports: [443/tcp]\n", mode))
			ids := r.stream(client, dest, isn, goClientHello(t, "evil.example"), 600, false)
			ev := r.evs.wait(t, "of the flow", func(ev audit.Event) bool { return ev.ClientPort == client.Port() })
			got := r.q.wait(t, ids)
			toClient := r.inj.sentTo(client)
			enforced := mode == policy.ModeEnforce
			close := closeFast
			if enforced {
				close = closeFastDenied
				checkDenied(t, got)
				if len(toClient) != 2 || !bytes.HasPrefix(toClient[0].payload, tlsAlertAccessDenied) || toClient[1].flags&nfq.RST == 0 {
					t.Errorf("sent to the client %+v: want the TLS alert and a reset", toClient)
				}
			} else {
				checkUnmarked(t, got)
				if len(toClient) != 0 {
					t.Errorf("sent to the client %+v: want nothing (audit mode)", toClient)
				}
			}
			if ev.Verdict != policy.Deny || ev.Reason != ReasonSNIMismatch || ev.Mode != mode || ev.Enforced != enforced || ev.Name != "evil.example" || ev.Close != close {
				t.Errorf("event %+v: want denied %s in %s mode, enforced %v, name evil.example, close %s", ev, ReasonSNIMismatch, mode, enforced, close)
			}
		})
	}
}

// TestServeQueueAuditLetThroughUnmarked: a flow pending at a reload to
// audit mode and then denied (no rule allows its server name, under the
// SYN's policy and the new one) goes on, a deny not enforced, but its
// held packets are accepted without the fast-allowed mark: that mark is
// kept by a later reload's firewall sweep while the rules are those of
// the enforce policy its SYN came under (the mode is no part of the
// fast path's fingerprint), and that policy never allowed it. Its
// conntrack entry stays pending, so after a reload back to enforce mode
// its next segment is queued and decided again (the policy denies it:
// cut, the denied mark, counted revoked), as the proxy cuts its own
// connection let through in audit mode at the switch (Proxy.again).
// Before, it got the fast-allowed mark, and a reload back to the same
// rules in enforce mode kept it: a connection the enforce policy denies
// went on.
func TestServeQueueAuditLetThroughUnmarked(t *testing.T) {
	r := newFastRig(t)
	dest := netip.AddrPortFrom(srvV4, 443)
	client := netip.AddrPortFrom(clientV4, 42861)
	_, isn := r.connect(t, client, dest)
	fastReload(t, r, fmt.Sprintf(testPolicy, policy.ModeAudit))
	hello := goClientHello(t, "evil.example")
	ids := r.stream(client, dest, isn, hello, 600, false)
	ev := r.evs.wait(t, "of the flow", func(ev audit.Event) bool { return ev.ClientPort == client.Port() })
	if ev.Verdict != policy.Deny || ev.Reason != policy.ReasonNoRule || ev.Enforced {
		t.Fatalf("event %+v: want denied %s, not enforced", ev, policy.ReasonNoRule)
	}
	for i, g := range r.q.wait(t, ids) {
		if g != (gotVerdict{v: nfq.Accept}) {
			t.Fatalf("held packet %d of %d: verdict %+v, want accepted without a mark", i, len(ids), g)
		}
	}
	fastReload(t, r, fmt.Sprintf(testPolicy, policy.ModeEnforce))
	revoked := counterValue(r.p.met.revoked.WithLabelValues(string(policy.ModeEnforce)))
	id := r.send(hookForward, tcpPacket(client, dest, isn+1+uint32(len(hello)), 5000, nfq.ACK|nfq.PSH, []byte("more")))
	repeatDenied := gotVerdict{v: nfq.Repeat, mark: fastMarks.Denied | operatorBit, setMark: true}
	if g := r.q.wait(t, []uint32{id})[0]; g != repeatDenied {
		t.Fatalf("its next segment after the reload back to enforce mode: verdict %+v, want %+v", g, repeatDenied)
	}
	if n := counterValue(r.p.met.revoked.WithLabelValues(string(policy.ModeEnforce))) - revoked; n != 1 {
		t.Errorf("reload_revoked_total{mode=enforce} rose by %v, want 1", n)
	}
}

// checkUnmarked: every held packet accepted, none with the fast-allowed
// mark (a connection let through in audit mode that no enforce policy
// allowed: TestServeQueueAuditLetThroughUnmarked).
func checkUnmarked(t *testing.T, got []gotVerdict) {
	t.Helper()
	for i, g := range got {
		if g != (gotVerdict{v: nfq.Accept}) {
			t.Fatalf("packet %d of %d: verdict %+v, want accepted without a mark", i, len(got), g)
		}
	}
}
