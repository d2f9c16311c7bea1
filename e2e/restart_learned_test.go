package e2e

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// learnedFile is where egressd run keeps its learned-address table in the
// state directory.
const learnedFile = "learned.ndjson"

// TestRestartKeepsLearnedAddresses: a device that resolved once and keeps
// the address (chrony's NTP, a VPN client reconnecting to the address it
// cached) is still let out after egressd restarts in enforce mode
// (systemctl restart, an upgrade; a crash and Restart=on-failure). The
// client asks the gateway for the seed ntp rule's name and the vendor's
// docker name and gets NTP answers; egressd is stopped (SIGTERM) and
// started again with the same state directory; the client's next NTP
// request, from a new socket and without asking DNS again, is answered,
// and a TLS hello without SNI and bytes that are not TLS, to the docker
// address it was given, are allowed under that name (dns-learned). An
// address never given out stays denied. Then an answer given after the
// restart outlives a kill -9 once the table's periodic write has had its
// turn. Before, the table started empty on every start: the firewall's
// learned sets too, and such devices were dropped until they asked DNS
// again.
func TestRestartKeepsLearnedAddresses(t *testing.T) {
	tp := newTopo(t)
	d := newDaemon(t, tp, "enforce")
	d.start()
	d.dumpOnFailure()

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	resolve := func(name string) netip.Addr { return tp.resolve4(t, ctx, name) }
	ntpAsk := func(a netip.Addr, timeout time.Duration) error { return tp.ntpFrom(ctx, a, timeout) }
	ntpAddr := resolve(ntpName)
	if got := resolve(dockerName); got != netip.MustParseAddr(dockerIP4) {
		t.Fatalf("%s resolved to %v, want %s", dockerName, got, dockerIP4)
	}
	if err := ntpAsk(ntpAddr, time.Second); err != nil {
		t.Fatalf("NTP to %s (%s) before the restart: %v", ntpName, ntpAddr, err)
	}

	d.stop()
	fi, err := os.Stat(filepath.Join(d.stateDir, learnedFile))
	if err != nil {
		t.Errorf("after a clean stop: %v", err)
	} else if fi.Mode().Perm() != 0o600 {
		t.Errorf("%s has mode %v, want 0600", learnedFile, fi.Mode().Perm())
	}
	d.start()
	if !strings.Contains(d.logs(), "learned addresses: ") {
		t.Errorf("no line on the learned addresses restored at start")
	}

	// The first datagram after the restart: no retry, no DNS.
	if err := ntpAsk(ntpAddr, 2*time.Second); err != nil {
		t.Errorf("NTP to %s (%s, resolved before the restart) after the restart: %v; want an answer", ntpName, ntpAddr, err)
	}
	// An address of the ntp rule's names that this client was never
	// given: dropped.
	if err := ntpAsk(netip.MustParseAddr("198.51.100.125"), 700*time.Millisecond); err == nil {
		t.Errorf("NTP to 198.51.100.125 (%s, never resolved) was answered", poolNames[1])
	} else if ne, ok := err.(net.Error); !ok || !ne.Timeout() {
		t.Errorf("NTP to an address never given out: %v, want a timeout (dropped)", err)
	}

	// The proxy vouches for the address given before the restart: no SNI,
	// and bytes that are not TLS (the seed's devices run a VPN over 443).
	o := tp.sendHello(dockerIP4+":443", buildHello(helloSpec{}), 0, 0)
	if o.denied || o.err != nil {
		t.Errorf("hello without SNI to %s (given for %s before the restart): %v", dockerIP4, dockerName, o)
	}
	ev := wantEvent(t, d, "no SNI to an address given before the restart", byClientPort(o.port), "allow", "")
	if ev.Name != dockerName || ev.NameSource != "dns-learned" {
		t.Errorf("no SNI to an address given before the restart: recorded as %v, want %s (dns-learned)", ev, dockerName)
	}
	_, port, err := tp.rawHTTP(dockerIP4+":443", "SSH-2.0-OpenSSH_9.2\r\n")
	if err != nil && port == 0 {
		t.Fatalf("raw TCP to %s:443: %v", dockerIP4, err)
	}
	ev = wantEvent(t, d, "bytes that are not TLS to an address given before the restart", byClientPort(port), "allow", "")
	if ev.Name != dockerName || ev.NameSource != "dns-learned" {
		t.Errorf("not TLS to an address given before the restart: recorded as %v, want %s (dns-learned)", ev, dockerName)
	}
	// The vendor's address, of an allowed name this client never asked
	// for: still denied.
	o = tp.sendHello(vendorIP+":443", buildHello(helloSpec{}), 0, 0)
	if !o.denied {
		t.Errorf("hello without SNI to %s (never given out): %v", vendorIP, o)
	}
	wantEvent(t, d, "no SNI to an address never given out", byClientPort(o.port), "deny", "no-rule")

	// kill -9: no clean stop writes the table; the periodic write (every
	// 30 s, when the table changed) has, once the answer is that old.
	poolAddr := resolve(poolNames[0])
	if err := ntpAsk(poolAddr, time.Second); err != nil {
		t.Fatalf("NTP to %s (%s): %v", poolNames[0], poolAddr, err)
	}
	deadline := time.Now().Add(70 * time.Second)
	for {
		b, _ := os.ReadFile(filepath.Join(d.stateDir, learnedFile))
		if strings.Contains(string(b), `"`+poolAddr.String()+`"`) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s (%s) not in %s 70 s after it was given out:\n%s", poolNames[0], poolAddr, learnedFile, b)
		}
		time.Sleep(500 * time.Millisecond)
	}
	d.kill9()
	d.start()
	for _, c := range []struct {
		name string
		addr netip.Addr
	}{{poolNames[0], poolAddr}, {ntpName, ntpAddr}} {
		if err := ntpAsk(c.addr, 2*time.Second); err != nil {
			t.Errorf("NTP to %s (%s) after kill -9 and a start: %v; want an answer", c.name, c.addr, err)
		}
	}
}

// TestRestartAuditToEnforceKeepsDeniedAnswers: the rollout of
// TestReloadAuditToEnforceKeepsDeniedAnswers by a restart (systemctl
// restart with the new policy) rather than a reload. In audit mode the
// client asks the gateway for clockName and trackerName, which no rule
// covers (answered: audit mode; learned with no rule, and written to the
// table's file at the stop), and talks NTP to clockName's address. The
// start in enforce mode, with a rule added for clockName only, brings
// back the answer for clockName under that rule (dnsfilter's WouldLearn)
// and seeds the firewall with it: the client's next NTP request, from a
// new socket and without asking DNS again, is answered. The answer for
// trackerName, which the enforce policy still denies, vouches for
// nothing: a hello with an allowed name to its address is sni-mismatch,
// and one without a name no-rule.
func TestRestartAuditToEnforceKeepsDeniedAnswers(t *testing.T) {
	tp := newTopo(t)
	d := newDaemon(t, tp, "")
	seed := testPolicy(t)
	if !bytes.Contains(seed, []byte("\nmode: audit\n")) {
		t.Fatal("the seed profile is no longer in audit mode: update the test")
	}
	if bytes.Contains(seed, []byte(clockName)) || bytes.Contains(seed, []byte(trackerName)) {
		t.Fatalf("the seed profile names %s or %s: update the test", clockName, trackerName)
	}
	d.writePolicy(seed)
	d.start()
	d.dumpOnFailure()

	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	resolve := func(name string) netip.Addr { return tp.resolve4(t, ctx, name) }
	ntpAsk := func(a netip.Addr, timeout time.Duration) error { return tp.ntpFrom(ctx, a, timeout) }
	clock := resolve(clockName)
	if got := resolve(trackerName); got != netip.MustParseAddr(trackerIP) {
		t.Fatalf("%s resolved to %v, want %s", trackerName, got, trackerIP)
	}
	if err := ntpAsk(clock, time.Second); err != nil {
		t.Fatalf("NTP to %s in audit mode: %v", clockName, err)
	}

	d.stop()
	b, err := os.ReadFile(filepath.Join(d.stateDir, learnedFile))
	if err != nil {
		t.Fatalf("after a clean stop: %v", err)
	}
	for _, name := range []string{clockName, trackerName} {
		if !bytes.Contains(b, []byte(`"`+name+`"`)) {
			t.Errorf("%s: the audit-mode answer for %s (no rule) is not in it:\n%s", learnedFile, name, b)
		}
	}
	enforce := bytes.Replace(seed, []byte("\nmode: audit\n"), []byte("\nmode: enforce\n"), 1)
	d.writePolicy(append(enforce, []byte(fmt.Sprintf(clockRule, clockName))...))
	d.start()

	// The first datagram after the start: no retry, no DNS.
	if err := ntpAsk(clock, 2*time.Second); err != nil {
		t.Errorf("NTP to %s (%s, denied and answered in audit mode) after the restart into enforce with a rule for it: %v; want an answer", clockName, clock, err)
	}
	o := tp.sendHello(trackerIP+":443", buildHello(helloSpec{sni: [][]string{{dockerName}}}), 0, 0)
	if !o.denied {
		t.Errorf("hello for %s to %s (given out in audit mode for %s, which no rule allows): %v; want it refused", dockerName, trackerIP, trackerName, o)
	}
	wantEvent(t, d, "allowed SNI to an address given out for a denied name", byClientPort(o.port), "deny", "sni-mismatch")
	o = tp.sendHello(trackerIP+":443", buildHello(helloSpec{}), 0, 0)
	if !o.denied {
		t.Errorf("hello without SNI to %s (given out in audit mode for %s): %v; want it refused", trackerIP, trackerName, o)
	}
	wantEvent(t, d, "no SNI to an address given out for a denied name", byClientPort(o.port), "deny", "no-rule")
}
