package audit

import (
	"encoding/json"
	"fmt"
	"math"
	"strings"
	"testing"
	"time"

	"egressd/policy"
)

// TestArchiveOpenFlowsBounded: open_flows that claim more than the
// summary's counts hold (a damaged or hand-edited summary: more flows
// pointing at a rule than it counts, more bytes than it has) are not
// remembered past those counts, so later reports that take a flow back
// (the proxy's after capture's) never take back a count that is not
// there: no count wraps below zero.
func TestArchiveOpenFlowsBounded(t *testing.T) {
	var open []string
	for i := range 3 {
		open = append(open, fmt.Sprintf(`{"kind":"flow","client":"192.168.10.5","client_port":%d,"dest_ip":"198.18.0.%d","dest_port":443,"proto":"tcp","start":%q,"end":%q,"bytes_out":1000,"source":"capture","rule":"r"}`,
			40000+i, i+1, t0.Format(time.RFC3339Nano), t0.Format(time.RFC3339Nano)))
		open = append(open, fmt.Sprintf(`{"kind":"flow","client":"192.168.10.5","client_port":%d,"dest_ip":"198.18.1.%d","dest_port":443,"proto":"tcp","start":%q,"end":%q,"bytes_in":1000,"source":"capture","drop_dest":"x.example","drop_port":443,"drop_proto":"tcp","denied":"old"}`,
			41000+i, i+1, t0.Format(time.RFC3339Nano), t0.Format(time.RFC3339Nano)))
	}
	body := fmt.Sprintf(`{"version":%d,"from":%q,"until":%q,"files":1,"events":2,`+
		`"rules":[{"name":"r","flows":1,"bytes_out":10},{"name":"old","denied":1}],`+
		`"dropped":[{"dest":"x.example","port":443,"proto":"tcp","flows":1,"bytes_in":10}],"open_flows":[%s]}`,
		archiveVersion, t0.Format(time.RFC3339Nano), t0.Format(time.RFC3339Nano), strings.Join(open, ","))
	a, err := parseArchive([]byte(body))
	if err != nil {
		t.Fatal(err)
	}
	l := NewLedger(nil, LedgerOptions{})
	l.importArchive(a)
	for i := range 3 {
		// The proxy's reports of each: denied, and allowed, the other
		// way round from capture's.
		ev := Event{Kind: KindFlow, Source: SourceProxy, Time: t0.Add(time.Second), Client: a.Open[2*i].Client, ClientPort: a.Open[2*i].ClientPort,
			Dest: a.Open[2*i].DestIP, DestPort: 443, Proto: "tcp", Verdict: policy.Deny, Reason: policy.ReasonNoRule, Name: "y.example", Mode: policy.ModeAudit}
		l.add(&ev)
		ev = Event{Kind: KindFlow, Source: SourceProxy, Time: t0.Add(time.Second), Client: a.Open[2*i+1].Client, ClientPort: a.Open[2*i+1].ClientPort,
			Dest: a.Open[2*i+1].DestIP, DestPort: 443, Proto: "tcp", Verdict: policy.Allow, Rule: "r2", Mode: policy.ModeAudit}
		l.add(&ev)
	}
	out := l.export()
	b, _ := json.Marshal(out)
	for _, r := range out.Rules {
		if r.Flows > math.MaxUint32 || r.BytesOut > math.MaxUint32 || r.BytesIn > math.MaxUint32 || r.Denied > math.MaxUint32 {
			t.Errorf("rule %s wrapped below zero: %+v", r.Name, r)
		}
	}
	for _, d := range out.Dropped {
		if d.Flows > math.MaxUint32 || d.BytesOut > math.MaxUint32 || d.BytesIn > math.MaxUint32 {
			t.Errorf("dropped %s wrapped below zero: %+v", d.Dest, d)
		}
	}
	if out.Totals.Allowed > math.MaxUint32 || out.Totals.Dropped > math.MaxUint32 {
		t.Errorf("totals wrapped below zero: %+v", out.Totals)
	}
	if t.Failed() {
		t.Logf("%s", b)
	}
}
