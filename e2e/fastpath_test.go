package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestFastPath runs egressd run --fast-path in enforce mode with its real
// firewall: TLS connections to an address the forwarder gave the client
// are decided from their queued packets and then forwarded by the kernel;
// the rest go to the proxy as before. Each case is checked by what the
// client got and by the fast path's counters.
func TestFastPath(t *testing.T) {
	tp := newTopo(t)
	d := newDaemon(t, tp, "enforce")
	d.extra = []string{"--fast-path"}
	d.start()
	defer d.stop()
	d.dumpOnFailure()

	fast := func() float64 { return d.metric(`egress_proxy_fast_syns_total{result="fast"}`) }
	notLearned := func() float64 { return d.metric(`egress_proxy_fast_syns_total{result="not-learned"}`) }

	// An allowed name, asked through the gateway first: the fast path.
	if st, addrs := tp.dig(t, dockerName, "A"); st != "NOERROR" || len(addrs) != 1 || addrs[0] != dockerIP4 {
		t.Fatalf("dig %s: %s %v", dockerName, st, addrs)
	}
	before := fast()
	body, err := tp.curl(dockerName, 443, dockerIP4, "/fast", true)
	if err != nil || !strings.Contains(body, "sni="+dockerName) {
		t.Fatalf("allowed name by the fast path: %q %v", body, err)
	}
	if got := fast() - before; got != 1 {
		t.Errorf("allowed name: %v fast SYNs, want 1", got)
	}
	waitClose(t, d, dockerIP4, "fast-path", 1)

	// IPv6, the same.
	if st, addrs := tp.dig(t, dockerName, "AAAA"); st != "NOERROR" || len(addrs) != 1 {
		t.Fatalf("dig %s AAAA: %s %v", dockerName, st, addrs)
	}
	before = fast()
	if body, err := tp.curl(dockerName, 443, dockerIP6, "/fast6", true); err != nil || !strings.Contains(body, "sni="+dockerName) {
		t.Fatalf("IPv6 by the fast path: %q %v", body, err)
	}
	if got := fast() - before; got != 1 {
		t.Errorf("IPv6: %v fast SYNs, want 1", got)
	}

	// A ClientHello of more than one segment (Go's ML-KEM key share),
	// the name asked through the gateway by the Go resolver.
	before = fast()
	res, err := tp.goMLKEM(registry)
	if err != nil || !strings.Contains(res.reply, `got="hello"`) {
		t.Fatalf("ML-KEM hello by the fast path: %+v %v", res, err)
	}
	if res.helloLen <= 1460 {
		t.Errorf("the ML-KEM hello was %d bytes: not more than one segment", res.helloLen)
	}
	if got := fast() - before; got != 1 {
		t.Errorf("ML-KEM: %v fast SYNs, want 1", got)
	}

	// Another name's SNI toward the address given out for dockerName:
	// taken fast (the address was given out), refused on the hello with
	// the TLS alert, not a timeout, and nginx never saw a request.
	before = fast()
	out, err := tp.sClient(dockerIP4, 443, trackerName)
	if err == nil {
		t.Fatalf("SNI %s toward %s's address: the handshake completed\n%s", trackerName, dockerName, out)
	}
	if !strings.Contains(out, "access denied") {
		t.Errorf("SNI spoofing: openssl did not report the access_denied alert:\n%s", out)
	}
	if got := fast() - before; got != 1 {
		t.Errorf("SNI spoofing: %v fast SYNs, want 1", got)
	}
	waitClose(t, d, dockerIP4, "fast-path-denied", 1)
	if log, _ := os.ReadFile(filepath.Join(tp.dir, "nginx-access.log")); strings.Count(string(log), "\n") != 2 {
		t.Errorf("nginx saw other requests than the two allowed ones:\n%s", log)
	}

	// An allowed name whose address the client did not ask us for (its
	// own resolver): not taken fast; the proxy vouches for it with a
	// fresh lookup and forwards it as before.
	before, nl := fast(), notLearned()
	if body, err := tp.curl(vendorName, 443, vendorIP, "/proxy", true); err != nil || !strings.Contains(body, "sni="+vendorName) {
		t.Fatalf("allowed name, address not given out: %q %v", body, err)
	}
	if got := fast() - before; got != 0 {
		t.Errorf("address not given out: %v fast SYNs, want 0", got)
	}
	if got := notLearned() - nl; got != 1 {
		t.Errorf("address not given out: %v not-learned SYNs, want 1", got)
	}

	// A denied name at an address never given out: the proxy refuses it
	// as before.
	if _, err := tp.curl(trackerName, 443, trackerIP, "/", true); err == nil {
		t.Errorf("denied name %s reached %s", trackerName, trackerIP)
	}
}

// waitClose waits up to 10s until d's event log has want flow events
// toward dest whose close reason is close (events are written in
// batches).
func waitClose(t *testing.T, d *daemon, dest, close string, want int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		n := 0
		files, _ := filepath.Glob(filepath.Join(d.stateDir, "*"))
		for _, f := range files {
			data, err := os.ReadFile(f)
			if err != nil {
				continue
			}
			for _, line := range strings.Split(string(data), "\n") {
				if strings.Contains(line, `"kind":"flow"`) && strings.Contains(line, fmt.Sprintf(`"dest_ip":%q`, dest)) &&
					strings.Contains(line, fmt.Sprintf(`"close":%q`, close)) {
					n++
				}
			}
		}
		if n == want {
			return
		}
		if time.Now().After(deadline) {
			t.Errorf("%d flow events toward %s closed %s after 10s, want %d\n%s", n, dest, close, want, d.events())
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
}
