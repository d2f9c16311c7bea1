package capture

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"egressd/audit"
	"egressd/policy"
)

// TestRedecideAuditClippedPath: a reload in audit mode judges a plain
// HTTP connection whose first request's path was longer than the record
// keeps on the start kept (policy.Input.PathCut): a host/path rule that
// start decides ("/api/*", a path beginning "/api/") is credited, not a
// later host rule; one whose lead it does not begin with does not match,
// so a connection allowed only by a host/path rule the new policy
// replaces becomes a would-be deny. Where the start cannot decide an
// earlier host/path rule ("/m/*/x"), a host rule that allows any path
// still credits a would-be deny; with none, the record stays. Before,
// the path was judged at host level: the first connection was credited
// to the host rule after the one its path matched, and the last one kept
// its allow under a rule the reload removed.
func TestRedecideAuditClippedPath(t *testing.T) {
	cli, srv := netip.MustParseAddr("192.0.2.95"), netip.MustParseAddr("203.0.113.70")
	const before = `  - name: api3
    to: ["web3.test/api/*"]
    ports: [80/tcp]
`
	const after = `  - name: api
    to: ["web.test/api/*"]
    ports: [80/tcp]
  - name: mid
    to: ["web.test/m/*/x", "web2.test/m/*/x"]
    ports: [80/tcp]
  - name: host
    to: [web.test]
    ports: [80/tcp]
  - name: v1
    to: ["web3.test/v1/*"]
    ports: [80/tcp]
`
	long := strings.Repeat("a", audit.MaxPathBytes+100)
	rec, r := reloadHTTP(t, cli, srv, before, after, []httpConn{
		{47701, "web.test", "/api/" + long},
		{47702, "web.test", "/m/" + long},
		{47703, "web2.test", "/m/" + long},
		{47705, "web3.test", "/api/" + long},
	})
	wantFlowEvents(t, rec, map[uint16][]string{
		47701: {"capture deny no-rule audit enforced=false ", "capture allow allowed audit enforced=false ", "capture allow allowed audit enforced=false end-of-capture"},
		47702: {"capture deny no-rule audit enforced=false ", "capture allow allowed audit enforced=false ", "capture allow allowed audit enforced=false end-of-capture"},
		47703: {"capture deny no-rule audit enforced=false ", "capture deny no-rule audit enforced=false end-of-capture"},
		47705: {"capture allow allowed audit enforced=false ", "capture deny path-not-allowed audit enforced=false ", "capture deny path-not-allowed audit enforced=false end-of-capture"},
	})
	for _, ev := range rec.all() {
		if ev.Kind != audit.KindFlow || ev.Verdict != policy.Allow {
			continue
		}
		if want := map[uint16]string{47701: "api", 47702: "host", 47705: "api3"}[ev.ClientPort]; ev.Rule != want {
			t.Errorf("port %d credited to rule %q, want %q", ev.ClientPort, ev.Rule, want)
		}
	}
	if n, m, h := ruleFlows(r, "api"), ruleFlows(r, "api3"), ruleFlows(r, "host"); n != 1 || m != 0 || h != 1 {
		t.Errorf("report: rule api %d flow(s), api3 %d, host %d; want 1, 0, 1", n, m, h)
	}
	if r.Totals.Flows != 4 || r.Totals.Dropped != 2 {
		t.Errorf("report: totals %+v, want 4 flows, 2 dropped (web2.test's, web3.test's)", r.Totals)
	}
}

// httpConn is a plain HTTP connection of reloadHTTP: its client port,
// and its first request's Host and path.
type httpConn struct {
	port       uint16
	host, path string
}

// reloadHTTP opens conns from cli to srv port 80 under the audit-mode
// policy of the rules before (ntpPolicy), the server sending on each
// every second, and reloads to the rules after midway (Redecide).
func reloadHTTP(t *testing.T, cli, srv netip.Addr, before, after string, conns []httpConn) (*recorder, *audit.Report) {
	t.Helper()
	tcs := make([]*tcpConn, len(conns))
	return reloadRunEach(t, fmt.Sprintf(ntpPolicy, policy.ModeAudit, before), nil, 80*time.Second, func(p *pcapWriter, s int) {
		for i, c := range conns {
			if s == 0 {
				tcs[i] = &tcpConn{p: p, cli: cli, srv: srv, cport: c.port, sport: 80, cseq: 1, sseq: 1}
				tcs[i].handshake()
				tcs[i].send(true, []byte("GET "+c.path+" HTTP/1.1\r\nHost: "+c.host+"\r\n\r\n"), 1400, nil, nil)
			}
			tcs[i].send(false, []byte("data: x\n\n"), 1400, nil, nil)
		}
	}, func(c *Capture, store *policy.Store) {
		c.Redecide(store.Swap(testEngine(t, fmt.Sprintf(ntpPolicy, policy.ModeAudit, after))))
	})
}
