package capture

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"egressd/policy"
)

// TestRedecideAuditPathFormLearned: a reload in audit mode judges a plain
// HTTP connection without a Host (decided by its address and the name DNS
// gave it out for) whose path an origin may read as another
// ("/public/%2e%2e/private/x", normal form "/public/../private/x") as it
// judges it when it opens: path-form where, after the reload, only a
// host/path rule (docs.paths.test/public/*) allows it. Before, the
// fallback to the learned name decided the path alone and kept the
// connection allowed under /public/*, which enforce mode refuses.
func TestRedecideAuditPathFormLearned(t *testing.T) {
	cli := netip.MustParseAddr("192.0.2.96")
	srv := netip.MustParseAddr("203.0.113.71")
	const before = `  - name: host
    to: [docs.paths.test]
    ports: [80/tcp]
`
	const after = `  - name: public
    to: ["docs.paths.test/public/*"]
    ports: [80/tcp]
`
	facts := factsMap{srv: {"docs.paths.test"}}
	conns := []struct {
		port uint16
		path string
	}{
		{47801, "/public/%2e%2e/private/x"},
		{47802, "/public/%2E./private/x"},
		{47803, "/public/x"},
	}
	tcs := make([]*tcpConn, len(conns))
	rec, _ := reloadRunEach(t, fmt.Sprintf(ntpPolicy, policy.ModeAudit, before), facts, 80*time.Second, func(p *pcapWriter, s int) {
		for i, c := range conns {
			if s == 0 {
				tcs[i] = &tcpConn{p: p, cli: cli, srv: srv, cport: c.port, sport: 80, cseq: 1, sseq: 1}
				tcs[i].handshake()
				tcs[i].send(true, []byte("GET "+c.path+" HTTP/1.0\r\n\r\n"), 1400, nil, nil)
			}
			tcs[i].send(false, []byte("data: x\n\n"), 1400, nil, nil)
		}
	}, func(c *Capture, store *policy.Store) {
		c.Redecide(store.Swap(testEngine(t, fmt.Sprintf(ntpPolicy, policy.ModeAudit, after))))
	})
	form := []string{"capture allow allowed audit enforced=false ", "capture deny path-form audit enforced=false ", "capture deny path-form audit enforced=false end-of-capture"}
	for port, want := range map[uint16][]string{
		47801: form,
		47802: form,
		47803: {"capture allow allowed audit enforced=false ", "capture allow allowed audit enforced=false end-of-capture"},
	} {
		if got := flowEvents(rec, port); fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("port %d: events\n got %q\nwant %q", port, got, want)
		}
	}
}
