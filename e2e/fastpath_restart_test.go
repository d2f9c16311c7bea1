package e2e

import (
	"bufio"
	"context"
	"crypto/tls"
	"egressd/firewall"
	"egressd/internal/nfq"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestFastPathModeFlip: enforce → audit → enforce with the fast path. A
// connection the fast path allowed goes on through both switches; one
// the fast path took but had not decided yet (no hello) when the switch
// to audit came completes in audit mode; back in enforce, new
// connections are taken fast again (the queue reader served on through a
// ruleset that stopped queueing).
func TestFastPathModeFlip(t *testing.T) {
	tp := newTopo(t)
	d := newDaemon(t, tp, "")
	d.extra = []string{"--fast-path"}
	seed := testPolicy(t)
	d.writePolicy(enforcePolicy(t, seed))
	d.start()
	defer d.stop()
	d.dumpOnFailure()
	ka := dockerKeepAlive(t, tp, d)

	// Pending: the SYN taken fast, no byte sent yet.
	raw := pendingFast(t, tp, d)

	d.writePolicy(seed) // audit
	d.hup(true)
	if _, err := ka.get("/audit"); err != nil {
		t.Errorf("fast connection in audit mode: %v", err)
	}
	tc := tls.Client(raw, &tls.Config{ServerName: dockerName, RootCAs: tp.pool})
	tc.SetDeadline(time.Now().Add(5 * time.Second))
	pending := &keepAlive{name: dockerName, tc: tc, br: bufio.NewReader(tc)}
	if err := tc.Handshake(); err != nil {
		t.Errorf("the connection pending at the switch to audit: handshake: %v", err)
	} else if _, err := pending.get("/pending"); err != nil {
		t.Errorf("the connection pending at the switch to audit: %v", err)
	}
	if body, err := tp.curl(dockerName, 443, dockerIP4, "/audit-new", true); err != nil || !strings.Contains(body, "sni="+dockerName) {
		t.Errorf("a new connection in audit mode: %q %v", body, err)
	}

	d.writePolicy(enforcePolicy(t, seed))
	d.hup(true)
	if _, err := ka.get("/enforce-again"); err != nil {
		t.Errorf("the fast connection after enforce→audit→enforce: %v", err)
	}
	fast := func() float64 { return d.metric(`egress_proxy_fast_syns_total{result="fast"}`) }
	before := fast()
	if body, err := tp.curl(dockerName, 443, dockerIP4, "/enforce-new", true); err != nil || !strings.Contains(body, "sni="+dockerName) {
		t.Errorf("a new connection back in enforce mode: %q %v", body, err)
	}
	if got := fast() - before; got != 1 {
		t.Errorf("back in enforce: %v fast SYNs, want 1 (the queue reader still serves)", got)
	}
}

// TestFastPathRestart: egressd stopped with a live fast-allowed
// connection and one the fast path took but had not decided (no byte
// sent): the first goes on while egressd is stopped (the kernel forwards
// it) and new TLS connections fail (closed); started again with
// --fast-path, the first is kept and the second, whose hello now comes
// to a reader that never saw its SYN, is refused with a reset, not left
// to its client's timeout. Started again without --fast-path, the first
// is cut (its mark is no rule's) and the report says so.
func TestFastPathRestart(t *testing.T) {
	tp := newTopo(t)
	d := newDaemon(t, tp, "enforce")
	d.extra = []string{"--fast-path"}
	d.start()
	d.dumpOnFailure()
	ka := dockerKeepAlive(t, tp, d)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	raw, err := tp.lan.DialContext(ctx, "tcp", dockerIP4+":443")
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	d.stop()

	if _, err := ka.get("/stopped"); err != nil {
		t.Errorf("fast connection while egressd is stopped: %v", err)
	}
	if !newTLSFails(tp) {
		t.Errorf("a new TLS connection got out while egressd was stopped")
	}

	d.start()
	if _, err := ka.get("/restarted-fast"); err != nil {
		t.Errorf("fast connection after a restart with --fast-path: %v", err)
	}
	tc := tls.Client(raw, &tls.Config{ServerName: dockerName, RootCAs: tp.pool})
	tc.SetDeadline(time.Now().Add(5 * time.Second))
	if err := tc.Handshake(); !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("the connection pending at the stop, its hello after the restart: %v, want a reset (unknown-flow %v, inject errors %v)", err,
			d.metric(`egress_proxy_fast_errors_total{op="unknown-flow"}`), d.metric(`egress_proxy_fast_errors_total{op="inject"}`))
	}
	d.stop()

	d.extra = nil
	d.start()
	defer d.stop()
	if _, err := ka.get("/restarted-proxy"); err == nil {
		t.Errorf("the fast connection still served after a restart without --fast-path")
	}
	// Two dropped: the connection pending at the first stop, refused
	// shutdown (never allowed), and the fast one the restart without
	// --fast-path cut.
	waitReport(t, d, func(r *report) bool { return droppedFlows(r, 443, "tcp", true) == 2 })
	ka.close()
	if body, err := tp.curl(dockerName, 443, dockerIP4, "/proxy", true); err != nil || !strings.Contains(body, "sni="+dockerName) {
		t.Errorf("a new connection without the fast path: %q %v", body, err)
	}
}

// TestFastPathQueueTaken: another process holds the fast path's queue
// when egressd starts with --fast-path: egressd installs the ruleset
// without the fast path (no chain fastpath, no rule that queues), says
// so in one warning line, and the fast-path part is NOT RUNNING on
// /readyz (the operator asked for it); allowed TLS connections go
// through the proxy, denied ones are refused as before.
func TestFastPathQueueTaken(t *testing.T) {
	tp := newTopo(t)
	q, err := nfq.OpenConfig(nfq.Config{Queue: firewall.DefaultFastPathQueue, NetNS: "/var/run/netns/" + tp.gw.Name})
	if err != nil {
		t.Fatalf("binding the queue in the gateway: %v", err)
	}
	defer q.Close()
	d := newDaemon(t, tp, "enforce")
	d.extra = []string{"--fast-path"}
	d.unready = true
	d.start()
	defer d.stop()
	d.dumpOnFailure()
	code, body, err := d.get("/readyz")
	t.Logf("readyz: %d %v\n%s", code, err, body)
	if code != 503 || !strings.Contains(body, "fast-path") {
		t.Errorf("readyz %d, want 503 naming the fast-path part:\n%s", code, body)
	}
	// The JSON log goes through a buffer of its own: wait for the line
	// (the readiness summary, on stdout, can come first).
	d.waitLog(t, "fast path is off", 1)
	var warned []string
	for _, l := range strings.Split(d.logs(), "\n") {
		if strings.Contains(l, "fast path is off") && strings.Contains(l, "through the proxy") && strings.Contains(l, `"level":"WARN"`) {
			warned = append(warned, l)
		}
	}
	if len(warned) != 1 {
		t.Errorf("%d warning lines that the fast path is off and connections go through the proxy, want 1:\n%s", len(warned), strings.Join(warned, "\n"))
	}
	rs := tp.gw.MustRun("nft", "list", "ruleset")
	if !strings.Contains(rs, "table inet egressd") {
		t.Fatalf("no table inet egressd in the gateway:\n%s", rs)
	}
	if strings.Contains(rs, "chain fastpath") || strings.Contains(rs, "queue") {
		t.Errorf("the ruleset has the fast path (chain fastpath, a rule that queues) with its queue held by another process:\n%s", rs)
	}
	// What the next start reads the conntrack marks with: the layout
	// installed, without the fast path.
	if rec, err := os.ReadFile(filepath.Join(d.stateDir, "policy.firewall.json")); err != nil || !strings.Contains(string(rec), `"fast_path":false`) {
		t.Errorf("the firewall record does not say the fast path is off: %v\n%s", err, rec)
	}

	if st, addrs := tp.dig(t, dockerName, "A"); st != "NOERROR" || len(addrs) != 1 {
		t.Fatalf("dig %s: %s %v", dockerName, st, addrs)
	}
	if body, err := tp.curl(dockerName, 443, dockerIP4, "/taken", true); err != nil || !strings.Contains(body, "sni="+dockerName) {
		t.Errorf("an allowed TLS connection with the queue taken, through the proxy: %q %v", body, err)
	}
	ev := d.waitEvent(t, "the allowed connection's close", func(e flowEvent) bool {
		return e.Kind == "flow" && e.Dest == dockerIP4 && e.DestPort == 443 && e.Close != ""
	})
	if ev.Source != "proxy" || strings.HasPrefix(ev.Close, "fast-path") || ev.Verdict != "allow" {
		t.Errorf("the allowed connection's event: %v, want the proxy's, allowed, not closed fast-path", ev)
	}
	if out, err := tp.sClient(dockerIP4, 443, trackerName); err == nil {
		t.Errorf("SNI %s toward %s's address: the handshake completed\n%s", trackerName, dockerName, out)
	}
}

// TestFastPathNoNetAdmin: egressd run --fast-path without CAP_NET_ADMIN
// (which the queue needs): the fast-path part is NOT RUNNING on /readyz,
// and its reason says which capability it lacks, as the other parts'
// do. Before, it said "nfq: SO_RCVBUFFORCE: operation not permitted".
func TestFastPathNoNetAdmin(t *testing.T) {
	tp := newTopo(t)
	d := newDaemon(t, tp, "enforce")
	d.extra = []string{"--fast-path"}
	d.wrap = []string{"setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin", "--"}
	d.unready = true
	d.start()
	defer d.stop()
	d.dumpOnFailure()
	code, body, err := d.get("/readyz")
	if err != nil || code != 503 {
		t.Fatalf("readyz: %d %v, want 503", code, err)
	}
	var line string // the parts are listed "name: reason; name: reason"
	for _, part := range strings.Split(strings.TrimSpace(body), "; ") {
		if strings.Contains(part, "fast-path: ") {
			line = part
		}
	}
	if !strings.Contains(line, "needs CAP_NET_ADMIN") {
		t.Errorf("readyz's fast-path line does not name CAP_NET_ADMIN: %q\n%s", line, body)
	}
}
