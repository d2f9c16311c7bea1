package e2e

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"egressd/firewall"
	"egressd/internal/nfq"
)

// fastPathOffLines are egressd's warning lines that the fast path is
// off, once at least one is written (the JSON log is buffered).
func fastPathOffLines(t *testing.T, d *daemon) []string {
	t.Helper()
	d.waitLog(t, "the fast path is off", 1)
	var warned []string
	for _, l := range strings.Split(d.logs(), "\n") {
		if strings.Contains(l, "fast path is off") || strings.Contains(l, `"part":"fast-path"`) {
			warned = append(warned, l)
		}
	}
	return warned
}

// pendingFast opens a TCP connection from the LAN client to the docker
// host's port 443 that the fast path takes (one more fast SYN) and that
// sends no byte: a connection pending a decision. It is closed at the
// test's end.
func pendingFast(t *testing.T, tp *topo, d *daemon) net.Conn {
	t.Helper()
	fast := func() float64 { return d.metric(`egress_proxy_fast_syns_total{result="fast"}`) }
	before := fast()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	raw, err := tp.lan.DialContext(ctx, "tcp", dockerIP4+":443")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { raw.Close() })
	if got := fast() - before; got != 1 {
		t.Fatalf("the pending connection: %v fast SYNs, want 1", got)
	}
	return raw
}

// noQueueRuleset fails t when the gateway's ruleset has the fast path
// (chain fastpath, a rule that queues), or no table inet egressd.
func noQueueRuleset(t *testing.T, tp *topo, when string) {
	t.Helper()
	rs := tp.gw.MustRun("nft", "list", "ruleset")
	if !strings.Contains(rs, "table inet egressd") {
		t.Fatalf("%s: no table inet egressd in the gateway:\n%s", when, rs)
	}
	if strings.Contains(rs, "chain fastpath") || strings.Contains(rs, "queue") {
		t.Errorf("%s: the ruleset has the fast path (chain fastpath, a rule that queues):\n%s", when, rs)
	}
}

// TestFastPathQueueFails: the fast path's queue reader fails while
// egressd runs (a read error of its socket, made by the test hook
// EGRESSD_TEST_BREAK_FAST_QUEUE, only in the e2e build: tag egressd_e2e,
// cmd/egressd/testhook_e2e.go). egressd puts the ruleset in again
// without the fast path, as a start whose queue is taken does: new TLS
// connections go through the proxy (allowed ones get out, an SNI that is
// not the name's is refused), one warning line says so with the
// connections pending a decision lost (one here: a SYN taken fast, no
// byte sent), whose event says refused fast-path-failed (before session
// 36, shutdown, though egressd did not stop), /readyz names the part,
// the record says fast_path false; the fast-allowed connection open at
// the failure is cut, and the firewall's line counts it. Before, the
// ruleset went on queueing to the queue nobody read: every new
// connection to port 443 timed out until a restart.
func TestFastPathQueueFails(t *testing.T) {
	tp := newTopo(t)
	d := newDaemon(t, tp, "enforce")
	d.extra = []string{"--fast-path"}
	trigger := filepath.Join(t.TempDir(), "break")
	d.wrap = []string{"env", "EGRESSD_TEST_BREAK_FAST_QUEUE=" + trigger}
	d.start()
	defer d.stop()
	d.dumpOnFailure()
	ka := dockerKeepAlive(t, tp, d)
	raw := pendingFast(t, tp, d)

	if err := os.WriteFile(trigger, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	warned := fastPathOffLines(t, d)
	t.Logf("%s", strings.Join(warned, "\n"))
	if len(warned) != 1 || !strings.Contains(warned[0], `"level":"WARN"`) || !strings.Contains(warned[0], "queue reader failed") ||
		!strings.Contains(warned[0], "through the proxy") || !strings.Contains(warned[0], `"pending_lost":1`) {
		t.Errorf("%d lines say the fast path is off, want one warning that its reader failed, connections go through the proxy, and one pending connection is lost:\n%s",
			len(warned), strings.Join(warned, "\n"))
	}
	// The lost connection's event: refused for the failure, not for a
	// shutdown egressd did not make. The proxy's (the fast path's), of
	// this flow: the capture may record the same connection.
	local := raw.LocalAddr().(*net.TCPAddr)
	ev := d.waitEvent(t, "the connection pending at the failure", func(e flowEvent) bool {
		return e.Kind == "flow" && e.Source == "proxy" && e.Client == local.IP.String() && e.ClientPort == local.Port &&
			e.Dest == dockerIP4 && e.DestPort == 443 && e.Proto == "tcp"
	})
	if ev.Verdict != "deny" || !ev.Enforced || ev.Reason != "fast-path-failed" || ev.Close != "fast-path-failed" {
		t.Errorf("the connection pending at the failure: event %v, want denied fast-path-failed, enforced, close fast-path-failed", ev)
	}
	code, body, err := d.get("/readyz")
	if err != nil || code != 503 || !strings.Contains(body, "fast-path") {
		t.Errorf("readyz %d %v, want 503 naming the fast-path part:\n%s", code, err, body)
	}
	noQueueRuleset(t, tp, "after the queue reader failed")
	if rec, err := os.ReadFile(filepath.Join(d.stateDir, "policy.firewall.json")); err != nil || !strings.Contains(string(rec), `"fast_path":false`) {
		t.Errorf("the firewall record does not say the fast path is off: %v\n%s", err, rec)
	}

	// New connections: the proxy's.
	if body, err := tp.curl(dockerName, 443, dockerIP4, "/after", true); err != nil || !strings.Contains(body, "sni="+dockerName) {
		t.Errorf("an allowed TLS connection after the queue reader failed: %q %v", body, err)
	}
	// The proxy's own connection: allowed, closed by the proxy, not
	// handed to the kernel.
	d.waitEvent(t, "the allowed connection through the proxy", func(e flowEvent) bool {
		return e.Kind == "flow" && e.Dest == dockerIP4 && e.DestPort == 443 && e.Source == "proxy" && e.Verdict == "allow" &&
			e.Close != "" && !strings.HasPrefix(e.Close, "fast-path")
	})
	if out, err := tp.sClient(dockerIP4, 443, trackerName); err == nil {
		t.Errorf("SNI %s toward %s's address after the fallback: the handshake completed\n%s", trackerName, dockerName, out)
	}

	// The fast-allowed connection: cut (its mark is no rule's without
	// the fast path), and the firewall's line says so.
	if _, err := ka.get("/after-failure"); err == nil {
		t.Errorf("the fast-allowed connection still served after the fallback")
	}
	d.waitLog(t, `"flows_cut":1`, 1)
}

// TestFastPathProxyFails: proxy.New refuses its configuration after the
// fast path's queue was opened (a negative hello timeout, given by the
// test hook EGRESSD_TEST_BREAK_PROXY_CONFIG, only in the e2e build:
// cmd/egressd/testhook_e2e.go; no flag of egressd leads there since
// --inspect with --state-dir "", which this test used, is a usage
// error). Nobody would read the queue: egressd closes it and installs
// the ruleset without the fast path, and says so in one warning line;
// /readyz names both parts. Before, the ruleset queued the new
// connections to port 443 to the open queue nobody read.
func TestFastPathProxyFails(t *testing.T) {
	tp := newTopo(t)
	d := newDaemon(t, tp, "enforce")
	d.extra = []string{"--fast-path"}
	d.wrap = []string{"env", "EGRESSD_TEST_BREAK_PROXY_CONFIG=1"}
	d.unready = true
	d.start()
	defer d.stop()
	d.dumpOnFailure()
	code, body, err := d.get("/readyz")
	if err != nil || code != 503 || !strings.Contains(body, "fast-path") || !strings.Contains(body, "proxy: ") {
		t.Errorf("readyz %d %v, want 503 naming the proxy and fast-path parts:\n%s", code, err, body)
	}
	warned := fastPathOffLines(t, d)
	if len(warned) != 1 || !strings.Contains(warned[0], `"level":"WARN"`) || !strings.Contains(warned[0], "proxy") {
		t.Errorf("%d lines say the fast path is off, want one warning naming the proxy:\n%s", len(warned), strings.Join(warned, "\n"))
	}
	noQueueRuleset(t, tp, "with the proxy not running")
	// The queue is free: egressd closed it.
	q, err := nfq.OpenConfig(nfq.Config{Queue: firewall.DefaultFastPathQueue, NetNS: "/var/run/netns/" + tp.gw.Name})
	if err != nil {
		t.Errorf("the fast path's queue is still held with the proxy not running: %v", err)
	} else {
		q.Close()
	}
}

// TestFastPathAudit: --fast-path in audit mode, which has no fast path.
// A start in audit mode opens no queue (another process may have it)
// and is ready; a reload to enforce opens it then and new TLS
// connections are taken fast. With the queue held by another process,
// the start in audit mode is as ready and says nothing of the fast
// path; the reload to enforce installs the ruleset without it, as a
// start in enforce mode does, with its one warning line, and the
// fast-path part is then not running. Before, /readyz was 503 in audit
// mode for a queue audit mode does not use.
// Subtest guard: the firewall is installed in audit mode (--guard-wan),
// and the reload replaces its ruleset rather than installing the first.
func TestFastPathAudit(t *testing.T) {
	for _, c := range []struct {
		name         string
		taken, guard bool
	}{{"free", false, false}, {"taken", true, false}, {"taken-guard", true, true}} {
		t.Run(c.name, func(t *testing.T) { testFastPathAudit(t, c.taken, c.guard) })
	}
}

func testFastPathAudit(t *testing.T, taken, guard bool) {
	tp := newTopo(t)
	gwNS := "/var/run/netns/" + tp.gw.Name
	if taken {
		q, err := nfq.OpenConfig(nfq.Config{Queue: firewall.DefaultFastPathQueue, NetNS: gwNS})
		if err != nil {
			t.Fatalf("binding the queue in the gateway: %v", err)
		}
		defer q.Close()
	}
	d := newDaemon(t, tp, "") // the policy file's mode: audit
	d.extra = []string{"--fast-path"}
	if guard {
		d.extra = append(d.extra, "--guard-wan")
	}
	d.start() // waits for /readyz 200
	defer d.stop()
	d.dumpOnFailure()
	if !taken {
		// Not held by egressd in audit mode.
		q, err := nfq.OpenConfig(nfq.Config{Queue: firewall.DefaultFastPathQueue, NetNS: gwNS})
		if err != nil {
			t.Errorf("the fast path's queue is held in audit mode: %v", err)
		} else {
			q.Close()
		}
	}
	d.writePolicy(enforcePolicy(t, testPolicy(t)))
	d.hup(true)
	// The start's lines, up to "egressd running", are in the log file
	// once the reload's are (the JSON log is buffered, in order).
	start, _, found := strings.Cut(d.logs(), `"msg":"egressd running"`)
	if !found {
		t.Fatalf("no line says egressd is running:\n%s", d.logs())
	}
	if strings.Contains(start, "fast path is off") {
		t.Errorf("audit mode says the fast path is off:\n%s", start)
	}
	if st, addrs := tp.dig(t, dockerName, "A"); st != "NOERROR" || len(addrs) != 1 {
		t.Fatalf("dig %s: %s %v", dockerName, st, addrs)
	}
	fast := d.metric(`egress_proxy_fast_syns_total{result="fast"}`)
	if body, err := tp.curl(dockerName, 443, dockerIP4, "/enforce", true); err != nil || !strings.Contains(body, "sni="+dockerName) {
		t.Errorf("an allowed TLS connection after the reload to enforce: %q %v", body, err)
	}
	got := d.metric(`egress_proxy_fast_syns_total{result="fast"}`) - fast
	code, body, err := d.get("/readyz")
	if !taken {
		if got != 1 {
			t.Errorf("after the reload to enforce: %v fast SYNs, want 1", got)
		}
		if err != nil || code != 200 {
			t.Errorf("readyz after the reload to enforce: %d %v\n%s", code, err, body)
		}
		return
	}
	if got != 0 {
		t.Errorf("after the reload to enforce with the queue taken: %v fast SYNs, want 0", got)
	}
	if err != nil || code != 503 || !strings.Contains(body, "fast-path") {
		t.Errorf("readyz %d %v after the reload to enforce with the queue taken, want 503 naming the fast-path part:\n%s", code, err, body)
	}
	if warned := fastPathOffLines(t, d); len(warned) != 1 || !strings.Contains(warned[0], `"level":"WARN"`) {
		t.Errorf("%d lines say the fast path is off, want one warning:\n%s", len(warned), strings.Join(warned, "\n"))
	}
	noQueueRuleset(t, tp, "after the reload to enforce with the queue taken")
	if rec, err := os.ReadFile(filepath.Join(d.stateDir, "policy.firewall.json")); err != nil || !strings.Contains(string(rec), `"fast_path":false`) {
		t.Errorf("the firewall record does not say the fast path is off: %v\n%s", err, rec)
	}
}

// TestFastPathAuditRoundTrip: a start in enforce mode with --fast-path
// opens the queue; a reload to audit keeps it open and read (the audit
// ruleset queues nothing: no fast SYN), and the reload back to enforce
// neither opens it again (it is egressd's already) nor turns the fast
// path off: new TLS connections are taken fast again, /readyz stays 200
// and no line says the fast path is off. (The reload to enforce opens
// the queue only when none is open: a start in audit mode.)
func TestFastPathAuditRoundTrip(t *testing.T) {
	tp := newTopo(t)
	d := newDaemon(t, tp, "") // the policy file's mode
	d.writePolicy(enforcePolicy(t, testPolicy(t)))
	d.extra = []string{"--fast-path"}
	d.start()
	defer d.stop()
	d.dumpOnFailure()
	if st, addrs := tp.dig(t, dockerName, "A"); st != "NOERROR" || len(addrs) != 1 {
		t.Fatalf("dig %s: %s %v", dockerName, st, addrs)
	}
	fastTLS := func(when string, want float64) {
		t.Helper()
		before := d.metric(`egress_proxy_fast_syns_total{result="fast"}`)
		if body, err := tp.curl(dockerName, 443, dockerIP4, "/"+when, true); err != nil || !strings.Contains(body, "sni="+dockerName) {
			t.Errorf("%s: an allowed TLS connection: %q %v", when, body, err)
		}
		if got := d.metric(`egress_proxy_fast_syns_total{result="fast"}`) - before; got != want {
			t.Errorf("%s: %v fast SYNs, want %v", when, got, want)
		}
	}
	fastTLS("enforce", 1)
	d.writePolicy(testPolicy(t))
	d.hup(true)
	fastTLS("audit", 0)
	d.writePolicy(enforcePolicy(t, testPolicy(t)))
	d.hup(true)
	fastTLS("enforce-again", 1)
	if code, body, err := d.get("/readyz"); err != nil || code != 200 {
		t.Errorf("readyz after enforce, audit, enforce: %d %v\n%s", code, err, body)
	}
	if strings.Contains(d.logs(), "fast path is off") {
		t.Errorf("a line says the fast path is off after enforce, audit, enforce:\n%s", d.logs())
	}
}
