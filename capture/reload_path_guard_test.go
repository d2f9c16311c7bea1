package capture

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"egressd/audit"
)

// TestRedecideAuditClippedPathGuarded: a reload in audit mode that drops
// the CIDR rule naming a guarded range (169.254.169.254, the metadata
// address) makes every plain HTTP connection open to it a would-be deny
// (special-range), whatever its path: the guard refuses any allow there.
// That holds for one whose path was longer than the record keeps, where
// the start kept cannot decide the host/path rule that allowed it
// ("/m/*.js"): what the whole path would make of the rule does not
// matter. Before, that connection's record stayed allowed ("not known"),
// while the same connection with a short path became a would-be deny.
func TestRedecideAuditClippedPathGuarded(t *testing.T) {
	cli := netip.MustParseAddr("192.0.2.96")
	srv := netip.MustParseAddr("169.254.169.254")
	const before = `  - name: js
    to: ["meta.test/m/*.js"]
    ports: [80/tcp]
  - name: metadata
    to: [169.254.169.254/32]
    ports: [80/tcp]
`
	const after = `  - name: js
    to: ["meta.test/m/*.js"]
    ports: [80/tcp]
`
	long := strings.Repeat("a", audit.MaxPathBytes+100)
	conns := []httpConn{{47801, "meta.test", "/m/x.js"}, {47802, "meta.test", "/m/" + long + ".js"}}
	rec, _ := reloadHTTP(t, cli, srv, before, after, conns)
	want := []string{"capture allow allowed audit enforced=false ", "capture deny special-range audit enforced=false ",
		"capture deny special-range audit enforced=false end-of-capture"}
	for _, c := range conns {
		if got := flowEvents(rec, c.port); fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("port %d (path %d bytes): events\n got %q\nwant %q", c.port, len(c.path), got, want)
		}
	}
}
