package proxy

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"testing"
	"time"

	"egressd/audit"
	"egressd/internal/nfq"
	"egressd/policy"
)

// vpnOnly is a policy that no longer allows the rig's fast flows (to
// www.allowed.test on 443), in mode.
const vpnOnly = "version: 1\nmode: %s\nrules:\n  - name: vpn\n    to: [198.18.2.4/32]\n    ports: [8443/tcp]\n"

// fastReload swaps src in as the running policy and has the proxy decide
// its connections again, as the daemon's reload does; it returns the
// engine.
func fastReload(t *testing.T, r *fastRig, src string) *policy.Engine {
	t.Helper()
	eng, err := policy.Compile("p", []byte(src))
	if err != nil {
		t.Fatal(err)
	}
	r.p.deps.Policy.Swap(eng)
	r.p.Redecide()
	return eng
}

// reportFromLog writes evs to an event log (a Journal in a state
// directory of the test's) and reads it back as `egressd report` does
// (audit.LoadDir), under eng.
func reportFromLog(t *testing.T, evs []audit.Event, eng *policy.Engine) *audit.Report {
	t.Helper()
	dir := t.TempDir()
	log := slog.New(slog.DiscardHandler)
	j, _, err := audit.OpenJournal(audit.JournalConfig{Dir: dir, Logger: log}, audit.NewLedger(eng, audit.LedgerOptions{}))
	if err != nil {
		t.Fatal(err)
	}
	for _, ev := range evs {
		j.Emit(ev)
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}
	l, _, err := audit.LoadDir(dir, eng, audit.LedgerOptions{}, log)
	if err != nil {
		t.Fatal(err)
	}
	return l.Report(audit.ReportOptions{})
}

// eventsOf returns the events of the connection from client's port.
func (e *events) of(port uint16) []audit.Event {
	e.mu.Lock()
	defer e.mu.Unlock()
	var out []audit.Event
	for _, ev := range e.evs {
		if ev.ClientPort == port {
			out = append(out, ev)
		}
	}
	return out
}

// checkReportDropped: the report counts the one connection evs record as
// dropped (enforced as said) for reason, and not under the rule
// "allowed".
func checkReportDropped(t *testing.T, evs []audit.Event, eng *policy.Engine, enforced bool, reason string) {
	t.Helper()
	r := reportFromLog(t, evs, eng)
	for _, rr := range r.Rules {
		if rr.Name == "allowed" && rr.Flows != 0 {
			t.Errorf("report: rule allowed %+v: the connection still counts as allowed", rr)
		}
	}
	if len(r.Dropped) != 1 || r.Dropped[0].Flows != 1 || r.Dropped[0].Enforced != enforced || r.Dropped[0].Reason != reason || r.Totals.Flows != 1 {
		t.Errorf("report: dropped %+v, totals %+v: want the connection dropped once (enforced %v, reason %s)", r.Dropped, r.Totals, enforced, reason)
	}
}

// TestServeQueueSilentReloadEvents: a silent client's flow, allowed on the
// address with nothing marked and its event written, is decided again
// at its first segment under the policy running then
// (TestServeQueueSilentReload). When a reload since denies it, the events
// must say so: in enforce mode a second event of the connection (same
// start) says it was cut (denied, enforced, the new decision's reason,
// close policy-revoked); in audit mode, where it goes on, that the new
// policy would deny it. The report read from the event log then counts it
// dropped, not under its old rule. Before, the cut got a metric and a log
// line only: the events, and the report, still said allowed.
func TestServeQueueSilentReloadEvents(t *testing.T) {
	for _, c := range []struct {
		mode     policy.Mode
		verdict  gotVerdict
		close    string
		enforced bool
	}{
		{policy.ModeEnforce, gotVerdict{v: nfq.Repeat, mark: fastMarks.Denied | operatorBit, setMark: true}, closeRevoked, true},
		{policy.ModeAudit, gotVerdict{v: nfq.Repeat, mark: fastMarks.Allowed | operatorBit, setMark: true}, closeFast, false},
	} {
		t.Run(string(c.mode), func(t *testing.T) {
			r := newFastRig(t, func(c *Config) { c.FirstByteWait = 200 * time.Millisecond })
			dest := netip.AddrPortFrom(srvV4, 443)
			client := netip.AddrPortFrom(clientV4, 42511)
			_, isn := r.connect(t, client, dest)
			first := r.evs.wait(t, "of the flow", func(ev audit.Event) bool { return ev.ClientPort == client.Port() })
			if first.Verdict != policy.Allow || first.Close != closeFast {
				t.Fatalf("silent client: event %+v: want allowed on the address, close %s", first, closeFast)
			}
			eng := fastReload(t, r, fmt.Sprintf(vpnOnly, c.mode))
			revoked := counterValue(r.p.met.revoked.WithLabelValues(string(c.mode)))
			id := r.send(hookForward, tcpPacket(client, dest, isn+1, 5000, nfq.ACK|nfq.PSH, []byte("EHLO client.test\r\n")))
			if g := r.q.wait(t, []uint32{id})[0]; g != c.verdict {
				t.Fatalf("the first segment after the reload: verdict %+v, want %+v", g, c.verdict)
			}
			if n := counterValue(r.p.met.revoked.WithLabelValues(string(c.mode))) - revoked; n != 1 {
				t.Errorf("reload_revoked_total{mode=%s} rose by %v, want 1", c.mode, n)
			}
			second := r.evs.wait(t, "of the connection's new decision", func(ev audit.Event) bool {
				return ev.ClientPort == client.Port() && ev.Verdict == policy.Deny
			})
			if second.Close != c.close || second.Enforced != c.enforced || second.Mode != c.mode || second.Reason != policy.ReasonNoRule ||
				!second.Time.Equal(first.Time) || second.Dest != first.Dest || second.Source != audit.SourceProxy || !second.Revised || first.Revised {
				t.Errorf("event %+v: want the flow of %v denied %s, enforced %v, close %s, revised (the first not)", second, first.Time, policy.ReasonNoRule, c.enforced, c.close)
			}
			evs := r.evs.of(client.Port())
			if len(evs) != 2 {
				t.Errorf("%d events of the connection, want 2 (its decision, its new decision)", len(evs))
			}
			checkReportDropped(t, evs, eng, c.enforced, policy.ReasonNoRule)
		})
	}
}

// TestServeQueuePendingReloadAudit: a flow pending across a reload to
// audit mode whose new policy would deny it goes on (audit mode), and its
// event says the new policy would deny it (not enforced), as a reload
// records the proxy's own connections. Before, it was recorded allowed
// under its old rule.
func TestServeQueuePendingReloadAudit(t *testing.T) {
	r := newFastRig(t)
	dest := netip.AddrPortFrom(srvV4, 443)
	hello := goClientHello(t, "www.allowed.test")
	client := netip.AddrPortFrom(clientV4, 42611)
	_, isn := r.connect(t, client, dest)
	ids := r.stream(client, dest, isn, hello[:100], 100, false)
	eng := fastReload(t, r, fmt.Sprintf(vpnOnly, policy.ModeAudit))
	ids = append(ids, r.send(hookForward, tcpPacket(client, dest, isn+1+100, 5000, nfq.ACK|nfq.PSH, hello[100:])))
	checkAllowed(t, r.q.wait(t, ids))
	ev := r.evs.wait(t, "of the flow", func(ev audit.Event) bool { return ev.ClientPort == client.Port() })
	if ev.Verdict != policy.Deny || ev.Enforced || ev.Mode != policy.ModeAudit || ev.Close != closeFast {
		t.Errorf("event %+v: want a would-be deny of audit mode, close %s", ev, closeFast)
	}
	checkReportDropped(t, r.evs.of(client.Port()), eng, false, ev.Reason)
}

// TestServeQueueShutdownPending: a flow still pending when ServeQueue
// ends (the proxy's shutdown) was never allowed: it is refused,
// ReasonShutdown, enforced, close shutdown, its held packets dropped.
// Before, a silent client's flow was decided on the address at the
// shutdown and its event said allowed, close shutdown; one with part of
// a hello held said hello-bad.
func TestServeQueueShutdownPending(t *testing.T) {
	pendingAtEnd(t, func(r *fastRig) {
		if err := r.stop(); err != nil {
			t.Fatalf("ServeQueue: %v", err)
		}
	}, ReasonShutdown, closeShutdown)
}

// TestServeQueueFailedPending: a flow still pending when the queue's
// reader fails (a read error: ServeQueue returns a QueueError, egressd
// goes on without the fast path) is refused as at a shutdown, but with
// a reason of its own, fast-path-failed, close fast-path-failed: the
// proxy did not shut down. Before, its event said shutdown.
func TestServeQueueFailedPending(t *testing.T) {
	pendingAtEnd(t, func(r *fastRig) {
		err := r.failQueue(errors.New("nfq: read: broken"))
		var qerr *QueueError
		if !errors.As(err, &qerr) || qerr.Pending != 2 {
			t.Fatalf("ServeQueue: %v, want a QueueError with 2 pending", err)
		}
	}, ReasonFastPathFailed, closeFastFailed)
}

// pendingAtEnd has two flows pending (a silent client's, one with part
// of a hello held) when end ends ServeQueue, and checks that both are
// refused: the held packets dropped, each event denied, enforced, with
// reason and closed.
func pendingAtEnd(t *testing.T, end func(*fastRig), reason, closed string) {
	t.Helper()
	r := newFastRig(t) // the first-byte wait (5 s) outlasts the test's steps
	dest := netip.AddrPortFrom(srvV4, 443)
	silent := netip.AddrPortFrom(clientV4, 42711)
	partial := netip.AddrPortFrom(clientV4, 42712)
	r.connect(t, silent, dest)
	_, isn := r.connect(t, partial, dest)
	ids := r.stream(partial, dest, isn, goClientHello(t, "www.allowed.test")[:100], 100, false)
	end(r)
	checkDenied(t, r.q.wait(t, ids))
	for _, c := range []netip.AddrPort{silent, partial} {
		ev := r.evs.wait(t, "of the flow", func(ev audit.Event) bool { return ev.ClientPort == c.Port() })
		if ev.Verdict != policy.Deny || !ev.Enforced || ev.Reason != reason || ev.Close != closed {
			t.Errorf("port %d: event %+v: want denied %s, enforced, close %s", c.Port(), ev, reason, closed)
		}
	}
}

// TestServeQueueSilentAcrossReloadAudit: a silent client's flow decided
// after a reload to audit mode whose policy would deny it is recorded so
// at its decision (a deny not enforced); its first segment, decided
// again, gets the allowed mark and no second event saying the same.
func TestServeQueueSilentAcrossReloadAudit(t *testing.T) {
	r := newFastRig(t, func(c *Config) { c.FirstByteWait = 300 * time.Millisecond })
	dest := netip.AddrPortFrom(srvV4, 443)
	client := netip.AddrPortFrom(clientV4, 42521)
	_, isn := r.connect(t, client, dest)
	fastReload(t, r, fmt.Sprintf(vpnOnly, policy.ModeAudit))
	ev := r.evs.wait(t, "of the flow", func(ev audit.Event) bool { return ev.ClientPort == client.Port() })
	if ev.Verdict != policy.Deny || ev.Enforced || ev.Mode != policy.ModeAudit || ev.Close != closeFast {
		t.Fatalf("event %+v: want a would-be deny of audit mode, close %s", ev, closeFast)
	}
	id := r.send(hookForward, tcpPacket(client, dest, isn+1, 5000, nfq.ACK|nfq.PSH, []byte("EHLO client.test\r\n")))
	if g := r.q.wait(t, []uint32{id})[0]; g != (gotVerdict{v: nfq.Repeat, mark: fastMarks.Allowed | operatorBit, setMark: true}) {
		t.Fatalf("the first segment: verdict %+v, want repeat allowed", g)
	}
	// The queue's goroutine answers packets in turn: once a later one has
	// its verdict, the first segment's handling is over.
	id = r.send(hookForward, tcpPacket(client, dest, isn+1+18, 5000, nfq.ACK|nfq.PSH, []byte("QUIT\r\n")))
	r.q.wait(t, []uint32{id})
	if evs := r.evs.of(client.Port()); len(evs) != 1 {
		t.Errorf("%d events of the connection, want 1: %+v", len(evs), evs)
	}
}

// TestServeQueueShutdownAcrossReload: a flow still pending at the
// shutdown, after a reload whose policy denies it, is recorded refused
// shutdown, and the reload is not said to have revoked it: the shutdown
// refused it (reload_revoked_total{mode=enforce} does not rise). Before,
// the decision across the reload counted it revoked, then the shutdown
// refused it: the counter said a reload cut a connection no event said
// so of.
func TestServeQueueShutdownAcrossReload(t *testing.T) {
	r := newFastRig(t) // the first-byte wait (5 s) outlasts the test's steps
	dest := netip.AddrPortFrom(srvV4, 443)
	silent := netip.AddrPortFrom(clientV4, 42721)
	r.connect(t, silent, dest)
	fastReload(t, r, fmt.Sprintf(vpnOnly, policy.ModeEnforce))
	revoked := counterValue(r.p.met.revoked.WithLabelValues(string(policy.ModeEnforce)))
	if err := r.stop(); err != nil {
		t.Fatalf("ServeQueue: %v", err)
	}
	ev := r.evs.wait(t, "of the flow", func(ev audit.Event) bool { return ev.ClientPort == silent.Port() })
	if ev.Verdict != policy.Deny || !ev.Enforced || ev.Reason != ReasonShutdown || ev.Close != closeShutdown {
		t.Errorf("event %+v: want denied %s, enforced, close %s", ev, ReasonShutdown, closeShutdown)
	}
	if n := counterValue(r.p.met.revoked.WithLabelValues(string(policy.ModeEnforce))) - revoked; n != 0 {
		t.Errorf("reload_revoked_total{mode=enforce} rose by %v, want 0: the shutdown refused the connection", n)
	}
}

// TestServeQueueSilentRecredited: a silent client's flow recorded, at a
// decision across a reload to audit mode, as a would-be deny, whose first
// segment comes after a reload whose policy allows it again, goes on
// (audit mode either way), and a second event of the connection (its
// start, the new decision: allowed under its rule) says so: the report
// counts it under the rule, not as one enforce would drop, as the proxy
// records its own connections (Redecide: a would-be deny the new policy
// allows is credited to the rule) and the ledger reads it (recredited).
// Before, its only event stayed the would-be deny: the report listed a
// connection the policy running allows as one enforce would drop.
func TestServeQueueSilentRecredited(t *testing.T) {
	r := newFastRig(t, func(c *Config) { c.FirstByteWait = 300 * time.Millisecond })
	dest := netip.AddrPortFrom(srvV4, 443)
	client := netip.AddrPortFrom(clientV4, 42531)
	_, isn := r.connect(t, client, dest)
	fastReload(t, r, fmt.Sprintf(vpnOnly, policy.ModeAudit))
	first := r.evs.wait(t, "of the flow", func(ev audit.Event) bool { return ev.ClientPort == client.Port() })
	if first.Verdict != policy.Deny || first.Enforced || first.Mode != policy.ModeAudit {
		t.Fatalf("event %+v: want a would-be deny of audit mode", first)
	}
	eng := fastReload(t, r, fmt.Sprintf(testPolicy, policy.ModeAudit))
	id := r.send(hookForward, tcpPacket(client, dest, isn+1, 5000, nfq.ACK|nfq.PSH, []byte("EHLO client.test\r\n")))
	if g := r.q.wait(t, []uint32{id})[0]; g != (gotVerdict{v: nfq.Repeat, mark: fastMarks.Allowed | operatorBit, setMark: true}) {
		t.Fatalf("the first segment: verdict %+v, want repeat allowed", g)
	}
	second := r.evs.wait(t, "of the connection's new decision", func(ev audit.Event) bool {
		return ev.ClientPort == client.Port() && ev.Verdict == policy.Allow
	})
	if second.Rule != "allowed" || second.Enforced || second.Mode != policy.ModeAudit || !second.Time.Equal(first.Time) || second.Source != audit.SourceProxy || !second.Revised || first.Revised {
		t.Errorf("event %+v: want the flow of %v allowed under rule allowed, audit mode, revised (the first not)", second, first.Time)
	}
	evs := r.evs.of(client.Port())
	if len(evs) != 2 {
		t.Errorf("%d events of the connection, want 2 (its decision, its new decision)", len(evs))
	}
	rep := reportFromLog(t, evs, eng)
	var flows uint64
	for _, rr := range rep.Rules {
		if rr.Name == "allowed" {
			flows = rr.Flows
		}
	}
	if flows != 1 || len(rep.Dropped) != 0 || rep.Totals.Flows != 1 {
		t.Errorf("report: rule allowed %d flows, dropped %+v, totals %+v: want the connection once, under allowed", flows, rep.Dropped, rep.Totals)
	}
}

// TestFastRevisedAfterFirst: a flow allowed with nothing marked (a
// silent client's, decided on the address by a worker) keeps its event
// (fastFlow.rec) for its first segment's new decision. When that segment
// comes, after a reload that denies it, between the decision's unlock and
// the decision's event (the queue's goroutine runs while the worker
// writes), the connection's second event (revised, the new decision)
// must still follow its first: the ledger drops a revised event of a
// flow it does not hold, and the first (allowed) would stand for a
// connection enforce cut. The test holds the worker there
// (Config.fastRecording), reloads, and has the first segment answered.
// Before, the revised event was written first, and the report counted
// the connection under its old rule.
func TestFastRevisedAfterFirst(t *testing.T) {
	for _, c := range []struct {
		mode     policy.Mode
		verdict  benchQueue
		close    string
		enforced bool
	}{
		{policy.ModeEnforce, benchQueue{id: 2, v: nfq.Repeat, mark: fastMarks.Denied | operatorBit}, closeRevoked, true},
		{policy.ModeAudit, benchQueue{id: 2, v: nfq.Repeat, mark: fastMarks.Allowed | operatorBit}, closeFast, false},
	} {
		t.Run(string(c.mode), func(t *testing.T) {
			evs := &events{}
			reached, resume := make(chan struct{}), make(chan struct{})
			bf := newBenchFastTo(t, 1, evs, func(cfg *Config) {
				cfg.FirstByteWait = 5 * time.Millisecond // decided on the address, by a worker
				cfg.fastRecording = func(flowKey) {
					close(reached)
					<-resume
				}
			})
			s, key := bf.s, bf.keys[0]
			isn := uint32(0) // newBenchFast's flow 0
			s.packet(nfq.Packet{ID: 1, Mark: operatorBit, Hook: hookPrerouting, InIf: lanIf, HWAddr: clientHW, HWAddrLen: 6, Data: bf.syn[0]})
			if bf.q.id != 1 || bf.q.mark != fastMarks.Pending|operatorBit {
				t.Fatalf("SYN verdict %+v, want accept-pending", *bf.q)
			}
			select {
			case <-reached:
			case <-time.After(10 * time.Second):
				t.Fatal("the silent flow was not decided in 10 s")
			}
			eng, err := policy.Compile("p", []byte(fmt.Sprintf(vpnOnly, c.mode)))
			if err != nil {
				t.Fatal(err)
			}
			s.p.deps.Policy.Swap(eng)
			done := make(chan struct{})
			go func() {
				defer close(done)
				s.packet(nfq.Packet{ID: 2, Mark: operatorBit, Hook: hookForward, InIf: lanIf,
					Data: tcpPacket(key.client, key.dest, isn+1, 5000, nfq.ACK|nfq.PSH, []byte("EHLO client.test\r\n"))})
			}()
			// The segment's handling ends, or waits for the flow's first
			// event (the worker, held, has not written it).
			for deadline := time.Now().Add(10 * time.Second); ; {
				select {
				case <-done:
				default:
					if !revisedWaits(s, key) {
						if time.Now().After(deadline) {
							close(resume)
							t.Fatal("the first segment was neither answered nor waiting in 10 s")
						}
						time.Sleep(time.Millisecond)
						continue
					}
				}
				break
			}
			close(resume)
			<-done
			s.wg.Wait() // the decision concluded: its event written
			if *bf.q != c.verdict {
				t.Errorf("the first segment: verdict %+v, want %+v", *bf.q, c.verdict)
			}
			got := evs.of(key.client.Port())
			if len(got) != 2 {
				t.Fatalf("%d events of the connection, want 2 (its decision, its new decision): %+v", len(got), got)
			}
			first, second := got[0], got[1]
			if first.Revised || first.Verdict != policy.Allow || first.Close != closeFast {
				t.Errorf("the connection's first event %+v: want its decision (allowed on the address, close %s, not revised)", first, closeFast)
			}
			if !second.Revised || second.Verdict != policy.Deny || second.Enforced != c.enforced || second.Close != c.close || !second.Time.Equal(first.Time) {
				t.Errorf("the connection's second event %+v: want the new decision (denied, enforced %v, close %s, revised, the first's start)", second, c.enforced, c.close)
			}
			checkReportDropped(t, got, eng, c.enforced, policy.ReasonNoRule)
		})
	}
}

// revisedWaits reports whether a revised event of key's flow waits for
// the flow's first event (TestFastRevisedAfterFirst).
func revisedWaits(s *fastQueue, key flowKey) bool {
	s.mu.Lock()
	fl := s.flows[key]
	s.mu.Unlock()
	if fl == nil {
		return false
	}
	fl.mu.Lock()
	defer fl.mu.Unlock()
	return fl.recordedC != nil && !fl.recorded
}
