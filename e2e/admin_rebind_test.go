package e2e

import (
	"net"
	"strings"
	"testing"
	"time"
)

// TestAdminRebinding: DNS rebinding against the admin page. The admin
// server listens on the gateway's LAN address, as an operator sets it to
// read the report from a laptop. A LAN browser on a page of
// attacker.test, whose DNS then answers with the gateway's address, asks
// http://attacker.test:9901/report.json as the page's own origin: curl
// --resolve stands for the rebound name. The admin server must refuse
// that Host (421, a log line), on every path, and still answer the same
// client asking by address, and `egressd report` on the gateway. Before,
// it served every client's flows to any Host.
func TestAdminRebinding(t *testing.T) {
	tp := newTopo(t)
	d := newDaemon(t, tp, "enforce")
	d.admin = net.JoinHostPort(gwLAN4, "9901")
	d.start()
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("egressd output (last 4 KiB):\n%s", tail(d.logs(), 4096))
		}
	})
	// A flow of the LAN client, for the report to hold.
	tp.dig(t, dockerName, "A")

	curl := func(args ...string) (code, body string) {
		t.Helper()
		out, err := tp.lan.Run(append([]string{"curl", "-sS", "--noproxy", "*", "--max-time", "5",
			"-w", "\n%{http_code}"}, args...)...)
		i := strings.LastIndexByte(out, '\n')
		if err != nil || i < 0 {
			t.Fatalf("curl %v: %v\n%s", args, err, out)
		}
		return out[i+1:], out[:i]
	}
	for _, path := range []string{"/report.json", "/", "/metrics", "/healthz"} {
		code, body := curl("--resolve", "attacker.test:9901:"+gwLAN4, "http://attacker.test:9901"+path)
		if code != "421" || strings.Contains(body, dockerName) || strings.Contains(body, "egress_") || len(body) > 200 {
			t.Errorf("rebound name, %s: %s %.300q, want 421 and a short body", path, code, body)
		}
	}
	code, body := curl("http://" + gwLAN4 + ":9901/report.json")
	if code != "200" || !strings.Contains(body, `"rules"`) {
		t.Errorf("by address: %s %.300q, want 200 and the report", code, body)
	}
	if r := d.report(); r == nil {
		t.Errorf("egressd report --admin %s: no report", d.adminAddr())
	}
	for deadline := time.Now().Add(5 * time.Second); !strings.Contains(d.logs(), "attacker.test"); time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Errorf("no log line names the refused host attacker.test")
			break
		}
	}
}
