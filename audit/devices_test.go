package audit

import (
	"bytes"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"egressd/policy"
)

const (
	macA = "aa:bb:cc:00:00:0a"
	macB = "aa:bb:cc:00:00:0b"
	macC = "aa:bb:cc:00:00:0c"
)

// deviceEvents are events of a week on a DHCP LAN: 192.168.50.23 changed
// hands (two MACs), one device used 192.168.50.24 and an IPv6 address
// (one MAC), and 192.168.50.99 came with no MAC (a client behind a
// router, or an event of before MACs were recorded). Each goes to the
// rule "cams" and to a would-be drop of x.example.net.
func deviceEvents() []Event {
	type c struct {
		client, mac string
	}
	var evs []Event
	port := uint16(40000)
	for i, cl := range []c{{"192.168.50.23", macA}, {"192.168.50.23", macB}, {"192.168.50.24", macC}, {"fd00::24", macC}, {"192.168.50.99", ""}} {
		for _, allow := range []bool{true, false} {
			port++
			ev := Event{Kind: KindFlow, Source: SourceCapture, Time: t0.Add(time.Duration(i) * time.Hour), Client: mustAddr(cl.client), ClientPort: port,
				ClientMAC: cl.mac, Dest: mustAddr("203.0.113.5"), DestPort: 443, Proto: "tcp", Name: "cam.example.net", Mode: policy.ModeAudit,
				Verdict: policy.Allow, Rule: "cams"}
			if !allow {
				ev.Name, ev.Verdict, ev.Rule, ev.Reason = "x.example.net", policy.Deny, "", policy.ReasonNoRule
			}
			evs = append(evs, ev)
		}
	}
	return evs
}

func deviceLedger(opt LedgerOptions) *Ledger {
	l := NewLedger(nil, opt)
	for _, ev := range deviceEvents() {
		l.Emit(ev)
	}
	return l
}

var wantDeviceMACs = []ClientMAC{
	{Client: "192.168.50.23", MAC: macB, MACs: 2},
	{Client: "192.168.50.24", MAC: macC, MACs: 1},
	{Client: "fd00::24", MAC: macC, MACs: 1},
}

var wantDevices = []Device{
	{MAC: macA, Clients: []string{"192.168.50.23"}},
	{MAC: macB, Clients: []string{"192.168.50.23"}},
	{MAC: macC, Clients: []string{"192.168.50.24", "fd00::24"}},
}

func checkDeviceReport(t *testing.T, r *Report) {
	t.Helper()
	if len(r.Rules) != 1 || len(r.Dropped) != 1 {
		t.Fatalf("rules %+v, dropped %+v: want one of each", r.Rules, r.Dropped)
	}
	u, d := r.Rules[0], r.Dropped[0]
	wantClients := []string{"192.168.50.23", "192.168.50.24", "192.168.50.99", "fd00::24"}
	for _, x := range []struct {
		what        string
		clients     []string
		count, devs int
		macs        []ClientMAC
		devices     []Device
	}{
		{"rule", u.Clients, u.ClientCount, u.DeviceCount, u.ClientMACs, u.Devices},
		{"dropped", d.Clients, d.ClientCount, d.DeviceCount, d.ClientMACs, d.Devices},
	} {
		if diff := cmp.Diff(wantClients, x.clients); diff != "" {
			t.Errorf("%s clients (-want +got):\n%s", x.what, diff)
		}
		// Four addresses; four devices: A, B, C, and the address without
		// a MAC (a device of its own).
		if x.count != 4 || x.devs != 4 {
			t.Errorf("%s: %d clients, %d devices; want 4, 4", x.what, x.count, x.devs)
		}
		if diff := cmp.Diff(wantDeviceMACs, x.macs); diff != "" {
			t.Errorf("%s client MACs (-want +got):\n%s", x.what, diff)
		}
		if diff := cmp.Diff(wantDevices, x.devices); diff != "" {
			t.Errorf("%s devices (-want +got):\n%s", x.what, diff)
		}
	}
}

// TestReportDevices: the report says which device (MAC) each client
// address was, how many devices a rule's or a drop's addresses are, and
// an address that changed hands.
func TestReportDevices(t *testing.T) {
	r := deviceLedger(LedgerOptions{}).Report(ReportOptions{Now: reportNow})
	checkDeviceReport(t, r)

	txt, html, js := writeForms(t, r)
	for _, want := range []string{
		"192.168.50.23 (" + macB + ", 2 devices)",
		"192.168.50.24 (" + macC + ")",
		"fd00::24 (" + macC + ")",
	} {
		if strings.Count(txt.String(), want) != 2 { // the rule and the drop
			t.Errorf("text report shows %q %d times, want 2:\n%s", want, strings.Count(txt.String(), want), txt.String())
		}
		if strings.Count(html.String(), want) != 2 {
			t.Errorf("html report shows %q %d times, want 2", want, strings.Count(html.String(), want))
		}
	}
	// The address without a MAC is shown bare.
	if !strings.Contains(txt.String(), "192.168.50.99\n") && !strings.Contains(txt.String(), "192.168.50.99,") {
		t.Errorf("text report lacks the bare 192.168.50.99:\n%s", txt.String())
	}
	if !strings.Contains(txt.String(), "DEVICES") {
		t.Errorf("text report has no DEVICES column:\n%s", txt.String())
	}
	var back struct {
		Rules []struct {
			DeviceCount int         `json:"device_count"`
			ClientMACs  []ClientMAC `json:"client_macs"`
			Devices     []Device    `json:"devices"`
		} `json:"rules"`
		Dropped []struct {
			DeviceCount int         `json:"device_count"`
			ClientMACs  []ClientMAC `json:"client_macs"`
			Devices     []Device    `json:"devices"`
		} `json:"dropped"`
	}
	if err := json.Unmarshal(js.Bytes(), &back); err != nil {
		t.Fatal(err)
	}
	if len(back.Rules) != 1 || back.Rules[0].DeviceCount != 4 || !cmp.Equal(back.Rules[0].ClientMACs, wantDeviceMACs) || !cmp.Equal(back.Rules[0].Devices, wantDevices) ||
		len(back.Dropped) != 1 || back.Dropped[0].DeviceCount != 4 || !cmp.Equal(back.Dropped[0].ClientMACs, wantDeviceMACs) {
		t.Errorf("json report's devices: %s", js.String())
	}
	rr, err := ReadReportJSON(js)
	if err != nil {
		t.Fatal(err)
	}
	checkDeviceReport(t, rr)
}

// TestReportNoMACs: without MACs (offline, routed clients, old logs) each
// address is a device of its own and the text report has no DEVICES
// column.
func TestReportNoMACs(t *testing.T) {
	l := NewLedger(nil, LedgerOptions{})
	for _, ev := range deviceEvents() {
		ev.ClientMAC = ""
		l.Emit(ev)
	}
	r := l.Report(ReportOptions{Now: reportNow})
	u := r.Rules[0]
	if u.ClientCount != 4 || u.DeviceCount != 4 || u.ClientMACs != nil || u.Devices != nil {
		t.Errorf("rule = %d clients, %d devices, macs %v, devices %v; want 4, 4, none", u.ClientCount, u.DeviceCount, u.ClientMACs, u.Devices)
	}
	var txt bytes.Buffer
	r.WriteText(&txt)
	if strings.Contains(txt.String(), "DEVICES") || strings.Contains(txt.String(), "(aa:") {
		t.Errorf("text report without MACs shows devices:\n%s", txt.String())
	}
	if !strings.Contains(txt.String(), "192.168.50.23, 192.168.50.24, 192.168.50.99, fd00::24") {
		t.Errorf("text report does not list the clients:\n%s", txt.String())
	}
}

// TestClientMACsBounded: an address keeps at most maxClientMACs MACs, the
// latest; more are counted as "4+".
func TestClientMACsBounded(t *testing.T) {
	l := NewLedger(nil, LedgerOptions{})
	base := deviceEvents()[0]
	for i := range 10 {
		ev := base
		ev.ClientPort = uint16(50000 + i)
		ev.ClientMAC = "aa:bb:cc:00:01:" + string("0123456789"[i]) + "0"
		l.Emit(ev)
	}
	ev := base
	ev.ClientPort, ev.ClientMAC = 50100, "AA-BB-CC-00-01-50" // seen before, spelled otherwise: not new
	l.Emit(ev)
	ev.ClientPort, ev.ClientMAC = 50101, "not a mac"
	l.Emit(ev)
	u := l.Report(ReportOptions{Now: reportNow}).Rules[0]
	want := []ClientMAC{{Client: "192.168.50.23", MAC: "aa:bb:cc:00:01:50", MACs: maxClientMACs, MACsTruncated: true}}
	if diff := cmp.Diff(want, u.ClientMACs); diff != "" {
		t.Errorf("client MACs (-want +got):\n%s", diff)
	}
	if len(u.Devices) != maxClientMACs || u.DeviceCount != maxClientMACs || !u.DevicesTruncated {
		t.Errorf("devices = %d (count %d, truncated %v), want %d and truncated", len(u.Devices), u.DeviceCount, u.DevicesTruncated, maxClientMACs)
	}
	var txt bytes.Buffer
	l.Report(ReportOptions{Now: reportNow}).WriteText(&txt)
	if !strings.Contains(txt.String(), "192.168.50.23 (aa:bb:cc:00:01:50, 4+ devices)") {
		t.Errorf("text report:\n%s", txt.String())
	}
}

// TestArchiveKeepsMACs: the summary of rotated-out files keeps the MACs
// seen with each client.
func TestArchiveKeepsMACs(t *testing.T) {
	a := deviceLedger(LedgerOptions{}).export()
	l := fromArchive(t, nil, a)
	checkDeviceReport(t, l.Report(ReportOptions{Now: reportNow}))

	// Cut to fit (fitArchive): the MACs of clients cut go with them.
	for i := range a.Rules {
		a.Rules[i].Clients, a.Rules[i].ClientsTruncated = cutClients(a.Rules[i].Clients, false, 1)
	}
	l = NewLedger(nil, LedgerOptions{})
	l.importArchive(a)
	u := l.Report(ReportOptions{Now: reportNow}).Rules[0]
	if diff := cmp.Diff(wantDeviceMACs[:1], u.ClientMACs); diff != "" || u.ClientCount != 1 {
		t.Errorf("cut summary: %d clients, MACs (-want +got):\n%s", u.ClientCount, diff)
	}
}
