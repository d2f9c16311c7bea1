package e2e

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// openRuleCounts are a report's flows and open flows of one rule.
type openRuleCounts struct {
	Name      string `json:"name"`
	Flows     uint64 `json:"flows"`
	OpenFlows uint64 `json:"open_flows"`
	Top       []struct {
		Dest  string `json:"dest"`
		Count uint64 `json:"count"`
	} `json:"top_destinations"`
}

// to returns the rule's count of flows to dest.
func (u openRuleCounts) to(dest string) uint64 {
	for _, d := range u.Top {
		if d.Dest == dest {
			return d.Count
		}
	}
	return 0
}

type openReport struct {
	Rules       []openRuleCounts `json:"rules"`
	UnusedRules []string         `json:"unused_rules"`
	OpenFlows   uint64           `json:"open_flows"`
}

// rule returns the counts of the rule named name (zero when absent).
func (r *openReport) rule(name string) openRuleCounts {
	for _, u := range r.Rules {
		if u.Name == name {
			return u
		}
	}
	return openRuleCounts{Name: name}
}

// openReportCLI runs `egressd report --json` with args in the gateway's
// namespace and decodes what it prints.
func openReportCLI(t *testing.T, tp *topo, args ...string) (*openReport, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", tp.gw.Name, egressdBin, "report", "--json"}, args...)...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("egressd report %v: %v\n%s", args, err, stderr.String())
	}
	var r openReport
	if err := json.Unmarshal(out, &r); err != nil {
		t.Fatalf("egressd report %v: %v\n%s", args, err, out)
	}
	return &r, string(out)
}

// TestOpenFlowsLive: in audit mode a LAN client's NTP exchange and its DNS
// query to another resolver than the gateway's are UDP flows capture
// reports only after 60 s of silence. The daemon's live report (`egressd
// report` against the admin address) counts them right away, as open, one
// flow each, so neither rule is unused; asked again it still counts each
// once; and after the daemon stops (its shutdown reports capture's open
// flows) the event log counts each exactly once. (The dns rule also
// counts the flows of the queries to the gateway's forwarder that
// resolved the NTP server's name, open as well.)
func TestOpenFlowsLive(t *testing.T) {
	tp := newTopo(t)
	d := newDaemon(t, tp, "audit")
	d.start()

	if lost, err := tp.ntp(ntpName, 3); err != nil {
		t.Fatalf("NTP to %s: %v (%d lost)", ntpName, err, lost)
	}
	if m, err := dnsAsk(tp.lan, lanClient4, authDNS4, dockerName, dns.TypeA, false); err != nil || m.Rcode != dns.RcodeSuccess {
		t.Fatalf("DNS to %s straight: %v %v", authDNS4, m, err)
	}

	report := func(args ...string) (*openReport, string) { return openReportCLI(t, tp, args...) }
	state := func(r *openReport) string {
		return fmt.Sprintf("ntp %+v, dns %+v (to %s: %d), open %d, unused %v", r.rule("ntp"), r.rule("dns"), authDNS4, r.rule("dns").to(authDNS4), r.OpenFlows, r.UnusedRules)
	}
	live := func(r *openReport) bool {
		ntp, dn := r.rule("ntp"), r.rule("dns")
		return ntp.Flows == 1 && ntp.OpenFlows == 1 && dn.to(authDNS4) == 1 && dn.Flows >= 2 && dn.OpenFlows == dn.Flows
	}

	// Capture sees the packets once the kernel hands over their block
	// (64 ms); the flows are reported after 60 s of silence, so a count
	// within 10 s is the open one.
	var r *openReport
	var liveOut string
	deadline := time.Now().Add(10 * time.Second)
	for i := 0; i < 100; i++ {
		r, liveOut = report("--admin", adminAddr)
		if live(r) || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if !live(r) || slices.Contains(r.UnusedRules, "ntp") || slices.Contains(r.UnusedRules, "dns") {
		t.Fatalf("live report: %s; want ntp 1 flow, dns 1 to %s and 1 or more to the gateway, all open, neither unused\n%s\nevents:\n%s", state(r), authDNS4, liveOut, d.events())
	}
	dnsFlows := r.rule("dns").Flows
	// Asked again, each is still counted once.
	if r, _ = report("--admin", adminAddr); !live(r) || r.rule("dns").Flows != dnsFlows {
		t.Errorf("live report asked again: %s; want as before (dns %d flows), all open", state(r), dnsFlows)
	}
	if ev := d.events(); strings.Contains(ev, ":123/udp") {
		t.Fatalf("the NTP flow was reported already (within 60 s of silence?):\n%s", ev)
	}

	d.stop() // capture reports the open flows at shutdown
	r, out := report("--state-dir", d.stateDir)
	if ntp, dn := r.rule("ntp"), r.rule("dns"); ntp.Flows != 1 || dn.Flows != dnsFlows || dn.to(authDNS4) != 1 || ntp.OpenFlows != 0 || dn.OpenFlows != 0 || r.OpenFlows != 0 {
		t.Errorf("after the stop, the event log: %s; want ntp 1 flow, dns %d (1 to %s), none open\n%s\nevents:\n%s", state(r), dnsFlows, authDNS4, out, d.events())
	}
}

// TestOpenFlowsProxy: in audit mode a LAN client holds open a tunnel
// through the explicit proxy (CONNECT to dockerName:443 at the gateway's
// port 3128) and a transparent TLS connection to the same name. Capture
// sees the tunnel only as the client's connection to the gateway, and the
// proxy reports a connection when it closes, so only the proxy knows the
// tunnel is open. The daemon's live report counts both connections under
// vendor-cloud, as open, once each (the transparent one is listed by
// capture and by the proxy: one flow), and keeps the rule off the unused
// list; asked again it still counts two. Nothing is written to the event
// log for them until they close; after the stop the log counts each once.
func TestOpenFlowsProxy(t *testing.T) {
	tp := newTopo(t)
	d := newDaemon(t, tp, "audit")
	d.start()

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// A TLS session through the tunnel, kept open.
	tc := tp.connectTLS(ctx, t, dockerName)
	defer tc.Close()

	raw, err := dialFrom(tp.lan, lanClient4)(ctx, net.JoinHostPort(dockerIP4, "443"))
	if err != nil {
		t.Fatal(err)
	}
	tr := tls.Client(raw, &tls.Config{ServerName: dockerName, RootCAs: tp.pool})
	if err := tr.HandshakeContext(ctx); err != nil {
		t.Fatalf("transparent TLS to %s: %v", dockerIP4, err)
	}
	defer tr.Close()

	report := func(args ...string) (*openReport, string) { return openReportCLI(t, tp, args...) }
	live := func(r *openReport) bool {
		u := r.rule("vendor-cloud")
		return u.Flows == 2 && u.OpenFlows == 2 && u.to(dockerName) == 2 && !slices.Contains(r.UnusedRules, "vendor-cloud")
	}
	// Capture lists the transparent connection once its hello is seen;
	// neither is reported while open. Seen within 10 s, the count is the
	// open one.
	var r *openReport
	var out string
	deadline := time.Now().Add(10 * time.Second)
	for i := 0; i < 100; i++ {
		r, out = report("--admin", adminAddr)
		if live(r) || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if !live(r) {
		t.Fatalf("live report: vendor-cloud %+v, open %d, unused %v; want 2 flows to %s, both open, the rule used\n%s\nevents:\n%s",
			r.rule("vendor-cloud"), r.OpenFlows, r.UnusedRules, dockerName, out, d.events())
	}
	if r, out = report("--admin", adminAddr); !live(r) {
		t.Errorf("live report asked again: vendor-cloud %+v; want as before\n%s", r.rule("vendor-cloud"), out)
	}
	if ev := d.events(); strings.Contains(ev, dockerIP4+":443") {
		t.Errorf("a connection still open is in the event log:\n%s", ev)
	}

	tc.Close()
	tr.Close()
	d.stop()
	r, out = report("--state-dir", d.stateDir)
	if u := r.rule("vendor-cloud"); u.Flows != 2 || u.OpenFlows != 0 || r.OpenFlows != 0 {
		t.Errorf("after the stop, the event log: vendor-cloud %+v, open %d; want 2 flows, none open\n%s\nevents:\n%s", u, r.OpenFlows, out, d.events())
	}
}

// connectTLS opens a tunnel from the LAN client through the explicit
// proxy (CONNECT to name:443 at the gateway's port 3128) and a TLS session
// to name through it, within ctx and 10 s; a refusal ends the test. The
// caller closes the session (and with it the tunnel).
func (tp *topo) connectTLS(ctx context.Context, t *testing.T, name string) *tls.Conn {
	t.Helper()
	tun, err := dialFrom(tp.lan, lanClient4)(ctx, net.JoinHostPort(gwLAN4, "3128"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tun.Close() })
	tun.SetDeadline(time.Now().Add(10 * time.Second))
	target := net.JoinHostPort(name, "443")
	if _, err := fmt.Fprintf(tun, "CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n", target, target); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(tun)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("CONNECT %s through %s:3128: %v %v", target, gwLAN4, resp, err)
	}
	tc := tls.Client(&bufConn{Conn: tun, r: br}, &tls.Config{ServerName: name, RootCAs: tp.pool})
	if err := tc.HandshakeContext(ctx); err != nil {
		t.Fatalf("TLS through the tunnel: %v", err)
	}
	tun.SetDeadline(time.Time{})
	return tc
}

// bufConn is a connection whose first bytes were read into r already.
type bufConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *bufConn) Read(b []byte) (int, error) { return c.r.Read(b) }
