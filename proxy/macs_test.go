package proxy

import (
	"bufio"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"testing"
	"time"

	"egressd/audit"
	"egressd/internal/fakemac"
	"egressd/policy"
)

var (
	kioskMAC = net.HardwareAddr{0x02, 0, 0, 0, 0, 0x0a}
	otherMAC = net.HardwareAddr{0x02, 0, 0, 0, 0, 0x0b}
)

// macTestPolicy lets only the kiosks, given by MAC, reach the allowed
// names.
const macTestPolicy = `version: 1
mode: enforce
groups:
  kiosks: ["02:00:00:00:00:0a"]
rules:
  - name: allowed
    from: [kiosks]
    to: ["*.allowed.test", "allowed.test"]
    ports: [443/tcp, 80/tcp]
`

// TestClientMAC: under a policy that names clients by MAC the proxy asks
// Deps.MACs each connection's client MAC and decides with it, on the
// transparent path and the explicit proxy's CONNECT; the event carries
// it. Under a policy that names none it asks nothing. A reload to such a
// policy decides the open tunnels again with their clients' MACs: the
// kiosk's goes on, another device's is closed.
func TestClientMAC(t *testing.T) {
	macs := fakemac.New(map[netip.Addr]net.HardwareAddr{clientV4: kioskMAC, client2V4: otherMAC})
	tp := newTopo(t, topoOpts{deps: func(d *Deps) { d.MACs = macs }})
	tp.facts.add(clientV4, srvV4, "www.allowed.test")
	tp.facts.add(client2V4, srvV4, "www.allowed.test")
	dest := netip.AddrPortFrom(srvV4, 443)

	// Under testPolicy (no MACs): both tunnels open, nothing asked.
	kiosk := tp.startTLS(t, tp.dialAtFirstWriteFrom(t, clientV4, dest), "www.allowed.test")
	other := tp.startTLS(t, tp.dialAtFirstWriteFrom(t, client2V4, dest), "www.allowed.test")
	if n := macs.Asked(); n != 0 {
		t.Fatalf("the MAC asked %d times under a policy that names none", n)
	}

	tp.swap(t, macTestPolicy)
	other.waitClosed(t, "another device's tunnel")
	if ev := tp.ev.wait(t, "another device's tunnel", byClient(other.raw)); ev.Verdict != policy.Deny || ev.Reason != policy.ReasonClient || ev.Close != closeRevoked {
		t.Errorf("another device's tunnel: event %+v", ev)
	}
	if body, err := kiosk.get("/after"); err != nil || body == "" {
		t.Errorf("the kiosk's tunnel after the reload: %q %v", body, err)
	}
	if n := macs.Asked(); n != 2 {
		t.Errorf("the MAC asked %d times deciding 2 tunnels again, want 2", n)
	}

	// New connections, transparent and CONNECT.
	for _, c := range []struct {
		what  string
		src   netip.Addr
		mac   net.HardwareAddr
		allow bool
	}{{"the kiosk", clientV4, kioskMAC, true}, {"another device", client2V4, otherMAC, false}} {
		asked := macs.Asked()
		conn := tp.dialAtFirstWriteFrom(t, c.src, dest)
		body, err := tp.tlsGet(conn, "www.allowed.test", "/mac", nil)
		if (err == nil && body != "") != c.allow {
			t.Errorf("%s: transparent: %q %v; want allowed %v", c.what, body, err, c.allow)
		}
		ev := tp.ev.wait(t, c.what+": transparent", byClient(conn))
		if ev.ClientMAC != c.mac.String() || (ev.Verdict == policy.Allow) != c.allow || !c.allow && ev.Reason != policy.ReasonClient {
			t.Errorf("%s: transparent: event %+v", c.what, ev)
		}

		ec := tp.dialFromClient(t, c.src, netip.AddrPortFrom(gwLanV4, explicitPort))
		ec.SetDeadline(time.Now().Add(10 * time.Second))
		fmt.Fprintf(ec, "CONNECT www.allowed.test:443 HTTP/1.1\r\nHost: www.allowed.test:443\r\n\r\n")
		resp, err := http.ReadResponse(bufio.NewReader(ec), &http.Request{Method: http.MethodConnect})
		want := http.StatusOK
		if !c.allow {
			want = http.StatusForbidden
		}
		if err != nil || resp.StatusCode != want {
			t.Errorf("%s: CONNECT: %v %v; want %d", c.what, resp, err, want)
		}
		ec.Close()
		ev = tp.ev.wait(t, c.what+": CONNECT", func(ev audit.Event) bool { return byClient(ec)(ev) && ev.NameSource == audit.NameConnect })
		if ev.ClientMAC != c.mac.String() || (ev.Verdict == policy.Allow) != c.allow {
			t.Errorf("%s: CONNECT: event %+v", c.what, ev)
		}
		if n := macs.Asked() - asked; n != 2 {
			t.Errorf("%s: the MAC asked %d times for 2 connections, want 2", c.what, n)
		}
	}
}
