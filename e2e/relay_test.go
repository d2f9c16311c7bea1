package e2e

import (
	"bytes"
	"errors"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Private Relay's ingress names (THREATS.md B3, B4).
var relayNames = []string{"mask.icloud.com", "mask-h2.icloud.com"}

// TestPrivateRelay: an Apple device on a site run with the seed profile
// cannot use iCloud Private Relay as a tunnel. The recording upstream
// answers the relay's names with the bare APNs address, inside the test's
// stand-in for 17.0.0.0/8, which apple-mdm opens on 443 whole (as Apple's
// network requirements ask). In audit mode (the profile's) and after the
// reload to enforce, dig of both names gets NXDOMAIN from egressd, which
// never asks upstream (Apple's guidance for networks that block the
// relay); openssl s_client with SNI mask-h2.icloud.com to that address
// goes through in audit mode, recorded by capture as the deny enforce
// mode gives (private-relay), and is refused in enforce mode, while
// another name to the same address is allowed by apple-mdm; QUIC to
// mask.icloud.com (UDP 443, which no seed rule opens) is rejected.
func TestPrivateRelay(t *testing.T) {
	tp := newTopo(t)
	u := tp.startUpstream(t)
	for _, n := range relayNames {
		u.add(n + ". 300 IN A " + apnsBareIP)
		u.add(n + ". 300 IN HTTPS 1 . alpn=h2,h3")
	}
	if out, err := tp.sClient(apnsBareIP, 443, "mask-h2.icloud.com"); err != nil {
		t.Fatalf("without egressd, TLS to %s:443 does not complete: the test would prove nothing: %v", apnsBareIP, err)
	} else if !strings.Contains(out, "Verification: OK") {
		t.Fatalf("without egressd: %s", out)
	}

	d := newDaemon(t, tp, "") // the profile's mode
	seed := testPolicy(t)
	if !bytes.Contains(seed, []byte("\nmode: audit\n")) {
		t.Fatal("the seed profile is no longer in audit mode: update the test")
	}
	d.extra = []string{"--upstream-dns", u.addr}
	d.start()
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("egressd output:\n%s", d.logs())
		}
	})

	digs := map[string]int{}
	digRelay := func(mode string) {
		t.Helper()
		for _, n := range relayNames {
			for _, qt := range []string{"A", "AAAA", "HTTPS"} {
				digs[n]++
				if rcode, addrs := tp.dig(t, n, qt); rcode != "NXDOMAIN" {
					t.Errorf("%s: dig %s %s: %s %v, want NXDOMAIN", mode, n, qt, rcode, addrs)
				}
			}
		}
		if rcode, addrs := tp.dig(t, apnsName, "A"); rcode != "NOERROR" || len(addrs) != 1 {
			t.Errorf("%s: control dig %s: %s %v", mode, apnsName, rcode, addrs)
		}
	}

	// Audit mode: nothing blocked but the canaries, the relay flow
	// recorded as enforce mode would refuse it.
	digRelay("audit")
	if _, err := tp.sClient(apnsBareIP, 443, "mask-h2.icloud.com"); err != nil {
		t.Errorf("audit mode blocked s_client -servername mask-h2.icloud.com: %v", err)
	}
	ev := d.waitEvent(t, "the relay flow in audit mode", func(e flowEvent) bool {
		return e.Kind == "flow" && e.Source == "capture" && e.Name == "mask-h2.icloud.com" && e.DestPort == 443
	})
	if ev.Verdict != "deny" || ev.Reason != "private-relay" || ev.Enforced || ev.Dest != apnsBareIP {
		t.Errorf("audit mode: capture's event %v, want a deny private-relay, not enforced", ev)
	}

	d.writePolicy(bytes.Replace(seed, []byte("\nmode: audit\n"), []byte("\nmode: enforce\n"), 1))
	d.hup(true)
	switched := time.Now()

	digRelay("enforce")
	if out, err := tp.sClient(apnsBareIP, 443, "mask-h2.icloud.com"); err == nil {
		t.Errorf("enforce mode: s_client -servername mask-h2.icloud.com to %s:443 completed:\n%s", apnsBareIP, out)
	}
	ev = d.waitEvent(t, "the relay flow in enforce mode", func(e flowEvent) bool {
		return e.Kind == "flow" && e.Source == "proxy" && e.Name == "mask-h2.icloud.com" && !e.Time.Before(switched)
	})
	if ev.Verdict != "deny" || ev.Reason != "private-relay" || !ev.Enforced || ev.Rule != "" {
		t.Errorf("enforce mode: the proxy's event %v, want a deny private-relay, enforced", ev)
	}
	// Control: the same address under another name is apple-mdm's.
	if out, err := tp.sClient(apnsBareIP, 443, apnsName); err != nil || !strings.Contains(out, "Verification: OK") {
		t.Errorf("enforce mode: s_client -servername %s to %s:443 (apple-mdm): %v", apnsName, apnsBareIP, err)
	}
	ev = d.waitEvent(t, "the control flow", func(e flowEvent) bool {
		return e.Kind == "flow" && e.Source == "proxy" && e.Name == apnsName && e.Dest == apnsBareIP && !e.Time.Before(switched)
	})
	if ev.Verdict != "allow" || ev.Rule != "apple-mdm" {
		t.Errorf("control: %v, want allowed by apple-mdm", ev)
	}
	// QUIC to the QUIC ingress: no seed rule opens UDP 443.
	pkt, err := quicInitial("mask.icloud.com")
	if err != nil {
		t.Fatal(err)
	}
	if err := udpExchange(tp, apnsBareIP+":443", pkt); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("QUIC Initial for mask.icloud.com to %s:443: %v, want connection refused", apnsBareIP, err)
	}

	// Every query a local answer: one event each, never asked upstream.
	for _, n := range u.seenNames() {
		if strings.HasPrefix(n, "mask") {
			t.Errorf("the upstream was asked %s", n)
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		got := map[string]int{}
		bad := 0
		for _, e := range d.allEvents() {
			if e.Kind == "dns" && (e.Name == relayNames[0] || e.Name == relayNames[1]) {
				got[e.Name]++
				if e.Verdict != "deny" || e.Reason != "private-relay" || !e.Enforced || e.RCode != "NXDOMAIN" {
					bad++
					t.Errorf("query event %v, want deny private-relay NXDOMAIN, enforced", e)
				}
			}
		}
		if got[relayNames[0]] == digs[relayNames[0]] && got[relayNames[1]] == digs[relayNames[1]] || bad > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("query events %v, want one per dig %v", got, digs)
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
}
