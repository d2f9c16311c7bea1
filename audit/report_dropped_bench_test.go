package audit

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"egressd/policy"
)

// fullDroppedLedger is a ledger with its dropped list at the bounds
// (LedgerOptions' defaults): MaxDropped entries (one of them the
// overflow's), each with MaxClients clients, each seen with maxClientMACs
// MACs, denied under suggestBase, which allows none of them; then the running
// policy is a reload that allows them all (with a rule naming a MAC, so
// each entry is decided once per client and MAC), or suggestBase itself (each
// is decided for its first client only).
func fullDroppedLedger(tb testing.TB, allowAll bool) *Ledger {
	l := NewLedger(compileBase(tb, ""), LedgerOptions{})
	o := l.opt
	fullDroppedEvents(o, func(ev *Event) { l.add(ev) })
	if allowAll {
		// A rule naming a MAC: each client's MACs are decided (allowedNow).
		l.SetPolicy(compileBase(tb, `  - name: printer
    from: [02:00:5e:00:00:01]
    to: ["printer.example"]
    ports: [443/tcp]
  - name: drops
    to: ["*.drop.example"]
    ports: [443/tcp]
`))
	}
	r := l.Report(ReportOptions{Now: reportNow})
	if len(r.Dropped) != o.MaxDropped {
		tb.Fatalf("%d dropped entries, want %d", len(r.Dropped), o.MaxDropped)
	}
	for _, d := range r.Dropped[:1] {
		if d.ClientCount != o.MaxClients || len(d.Devices) != o.MaxClients*maxClientMACs {
			tb.Fatalf("%s: %d clients, %d devices, want %d and %d", d.Dest, d.ClientCount, len(d.Devices), o.MaxClients, o.MaxClients*maxClientMACs)
		}
	}
	return l
}

// fullDroppedEvents passes fn the events of fullDroppedLedger: each of
// o.MaxDropped destinations denied to each of o.MaxClients clients from
// each of maxClientMACs MACs.
func fullDroppedEvents(o LedgerOptions, fn func(*Event)) {
	n := 0
	for e := range o.MaxDropped {
		name := fmt.Sprintf("h%04d.drop.example", e)
		for c := range o.MaxClients {
			client := netip.AddrFrom4([4]byte{192, 168, 50 + byte(c/200), byte(c%200 + 1)})
			for m := range maxClientMACs {
				n++
				ev := Event{Kind: KindFlow, Source: SourceCapture, Time: t0.Add(time.Duration(n) * time.Millisecond),
					Client: client, ClientPort: uint16(n), ClientMAC: fmt.Sprintf("02:00:00:%02x:%02x:%02x", c, m, e%256),
					Dest: netip.AddrFrom4([4]byte{203, 0, 113, byte(e)}), DestPort: 443, Proto: "tcp", Name: name,
					Verdict: policy.Deny, Reason: policy.ReasonNoRule, Mode: policy.ModeAudit}
				fn(&ev)
			}
		}
	}
}

// BenchmarkReportDroppedFull is the report of a ledger whose dropped list
// is full (fullDroppedLedger): "denied" with the policy of the drops,
// "allowed" after a reload that allows every entry to each client and
// MAC; "allowed-churn" is "allowed" with a client's new MAC on every
// entry before each report (a device that cycles its MAC: no entry's
// allowed_now of the last report holds, each is decided again).
func BenchmarkReportDroppedFull(b *testing.B) {
	for _, c := range []struct {
		name         string
		allow, churn bool
	}{{"denied", false, false}, {"allowed", true, false}, {"allowed-churn", true, true}} {
		b.Run(c.name, func(b *testing.B) {
			l := fullDroppedLedger(b, c.allow)
			var churn []Event
			if c.churn {
				for _, ds := range l.dropped {
					if ds.key != overflowKey {
						churn = append(churn, Event{Kind: KindFlow, Source: SourceCapture, Time: t0.Add(time.Hour),
							Client: netip.MustParseAddr("192.168.50.1"), Dest: netip.MustParseAddr("203.0.113.1"), DestPort: ds.key.port,
							Proto: ds.key.proto, Name: ds.key.dest, Verdict: policy.Deny, Reason: policy.ReasonNoRule, Mode: policy.ModeAudit})
					}
				}
			}
			b.ReportAllocs()
			b.ResetTimer()
			for i := range b.N {
				b.StopTimer()
				for j := range churn {
					ev := churn[j]
					ev.ClientPort, ev.ClientMAC = uint16(j), fmt.Sprintf("02:ff:00:00:%02x:%02x", i>>8, i)
					l.add(&ev)
				}
				b.StartTimer()
				l.Report(ReportOptions{Now: reportNow})
			}
		})
	}
}
