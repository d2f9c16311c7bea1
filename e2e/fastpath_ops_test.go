package e2e

import (
	"bytes"
	"slices"
	"strings"
	"testing"
	"time"
)

// dockerKeepAlive opens a keep-alive HTTPS connection to dockerName by the
// fast path (the name asked through the gateway first) and checks it was
// taken fast.
func dockerKeepAlive(t *testing.T, tp *topo, d *daemon) *keepAlive {
	t.Helper()
	if st, addrs := tp.dig(t, dockerName, "A"); st != "NOERROR" || len(addrs) != 1 || addrs[0] != dockerIP4 {
		t.Fatalf("dig %s: %s %v", dockerName, st, addrs)
	}
	before := d.metric(`egress_proxy_fast_syns_total{result="fast"}`)
	want := 1.0
	if !slices.Contains(d.extra, "--fast-path") {
		want = 0
	}
	ka, err := tp.openKeepAlive(dockerName, dockerIP4)
	if err != nil {
		t.Fatalf("keep-alive connection to %s: %v", dockerName, err)
	}
	t.Cleanup(ka.close)
	if body, err := ka.get("/first"); err != nil || !strings.Contains(body, "sni="+dockerName) {
		t.Fatalf("first request: %q %v", body, err)
	}
	if got := d.metric(`egress_proxy_fast_syns_total{result="fast"}`) - before; got != want {
		t.Fatalf("the keep-alive connection: %v fast SYNs, want %v", got, want)
	}
	return ka
}

// withoutDocker is the policy p without vendor-cloud's *.docker.com.
func withoutDocker(t *testing.T, p []byte) []byte {
	t.Helper()
	line := []byte("      - \"*.docker.com\"\n")
	if bytes.Count(p, line) != 1 {
		t.Fatal("the seed profile's vendor-cloud rule no longer lists *.docker.com once: update the test")
	}
	return bytes.Replace(p, line, nil, 1)
}

func enforcePolicy(t *testing.T, p []byte) []byte {
	t.Helper()
	if !bytes.Contains(p, []byte("\nmode: audit\n")) {
		t.Fatal("the seed profile no longer says mode: audit: update the test")
	}
	return bytes.Replace(p, []byte("\nmode: audit\n"), []byte("\nmode: enforce\n"), 1)
}

// newTLSTimesOut reports whether a new TLS connection to dockerName fails.
func newTLSFails(tp *topo) bool {
	_, err := tp.curl(dockerName, 443, dockerIP4, "/new", true)
	return err != nil
}

// TestFastPathReload: a keep-alive connection by the fast path survives
// a reload that changes no TCP rule, and is cut by one that removes its
// name, and the report says so as it does for the same connection by the
// proxy (subtest proxy: no --fast-path).
func TestFastPathReload(t *testing.T) {
	for _, fast := range []bool{true, false} {
		t.Run(map[bool]string{true: "fast", false: "proxy"}[fast], func(t *testing.T) { testFastPathReload(t, fast) })
	}
}

func testFastPathReload(t *testing.T, fast bool) {
	tp := newTopo(t)
	d := newDaemon(t, tp, "")
	if fast {
		d.extra = []string{"--fast-path"}
	}
	seed := enforcePolicy(t, testPolicy(t))
	d.writePolicy(seed)
	d.start()
	defer d.stop()
	d.dumpOnFailure()
	ka := dockerKeepAlive(t, tp, d)

	d.writePolicy(append(bytes.Clone(seed), udpRule...))
	d.hup(true)
	if _, err := ka.get("/after-udp-rule"); err != nil {
		t.Errorf("fast connection after a reload adding a UDP rule: %v", err)
	}

	d.writePolicy(withoutDocker(t, append(bytes.Clone(seed), udpRule...)))
	d.hup(true)
	if _, err := ka.get("/after-removal"); err == nil {
		t.Errorf("the connection is still served after its name's rule was removed")
	}
	if fast {
		// The sweep cuts it (the proxy's own are decided again by
		// the proxy, not counted here).
		if v := d.metric(`egress_firewall_reload_flows_total{result="cut"}`); v != 1 {
			t.Errorf(`egress_firewall_reload_flows_total{result="cut"} = %v, want 1`, v)
		}
	}
	// Either way the report says the connection was dropped (enforced)
	// and no longer counts under vendor-cloud: the fast connection as the
	// proxy's. Before, the fast one stayed allowed under vendor-cloud,
	// capture's bytes added to it, and nothing dropped.
	waitReport(t, d, func(r *report) bool { return droppedFlows(r, 443, "tcp", true) == 1 })
	if n := ruleFlows(d.report(), "vendor-cloud"); n != 0 {
		t.Errorf("report: vendor-cloud still has %d flows after its connection was cut", n)
	}
}

// TestFastPathReport: one HTTPS request to dockerName counts in the report
// as one flow of vendor-cloud, with bytes both ways, by the fast path as
// by the proxy (the ledger merges the proxy's event, written at the fast
// path's decision, with capture's record of the whole connection).
func TestFastPathReport(t *testing.T) {
	for _, fast := range []bool{true, false} {
		t.Run(map[bool]string{true: "fast", false: "proxy"}[fast], func(t *testing.T) {
			tp := newTopo(t)
			d := newDaemon(t, tp, "enforce")
			if fast {
				d.extra = []string{"--fast-path"}
			}
			d.start()
			defer d.stop()
			d.dumpOnFailure()
			ka := dockerKeepAlive(t, tp, d)
			if _, err := ka.get("/second"); err != nil {
				t.Fatal(err)
			}
			ka.close()
			waitReport(t, d, func(r *report) bool { return ruleFlows(r, "vendor-cloud") > 0 })
			time.Sleep(2 * time.Second) // capture's record at the close
			r := d.report()
			for _, rr := range r.Rules {
				if rr.Name == "vendor-cloud" {
					t.Logf("vendor-cloud: %d flows, %d bytes out, %d in", rr.Flows, rr.BytesOut, rr.BytesIn)
					if rr.Flows != 1 || rr.BytesOut < 1000 || rr.BytesIn < 1000 {
						t.Errorf("vendor-cloud: %d flows, %d bytes out, %d in; want 1 flow, the two requests' bytes both ways", rr.Flows, rr.BytesOut, rr.BytesIn)
					}
				}
			}
			if len(r.Dropped) != 0 {
				t.Errorf("dropped: %+v, want none", r.Dropped)
			}
		})
	}
}
