package e2e

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"
)

// TestReloadClosesAuditTunnel follows the README's rollout with a client
// of the explicit proxy: in audit mode (the policy file's, no --mode) a
// CONNECT tunnel to a name no rule allows is opened and used; it stays
// open until the SIGHUP that reloads the file switched to enforce, which
// closes it (close policy-revoked). Before, the tunnel ran on under its
// audit-mode decision for as long as the client kept it.
func TestReloadClosesAuditTunnel(t *testing.T) {
	tp := newTopo(t)
	d := newDaemon(t, tp, "")
	audit := testPolicy(t)
	if !bytes.Contains(audit, []byte("\nmode: audit\n")) {
		t.Fatal("the seed profile no longer says mode: audit: update the test")
	}
	d.start()

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := tp.dialTCP(ctx, gwLAN4+":3128")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	port := c.LocalAddr().(*net.TCPAddr).Port
	c.SetDeadline(time.Now().Add(5 * time.Second))
	fmt.Fprintf(c, "CONNECT %s:443 HTTP/1.1\r\nHost: %s:443\r\n\r\n", trackerName, trackerName)
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("CONNECT %s in audit mode: %v %v\n%s", trackerName, resp, err, d.logs())
	}
	tc := tls.Client(c, &tls.Config{ServerName: trackerName, RootCAs: tp.pool})
	ka := &keepAlive{name: trackerName, tc: tc, br: bufio.NewReader(tc)}
	if _, err := ka.get("/before"); err != nil {
		t.Fatalf("request in the audit-mode tunnel: %v", err)
	}
	// A reload that keeps audit mode leaves it open.
	d.hup(true)
	if _, err := ka.get("/audit-reload"); err != nil {
		t.Fatalf("the tunnel did not survive a reload that stays in audit mode: %v\n%s", err, d.logs())
	}

	// A refused reload changes nothing, the tunnel included.
	d.writePolicy([]byte("version: 1\nmode: enforce\nrules: [\n"))
	d.hup(false)
	if _, err := ka.get("/refused-reload"); err != nil {
		t.Fatalf("the tunnel did not survive a refused reload: %v\n%s", err, d.logs())
	}

	d.writePolicy(bytes.Replace(audit, []byte("\nmode: audit\n"), []byte("\nmode: enforce\n"), 1))
	d.hup(true)
	tc.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err = tc.Read(make([]byte, 1))
	var ne net.Error
	if err == nil || errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("the audit-mode tunnel to %s is still open after the reload to enforce (read: %v)\n%s", trackerName, err, d.logs())
	}
	ev := wantEvent(t, d, "revoked tunnel", byClientPort(port), "deny", "no-rule")
	if !ev.Enforced || ev.Close != "policy-revoked" || ev.Name != trackerName {
		t.Errorf("event %+v", ev)
	}
	if v := d.metric(`egress_proxy_reload_revoked_total{mode="enforce"}`); v != 1 {
		t.Errorf(`egress_proxy_reload_revoked_total{mode="enforce"} = %v, want 1`, v)
	}
	if !strings.Contains(d.logs(), "policy reload: connection closed, the new policy denies it") {
		t.Errorf("no log line for the revoked tunnel:\n%s", d.logs())
	}
	// The report lists the tunnel as a dropped flow, blocked.
	waitReport(t, d, func(r *report) bool { return hasDropped(r, trackerName, 443, "tcp") })
	for _, dr := range d.report().Dropped {
		if dr.Dest == trackerName && dr.Port == 443 && (dr.Flows != 1 || !dr.Enforced) {
			t.Errorf("report: dropped %+v, want 1 flow, enforced", dr)
		}
	}
}
