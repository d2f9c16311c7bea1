package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"

	"egressd/internal/testnet"
)

// tunnelAlarmJSON is an alarm of `egressd report --json`.
type tunnelAlarmJSON struct {
	Reason        string `json:"reason"`
	Client        string `json:"client"`
	Zone          string `json:"zone"`
	Rule          string `json:"rule"`
	Alarms        uint64 `json:"alarms"`
	DistinctNames uint64 `json:"distinct_names"`
}

// tunnelNames sends A queries for n distinct names under zone from ns
// to the gateway's forwarder (one socket, each query retried up to 3
// times on a timeout) and returns how many were answered NXDOMAIN or
// NOERROR; bounded by n and ctx.
func tunnelNames(ctx context.Context, ns *testnet.NS, prefix, zone string, n int) (answered int, err error) {
	var c net.Conn
	if err := ns.Do(func() (err error) { c, err = net.Dial("udp", net.JoinHostPort(gwLAN4, "53")); return }); err != nil {
		return 0, err
	}
	defer c.Close()
	dc := &dns.Conn{Conn: c}
	cl := &dns.Client{Net: "udp", Timeout: 3 * time.Second}
	for i := 0; i < n && ctx.Err() == nil; i++ {
		m := new(dns.Msg)
		m.SetQuestion(fmt.Sprintf("%s%04d.%s.", prefix, i, zone), dns.TypeA)
		for try := 0; try < 3; try++ {
			r, _, err := cl.ExchangeWithConnContext(ctx, m, dc)
			if err == nil && (r.Rcode == dns.RcodeNameError || r.Rcode == dns.RcodeSuccess) {
				answered++
				break
			}
		}
	}
	return answered, ctx.Err()
}

// TestDNSTunnelAlarm (THREATS.md E2) in audit mode: a LAN client sends
// 800 distinct names under an allowed wildcard of the test policy
// (*.nirovision.com, which two of its rules allow) through the gateway's
// forwarder (797 from a Go client, 3 with dig), and another device
// resolves 30 names of the same zone. Every query is answered (an
// alarm, not a block), every name reached the upstream, and the report
// lists exactly one alarm: the first client's, for nirovision.com; the
// metric reads 1. After the daemon stops, `egressd report --state-dir`
// (the event log read back) lists the same alarm.
func TestDNSTunnelAlarm(t *testing.T) {
	const zone = "tun.nirovision.com"
	tp := newTopo(t)
	u := tp.startUpstream(t)
	other := tp.newLANDevice(t, "e3tun", "198.18.1.33", "2001:db8:1::33")
	d := newDaemon(t, tp, "audit")
	d.extra = []string{"--upstream-dns", u.addr}
	d.start()
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("egressd output:\n%s", d.logs())
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()

	// The other device first: 30 names, no alarm.
	if n, err := tunnelNames(ctx, other, "cdn", zone, 30); n != 30 {
		t.Fatalf("the other device: %d of 30 answered (%v)", n, err)
	}
	if n, err := tunnelNames(ctx, tp.lan, "mzxw6ytboi", zone, 797); n != 797 {
		t.Fatalf("the tunnelling client: %d of 797 answered (%v)", n, err)
	}
	for i := range 3 {
		name := fmt.Sprintf("dig%d.%s", i, zone)
		if rcode, _ := tp.dig(t, name, "A"); rcode != "NXDOMAIN" {
			t.Fatalf("dig %s: %s, want the upstream's NXDOMAIN", name, rcode)
		}
	}
	seen := map[string]bool{}
	for _, s := range u.seenNames() {
		if strings.HasSuffix(s, "."+zone) {
			seen[s] = true
		}
	}
	if len(seen) != 830 {
		t.Errorf("%d distinct names of %s reached the upstream, want 830 (audit mode answers them all)", len(seen), zone)
	}

	var alarms []tunnelAlarmJSON
	var out string
	for range 100 { // 10 s: the ledger takes events at the writer's batches
		var r struct {
			Alarms []tunnelAlarmJSON `json:"alarms"`
		}
		_, out = openReportCLI(t, tp)
		if err := json.Unmarshal([]byte(out), &r); err != nil {
			t.Fatal(err)
		}
		if alarms = r.Alarms; len(alarms) > 0 {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	want := func(where string, alarms []tunnelAlarmJSON) {
		t.Helper()
		if len(alarms) != 1 {
			t.Fatalf("%s: %d alarms, want 1: %+v", where, len(alarms), alarms)
		}
		a := alarms[0]
		if a.Reason != "dns-tunnel" || a.Client != lanClient4 || a.Zone != "nirovision.com" || a.Alarms != 1 || a.DistinctNames < 450 || a.DistinctNames > 800 {
			t.Errorf("%s: alarm %+v, want one dns-tunnel alarm of %s for nirovision.com, about 500 names", where, a, lanClient4)
		}
	}
	want("live report", alarms)
	if v := d.metric("egress_dnsfilter_tunnel_alarms_total"); v != 1 {
		t.Errorf("egress_dnsfilter_tunnel_alarms_total %v, want 1", v)
	}
	if n := strings.Count(d.logs(), `"reason":"dns-tunnel"`); n != 1 {
		t.Errorf("%d dns-tunnel lines in the log, want 1", n)
	}

	d.stop()
	_, out = openReportCLI(t, tp, "--state-dir", d.stateDir)
	var r struct {
		Alarms []tunnelAlarmJSON `json:"alarms"`
	}
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatal(err)
	}
	want("report --state-dir", r.Alarms)
}
