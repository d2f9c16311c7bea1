package e2e

import (
	"slices"
	"testing"
	"time"
)

// TestPingRule: a rule with icmp in its ports lets the LAN ping its
// address in enforce mode (the echo requests reach it, the replies come
// back), and the report credits the flow to it; IP protocol 253 to the
// same address stays dropped, as does ping under the unchanged seed
// policy (TestHardeningProtocols).
func TestPingRule(t *testing.T) {
	tp := newTopo(t)
	ws := make([]*rawWitness, len(rawProtos))
	for i, p := range rawProtos {
		ws[i] = tp.newRawWitness(t, p.network)
	}
	d := newDaemon(t, tp, "enforce")
	d.writePolicy(append(testPolicy(t), []byte(`
  - name: e2e-ping
    why: the vendor's monitoring pings it
    to: [`+udpDenyIP+`/32]
    ports: [icmp]
`)...))
	d.start()
	defer d.stop()
	for i, p := range rawProtos {
		n := tp.sendRaw(t, ws[i], p.network, p.msg)
		switch {
		case p.network == "ip4:icmp" && n != 3:
			t.Errorf("enforce: %d of 3 echo requests reached %s under the icmp rule", n, udpDenyIP)
		case p.network != "ip4:icmp" && n != 0:
			t.Errorf("enforce: %d of 3 %s packets reached %s", n, p.name, udpDenyIP)
		}
	}
	// The report (open flows included) credits the ping to the rule and
	// lists protocol 253 among the drops.
	deadline := time.Now().Add(10 * time.Second)
	for {
		r := d.report()
		credited, dropped := false, false
		for _, u := range r.Rules {
			if u.Name == "e2e-ping" && u.Flows >= 1 && slices.Contains(u.Clients, lanClient4) {
				credited = true
			}
		}
		for _, dr := range r.Dropped {
			if (dr.IP == udpDenyIP || dr.Dest == udpDenyIP) && dr.Proto == "253" && dr.Enforced {
				dropped = true
			}
			if (dr.IP == udpDenyIP || dr.Dest == udpDenyIP) && dr.Proto == "icmp" {
				t.Fatalf("the ping is among the drops: %+v", dr)
			}
		}
		if credited && dropped {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("report after 10s: ping credited to e2e-ping %v, protocol 253 dropped %v: %+v", credited, dropped, r)
		}
		time.Sleep(200 * time.Millisecond)
	}
}
