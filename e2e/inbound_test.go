package e2e

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"
)

// TestInboundAudit: in audit mode without --guard-wan (nothing installed,
// the kernel forwards), a host on the internet side connects to the LAN
// host's service and sends it an unsolicited UDP datagram from its port
// 500. The report lists both as denied inbound, from the internet host to
// the LAN host (what enforce's WAN guard would drop), never as the
// internet host's or the LAN host's egress, and `report --suggest`
// proposes no rule for them and says why.
func TestInboundAudit(t *testing.T) { inboundAudit(t, lanClient4, inetWAN4) }

// TestInboundAudit6 is TestInboundAudit over IPv6.
func TestInboundAudit6(t *testing.T) { inboundAudit(t, lanClient6, inetWAN6) }

// inboundAudit is TestInboundAudit from the internet host's address inet
// to the LAN host's lan.
func inboundAudit(t *testing.T, lan, inet string) {
	tp := newTopo(t)
	d := newDaemon(t, tp, "audit")
	d.noGuard = true
	d.start()

	lanSvc := netip.AddrPortFrom(netip.MustParseAddr(lan), lanSvcPort).String()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	// From inet: the internet host has other addresses (over IPv6 the
	// kernel would pick dockerIP6).
	var c net.Conn
	err := tp.inet.Do(func() (err error) {
		dl := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(inet)}}
		c, err = dl.DialContext(ctx, "tcp", lanSvc)
		return err
	})
	cancel()
	if err != nil {
		t.Fatalf("from the internet side to %s: %v", lanSvc, err)
	}
	c.SetDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 3)
	n, _ := c.Read(buf)
	c.Close()
	if string(buf[:n]) != "in\n" {
		t.Fatalf("from the internet side to %s: got %q", lanSvc, buf[:n])
	}
	pc, err := tp.inet.ListenPacket("udp", net.JoinHostPort(inet, "500"))
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	if _, err := pc.WriteTo([]byte("knock"), net.UDPAddrFromAddrPort(netip.AddrPortFrom(netip.MustParseAddr(lan), 40001))); err != nil {
		t.Fatal(err)
	}
	time.Sleep(500 * time.Millisecond) // the TPACKET_V3 block, and the FIN
	d.stop()                           // capture reports the open UDP flow at shutdown

	r, out := d.reportStateJSON()
	want := map[string]bool{fmt.Sprintf("%s %d/tcp", lan, lanSvcPort): true, lan + " 40001/udp": true}
	for _, dr := range r.Dropped {
		k := fmt.Sprintf("%s %d/%s", dr.Dest, dr.Port, dr.Proto)
		if dr.Dest == inet || dr.Dest == lan {
			if !want[k] || dr.Reason != "inbound" || dr.Flows != 1 || len(dr.Clients) != 1 || dr.Clients[0] != inet {
				t.Errorf("dropped %s: reason %q, %d flows, clients %v; want only %v, inbound, 1 flow from %s", k, dr.Reason, dr.Flows, dr.Clients, want, inet)
			}
			delete(want, k)
		}
	}
	if len(want) != 0 {
		t.Errorf("no inbound entry for %v in %s", want, out)
	}
	sug := string(d.reportState("--suggest"))
	if strings.Contains(sug, lan) || strings.Contains(sug, inet) {
		t.Errorf("report --suggest names the inbound flows' hosts:\n%s", sug)
	}
	if !strings.Contains(sug, "denied as inbound: none suggested") {
		t.Errorf("report --suggest says nothing of the inbound flows:\n%s", sug)
	}
}
