package e2e

import (
	"bytes"
	"context"
	"encoding/binary"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"
)

// udpRule lets the LAN send UDP to the echo at udpDenyIP: a second
// forwarded rule next to the seed's ntp.
const udpRule = `
  - name: e2e-udp
    why: a forwarded UDP flow that the reload keeps
    to: ["` + udpDenyIP + `"]
    ports: [7777/udp]
`

// TestReloadCutsRemovedRulesFlows: the brief's case. In enforce mode a
// device's NTP flow (one socket, the seed's ntp rule) and a UDP flow of
// another rule go out; the operator removes the ntp rule and reloads
// (SIGHUP): the NTP flow's next request gets no answer, the other flow
// carries on, and the reload's firewall line and metric count one flow
// cut.
func TestReloadCutsRemovedRulesFlows(t *testing.T) {
	tp := newTopo(t)
	d := newDaemon(t, tp, "enforce")
	seed := testPolicy(t)
	d.writePolicy(append(bytes.Clone(seed), udpRule...))
	d.start()

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	addrs, err := tp.goResolver().LookupNetIP(ctx, "ip4", ntpName+".")
	if err != nil {
		t.Fatal(err)
	}
	dial := func(addr string) net.Conn {
		c, err := tp.lan.DialContext(ctx, "udp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	ntpFlow := dial(netip.AddrPortFrom(addrs[0], 123).String())
	echoFlow := dial(netip.AddrPortFrom(netip.MustParseAddr(udpDenyIP), udpDenyPort).String())
	ntp := func() error {
		req := make([]byte, 48)
		req[0] = 0<<6 | 4<<3 | 3
		binary.BigEndian.PutUint64(req[40:], uint64(time.Now().UnixNano()))
		return ask(ntpFlow, req, func(r []byte) bool { return len(r) >= 48 && string(r[24:32]) == string(req[40:48]) })
	}
	echo := func() error {
		return ask(echoFlow, []byte("ping"), func(r []byte) bool { return string(r) == "echo:ping" })
	}
	if err := ntp(); err != nil {
		t.Fatalf("NTP before the reload: %v", err)
	}
	if err := echo(); err != nil {
		t.Fatalf("UDP echo before the reload: %v", err)
	}

	i := bytes.Index(seed, []byte("  - name: ntp\n"))
	j := bytes.Index(seed, []byte("    ports: [123/udp]\n"))
	if i < 0 || j < i {
		t.Fatal("the seed profile's ntp rule moved: update the test")
	}
	without := append(append(bytes.Clone(seed[:i]), seed[j+len("    ports: [123/udp]\n"):]...), udpRule...)
	d.writePolicy(without)
	d.hup(true)

	if err := ntp(); err == nil {
		t.Error("the NTP flow still gets answers after its rule was removed")
	} else if err := ntp(); err == nil {
		t.Error("the NTP flow's second request after the reload got an answer")
	}
	if err := echo(); err != nil {
		t.Errorf("the other rule's UDP flow after the reload: %v", err)
	}
	if v := d.metric(`egress_firewall_reload_flows_total{result="cut"}`); v != 1 {
		t.Errorf(`egress_firewall_reload_flows_total{result="cut"} = %v, want 1`, v)
	}
	if !strings.Contains(d.logs(), `"flows_cut":1`) {
		t.Errorf("no firewall line with flows_cut 1:\n%s", d.logs())
	}
}

// ask sends req on c and waits up to a second for an answer ok accepts.
func ask(c net.Conn, req []byte, ok func([]byte) bool) error {
	c.SetDeadline(time.Now().Add(time.Second))
	if _, err := c.Write(req); err != nil {
		return err
	}
	buf := make([]byte, 512)
	for {
		n, err := c.Read(buf)
		if err != nil {
			return err
		}
		if ok(buf[:n]) {
			return nil
		}
	}
}
