package e2e

import (
	"fmt"
	"testing"
)

// TestUDPFirstPacket: in enforce mode a client's first UDP packet, sent as
// soon as the DNS answer arrives, gets through: dnsfilter writes an
// allowed answer only once the firewall has its addresses in the rule's
// nftables set (it was a known bug while the set was fed asynchronously).
// After a reload, cached answers ask the firewall again before they go
// out, and still open at once.
func TestUDPFirstPacket(t *testing.T) {
	tp := newTopo(t)
	d := newDaemon(t, tp, "enforce")
	d.start()
	learned := func(result string) float64 {
		return d.metric(fmt.Sprintf(`egress_dnsfilter_firewall_learn_total{result="%s"}`, result))
	}
	check := func(when string) {
		t.Helper()
		for _, name := range poolNames {
			lost, err := tp.ntp(name, 2)
			if err != nil {
				t.Fatalf("%s: NTP to %s: %v", when, name, err)
			}
			if lost > 0 {
				t.Errorf("%s: NTP to %s: the first request, sent right after the DNS answer, was dropped", when, name)
			}
		}
	}
	check("fresh answers")
	ok := learned("ok")
	if ok < float64(len(poolNames)) {
		t.Errorf("firewall_learn_total{result=ok} = %v after %d names", ok, len(poolNames))
	}
	d.hup(true)
	check("cached answers after a reload")
	if got := learned("ok") - ok; got < float64(len(poolNames)) {
		t.Errorf("after a reload, %v cached answers were handed to the firewall, want %d", got, len(poolNames))
	}
	if n := learned("timeout") + learned("error"); n != 0 {
		t.Errorf("%v answers went out before the firewall had their addresses", n)
	}
}
