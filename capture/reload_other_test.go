package capture

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/gopacket/gopacket/layers"

	"egressd/audit"
	"egressd/policy"
)

// otherReloadRun feeds, from 192.0.2.95, a ping (ICMP echo request and
// reply) to each of pings and a GRE packet to each of gres, every 10 s
// for 90 s (capture reporting flows open after a minute as Run does),
// and calls at before the packets of second 70. Events go to a recorder
// and a ledger.
func otherReloadRun(t *testing.T, pol string, pings, gres []netip.Addr, at func(c *Capture, store *policy.Store)) (*recorder, *audit.Report) {
	t.Helper()
	cli := netip.MustParseAddr("192.0.2.95")
	return reloadRunEach(t, pol, nil, 70*time.Second, func(p *pcapWriter, s int) {
		for _, dst := range pings {
			p.ip(true, cli, dst, layers.IPProtocolICMPv4, icmpMsg(8, "ping"))
			p.ip(false, dst, cli, layers.IPProtocolICMPv4, icmpMsg(0, "ping"))
		}
		for _, dst := range gres {
			p.ip(true, cli, dst, layers.IPProtocolGRE, []byte{0, 0, 0x08, 0, 0x45, 0, 0, 20})
		}
	}, at)
}

// eventsTo are the flow events to dest, as flowEvents has them, with the
// rule after the verdict.
func eventsTo(rec *recorder, dest netip.Addr) []string {
	var got []string
	for _, ev := range rec.all() {
		if ev.Kind == audit.KindFlow && ev.Dest == dest {
			got = append(got, fmt.Sprintf("%s %s %s %s %s enforced=%v %s", ev.Source, ev.Verdict, ev.Rule, ev.Reason, ev.Mode, ev.Enforced, ev.Close))
		}
	}
	return got
}

const pingPolicy = `version: 1
mode: %s
rules:
  - name: lab
    to: [198.51.100.0/24]
    ports: [any]
%s`

const pingRule = `  - name: monitoring
    to: [203.0.113.0/24]
    ports: [icmp]
`

func ruleFlows(r *audit.Report, name string) uint64 {
	for _, rr := range r.Rules {
		if rr.Name == name {
			return rr.Flows
		}
	}
	return 0
}

// TestRedecideOtherProtocols: capture judges its open flows of other IP
// protocols again at a reload, as the firewall's sweep keeps or cuts a
// ping's conntrack entry by the new policy. A ping (an ICMP echo flow,
// decided by the policy with the protocol icmp) allowed under a rule a
// reload in audit mode removes is recorded as one enforce would drop; a
// ping the policy denied, still open when a reload in audit mode adds the
// icmp rule (the operator took it from --suggest), is credited to the rule
// (an event at once), and the report counts it there, once, not among the
// would-be drops; after the reload to enforce, a ping opened in audit mode
// that no rule admits and a GRE tunnel (no rule can allow one) are drops
// enforced, and a ping the enforce policy admits is the rule's. Before,
// capture skipped every flow but TCP and UDP: the ping kept its first
// record until idle.
func TestRedecideOtherProtocols(t *testing.T) {
	ping := netip.MustParseAddr("203.0.113.9")
	gre := netip.MustParseAddr("203.0.113.20")
	t.Run("audit-removes", func(t *testing.T) {
		rec, r := otherReloadRun(t, fmt.Sprintf(pingPolicy, policy.ModeAudit, pingRule), []netip.Addr{ping}, nil, func(c *Capture, store *policy.Store) {
			c.Redecide(store.Swap(testEngine(t, fmt.Sprintf(pingPolicy, policy.ModeAudit, ""))))
		})
		want := []string{
			"capture allow monitoring allowed audit enforced=false ",
			"capture deny  no-rule audit enforced=false ",
			"capture deny  no-rule audit enforced=false end-of-capture",
		}
		if got := eventsTo(rec, ping); fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("events of the ping\n got %q\nwant %q", got, want)
		}
		if d := droppedAt(r, ping.String(), 0); d == nil || d.Flows != 1 || r.Totals.Flows != 1 || r.Totals.Allowed != 0 {
			t.Errorf("report: drop %+v, totals %+v; want the ping dropped, once", d, r.Totals)
		}
	})
	t.Run("audit-adds", func(t *testing.T) {
		rec, r := otherReloadRun(t, fmt.Sprintf(pingPolicy, policy.ModeAudit, ""), []netip.Addr{ping}, nil, func(c *Capture, store *policy.Store) {
			c.Redecide(store.Swap(testEngine(t, fmt.Sprintf(pingPolicy, policy.ModeAudit, pingRule))))
		})
		want := []string{
			"capture deny  no-rule audit enforced=false ",
			"capture allow monitoring allowed audit enforced=false ",
			"capture allow monitoring allowed audit enforced=false end-of-capture",
		}
		if got := eventsTo(rec, ping); fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("events of the ping\n got %q\nwant %q", got, want)
		}
		if n := ruleFlows(r, "monitoring"); n != 1 || len(r.Dropped) != 0 || r.Totals.Flows != 1 || r.Totals.Allowed != 1 {
			t.Errorf("report: rule monitoring %d flow(s), dropped %+v, totals %+v; want the ping under the rule, once", n, r.Dropped, r.Totals)
		}
	})
	t.Run("audit-to-enforce", func(t *testing.T) {
		admitted := netip.MustParseAddr("203.0.113.10")
		denied := netip.MustParseAddr("192.0.2.9")
		rec, r := otherReloadRun(t, fmt.Sprintf(pingPolicy, policy.ModeAudit, ""), []netip.Addr{admitted, denied}, []netip.Addr{gre}, func(c *Capture, store *policy.Store) {
			c.Redecide(store.Swap(testEngine(t, fmt.Sprintf(pingPolicy, policy.ModeEnforce, pingRule))))
		})
		for dest, want := range map[netip.Addr]string{
			admitted: "capture allow monitoring allowed enforce enforced=false ",
			denied:   "capture deny  no-rule enforce enforced=true policy-revoked",
			gre:      "capture deny  " + ReasonProtocol + " enforce enforced=true policy-revoked",
		} {
			// The reload's event, and the flow's end (capture may not
			// have reported it open yet).
			got := eventsTo(rec, dest)
			if len(got) < 2 || len(got) > 3 || got[len(got)-2] != want {
				t.Errorf("flow to %s: events %q, want the reload's %q", dest, got, want)
			}
		}
		if n := ruleFlows(r, "monitoring"); n != 1 || r.Totals.Flows != 3 || r.Totals.Allowed != 1 || r.Totals.Dropped != 2 {
			t.Errorf("report: rule monitoring %d flow(s), totals %+v; want 1, and 3 flows, 2 dropped", n, r.Totals)
		}
		for _, d := range []netip.Addr{denied, gre} {
			if dr := droppedAt(r, d.String(), 0); dr == nil || dr.EnforcedFlows != 1 {
				t.Errorf("report: drop of %s %+v, want 1 flow enforced", d, dr)
			}
		}
	})
}
