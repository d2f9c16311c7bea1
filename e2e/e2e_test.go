package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"
)

// tally is what the report must say: every flow and query the test made,
// per rule and per dropped destination.
type tally struct {
	rules   map[string]*count
	dropped map[dropKey]*count
}

type count struct {
	flows, queries uint64
	enforced       bool // dropped entries: the latest flow was blocked
}

type dropKey struct {
	dest  string
	port  uint16
	proto string
}

func newTally() *tally {
	return &tally{rules: map[string]*count{}, dropped: map[dropKey]*count{}}
}

func (ta *tally) rule(name string) *count {
	c := ta.rules[name]
	if c == nil {
		c = &count{}
		ta.rules[name] = c
	}
	return c
}

func (ta *tally) drop(dest string, port uint16, proto string) *count {
	k := dropKey{dest, port, proto}
	c := ta.dropped[k]
	if c == nil {
		c = &count{}
		ta.dropped[k] = c
	}
	return c
}

// The rules of the test policy, in file order.
var policyRules = []string{"vendor-cloud", "vendor-docs", "health-logging", "ntp", "dns", "nx-witness", "apple-mdm", "android-mdm"}

// TestGateway runs the whole appliance in each mode: the real binary in a
// gateway namespace between a LAN and an internet.
func TestGateway(t *testing.T) {
	for _, mode := range []string{"audit", "enforce"} {
		t.Run(mode, func(t *testing.T) {
			start := time.Now()
			tp := newTopo(t)
			gatewayScenario(t, tp, mode)
			t.Logf("%s: %v", mode, time.Since(start).Round(time.Millisecond))
		})
	}
}

func gatewayScenario(t *testing.T, tp *topo, mode string) {
	enforce := mode == "enforce"
	ta := newTally()

	// Before egressd: the topology routes, so what egressd blocks later
	// is blocked by egressd, and the internet can reach in.
	if _, err := tp.curl(trackerName, 443, trackerIP, "/", true); err != nil {
		t.Fatalf("without egressd: %v", err)
	}
	if n := tp.inboundAttempts(t); n != 4 {
		t.Fatalf("without egressd: %d of 4 inbound connections got in, want all (the check would prove nothing)", n)
	}
	tp.inboundHits.Store(0)

	d := newDaemon(t, tp, mode)
	d.start()
	if got := tp.nftTable(); !got {
		t.Fatalf("no nftables table inet egressd after start (mode %s, WAN guard on)", mode)
	}

	// dig asks the gateway once; the UDP exchange with the gateway's port
	// 53 is a flow of the seed's dns rule.
	var digPorts []int // the source ports of the digs the report must count
	dig := func(name, qtype, rule string, want ...string) {
		t.Helper()
		rcode, addrs := tp.dig(t, name, qtype)
		digPorts = append(digPorts, digBasePort+int(tp.digs.Load()%10000))
		ta.rule("dns").flows++
		if rule == "" {
			c := ta.drop(name, 53, "dns")
			c.queries++
			c.enforced = enforce
			if enforce {
				if rcode != "REFUSED" {
					t.Errorf("dig %s %s: %s %v, want REFUSED in enforce mode", name, qtype, rcode, addrs)
				}
				return
			}
		} else {
			ta.rule(rule).queries++
		}
		if rcode != "NOERROR" || !slices.Equal(addrs, want) {
			t.Errorf("dig %s %s: %s %v, want NOERROR %v", name, qtype, rcode, addrs, want)
		}
	}
	// allowed expects a client call to work and counts its flow.
	allowed := func(rule, what string, body string, err error, wantIn string) {
		t.Helper()
		ta.rule(rule).flows++
		if err != nil {
			t.Errorf("%s (allowed by %s): %v", what, rule, err)
		} else if !strings.Contains(body, wantIn) {
			t.Errorf("%s (allowed by %s): got %q, want it to contain %q", what, rule, body, wantIn)
		}
	}
	// denied expects a client call to fail in enforce mode and to work in
	// audit mode, and counts its flow in the dropped list.
	denied := func(dest string, port uint16, proto, what string, body string, err error, wantIn string) {
		t.Helper()
		c := ta.drop(dest, port, proto)
		c.flows++
		c.enforced = enforce
		switch {
		case enforce && err == nil:
			t.Errorf("%s: got through in enforce mode: %q", what, body)
		case !enforce && err != nil:
			t.Errorf("%s: blocked in audit mode: %v", what, err)
		case !enforce && !strings.Contains(body, wantIn):
			t.Errorf("%s: got %q, want it to contain %q", what, body, wantIn)
		}
	}

	// Allowed: the seed's names, through curl, openssl s_client and Go.
	dig(dockerName, "A", "vendor-cloud", dockerIP4)
	dig(dockerName, "AAAA", "vendor-cloud", dockerIP6)
	body, err := tp.curl(dockerName, 443, dockerIP4, "/v2/", true)
	allowed("vendor-cloud", "curl https://"+dockerName, body, err, "sni="+dockerName)
	body, err = tp.curl(dockerName, 443, dockerIP6, "/v2/", true)
	allowed("vendor-cloud", "curl -6 https://"+dockerName, body, err, "sni="+dockerName)

	dig(vendorName, "A", "vendor-cloud", vendorIP)
	body, err = tp.sClient(vendorIP, 443, vendorName)
	allowed("vendor-cloud", "openssl s_client "+vendorName+":443", body, err, "CONNECTION ESTABLISHED")

	dig(intakeName, "A", "health-logging", intakeIP)
	body, err = tp.sClient(intakeIP, 10516, intakeName)
	allowed("health-logging", "openssl s_client "+intakeName+":10516", body, err, "CONNECTION ESTABLISHED")

	dig(notionName, "A", "vendor-docs", notionIP)
	body, err = tp.curl(notionName, 443, notionIP, "/nirovision/setup-guide", true)
	allowed("vendor-docs", "curl https://notion.so/nirovision/...", body, err, "path=/nirovision/setup-guide")
	// Without --inspect only the host is visible on HTTPS, so the
	// host/path rule applies at host level: another path of notion.so
	// is allowed too, and credited to the same rule (DESIGN.md).
	body, err = tp.curl(notionName, 443, notionIP, "/someone-else/page", true)
	allowed("vendor-docs", "curl https://notion.so/someone-else/...", body, err, "path=/someone-else/page")

	// Go with an ML-KEM hello, resolving through the gateway itself.
	ta.rule("dns").flows++
	ta.rule("vendor-cloud").queries++
	res, err := tp.goMLKEM(registry)
	allowed("vendor-cloud", "Go TLS (X25519MLKEM768) to "+registry, res.reply, err, "group=X25519MLKEM768 sni="+registry)
	if err == nil && res.helloLen <= 1460 {
		t.Errorf("Go ML-KEM ClientHello was %d bytes: want more than one TCP segment (1460)", res.helloLen)
	}

	// The Apple rule: a name in it, and a bare address in its range.
	dig(apnsName, "A", "apple-mdm", apnsIP)
	body, err = tp.sClient(apnsIP, 5223, apnsName)
	allowed("apple-mdm", "openssl s_client "+apnsName+":5223", body, err, "CONNECTION ESTABLISHED")
	body, err = tp.curlIP(apnsBareIP, 5223)
	allowed("apple-mdm", "curl https://"+apnsBareIP+":5223 (no SNI)", body, err, "port=5223")

	// The Android rule: FCM's name on the first and last of its ports.
	dig(fcmName, "A", "android-mdm", fcmIP)
	for _, port := range []int{5228, 5230} {
		body, err = tp.sClient(fcmIP, port, fcmName)
		allowed("android-mdm", fmt.Sprintf("openssl s_client %s:%d", fcmName, port), body, err, "CONNECTION ESTABLISHED")
	}

	// NTP: the name through the gateway, then UDP 123 to its address.
	ta.rule("dns").flows++
	ta.rule("ntp").queries++
	lost, err := tp.ntp(ntpName, 3)
	allowed("ntp", "NTP to "+ntpName, "ok", err, "ok")
	if lost > 0 {
		// The address reaches the nftables set after the answer
		// reaches the client (see TestKnownBugs/udp-first-packet).
		t.Logf("NTP: %d request(s) lost before an answer", lost)
	}

	// Denied: a name no rule has, a look-alike of an allowed one, an
	// allowed host on a port no rule opens, UDP on a port no rule opens.
	dig(trackerName, "A", "", trackerIP)
	body, err = tp.curl(trackerName, 443, trackerIP, "/", true)
	denied(trackerName, 443, "tcp", "curl https://"+trackerName, body, err, "sni="+trackerName)
	dig(lookalike, "A", "", lookalikeIP)
	body, err = tp.sClient(lookalikeIP, 443, lookalike)
	denied(lookalike, 443, "tcp", "openssl s_client "+lookalike, body, err, "CONNECTION ESTABLISHED")
	body, err = tp.curl(vendorName, 80, vendorIP, "/", false)
	denied(vendorName, 80, "tcp", "curl http://"+vendorName+" (port 80)", body, err, "host="+vendorName)
	err = tp.udpEcho(fmt.Sprintf("%s:%d", udpDenyIP, udpDenyPort))
	denied(udpDenyIP, udpDenyPort, "udp", "UDP to port 7777", "echo:ping", err, "echo:ping")

	// Nothing gets in from the internet.
	if n := tp.inboundAttempts(t); n != 0 || tp.inboundHits.Load() != 0 {
		t.Errorf("%d inbound connections got in (%d accepted) with egressd running in %s mode", n, tp.inboundHits.Load(), mode)
	}

	// Reload. A long-lived TLS connection stays up across both reloads.
	ka, err := tp.openKeepAlive(dockerName, dockerIP4)
	if err != nil {
		t.Fatalf("long-lived connection: %v", err)
	}
	ta.rule("vendor-cloud").flows++
	kaGet := func(when string) {
		t.Helper()
		if body, err := ka.get("/keepalive"); err != nil || !strings.Contains(body, "path=/keepalive") {
			t.Errorf("long-lived connection %s: %q %v", when, body, err)
		}
	}
	kaGet("before the reloads")

	// A broken policy: the old one keeps running.
	good := testPolicy(t)
	// Capture classifies a flow when it ends: let the ledger have the
	// denied flow before the policy changes (see TestKnownBugs).
	d.waitDropped(trackerName, 443, "tcp", ta.dropped[dropKey{trackerName, 443, "tcp"}].flows)
	d.writePolicy([]byte("version: 1\nrules:\n  - name: [broken\n"))
	d.hup(false)
	kaGet("after a failed reload")
	body, err = tp.curl(trackerName, 443, trackerIP, "/", true)
	denied(trackerName, 443, "tcp", "curl https://"+trackerName+" after a failed reload", body, err, "sni="+trackerName)
	body, err = tp.curl(dockerName, 443, dockerIP4, "/", true)
	allowed("vendor-cloud", "curl https://"+dockerName+" after a failed reload", body, err, "sni="+dockerName)

	// A new rule: allowed at once, no restart.
	d.waitDropped(trackerName, 443, "tcp", ta.dropped[dropKey{trackerName, 443, "tcp"}].flows)
	d.writePolicy(append(good, newRule...))
	d.hup(true)
	kaGet("after a successful reload")
	dig(trackerName, "A", "e2e-new", trackerIP)
	body, err = tp.curl(trackerName, 443, trackerIP, "/", true)
	allowed("e2e-new", "curl https://"+trackerName+" after the reload added its rule", body, err, "sni="+trackerName)
	ka.close()

	// A clean stop flushes every flow to the event log. In audit mode it
	// removes the table; in enforce mode the table stays and the gateway
	// stays closed while egressd is down (a restart must not open a gap).
	// A restart rebuilds the ledger from the event log, and the report
	// must hold exactly what the test did.
	// The last connections' FINs; and capture reads its kernel drop
	// count once a second: the counters below are those of the end.
	time.Sleep(1100 * time.Millisecond)
	capCounters := d.captureCounters()
	d.stop()
	if enforce {
		if !tp.nftTable() {
			t.Errorf("enforce mode: nftables table inet egressd gone after a clean stop: the gateway is open until egressd is back")
		}
		// What the policy allows while egressd runs: nothing gets out
		// while it is down.
		_, errAllowed := tp.curl(dockerName, 443, dockerIP4, "/", true)
		rcode, _ := tp.dig(t, dockerName, "A")
		if errAllowed == nil || rcode == "NOERROR" {
			t.Errorf("enforce mode: traffic got out while egressd was stopped: allowed TCP err %v, DNS through the gateway %s", errAllowed, rcode)
		}
	} else if tp.nftTable() {
		t.Errorf("audit mode: nftables table inet egressd still there after a clean stop")
	}
	d.start()
	checkReport(t, d.report(), ta, mode)
	if t.Failed() {
		// What explains a count that is off by a flow: what capture lost
		// (kernel drops, evictions, …) and which dig it was.
		t.Logf("capture's counters before the stop: %s", capCounters)
		if gaps := digGaps(digPorts, d.allEvents()); gaps != "" {
			t.Logf("%d dns flows counted, %d of them digs: %s", ta.rule("dns").flows, len(digPorts), gaps)
		}
		t.Logf("egressd output:\n%s", d.logs())
		t.Logf("event log:\n%s", d.events())
	}

	// kill -9: audit fails open, enforce fails closed.
	d.kill9()
	_, errAllowed := tp.curl(dockerName, 443, dockerIP4, "/", true)
	_, errDenied := tp.curl(lookalike, 443, lookalikeIP, "/", true)
	errUDP := tp.udpEcho(fmt.Sprintf("%s:%d", udpDenyIP, udpDenyPort))
	rcode, _ := tp.dig(t, dockerName, "A")
	t.Logf("after kill -9 in %s mode: allowed TCP %v, denied TCP %v, UDP %v, DNS through the gateway %s", mode, errAllowed, errDenied, errUDP, rcode)
	if enforce {
		if errAllowed == nil || errDenied == nil || errUDP == nil || rcode == "NOERROR" {
			t.Errorf("enforce mode did not fail closed after kill -9: allowed TCP err %v, denied TCP err %v, UDP err %v, DNS %s", errAllowed, errDenied, errUDP, rcode)
		}
	} else {
		if errAllowed != nil || errDenied != nil || errUDP != nil {
			t.Errorf("audit mode did not fail open after kill -9: allowed TCP %v, denied TCP %v, UDP %v", errAllowed, errDenied, errUDP)
		}
	}
	if n := tp.inboundAttempts(t); n != 0 {
		t.Errorf("%d inbound connections got in after kill -9 in %s mode", n, mode)
	}

	if enforce {
		// The enforce run left its table (fail-closed). The next start is
		// in audit mode with nothing to install (no WAN guard): it must
		// take the leftover away, since audit never blocks.
		d.mode, d.noGuard = "audit", true
		d.start()
		if tp.nftTable() {
			t.Errorf("audit start after an enforce run: the enforce run's nftables table is still there")
		}
		_, errAllowed := tp.curl(dockerName, 443, dockerIP4, "/", true)
		_, errDenied := tp.curl(lookalike, 443, lookalikeIP, "/", true)
		if errAllowed != nil || errDenied != nil {
			t.Errorf("audit start after an enforce run blocks: allowed TCP %v, denied TCP %v", errAllowed, errDenied)
		}
		d.stop()
	}
}

// checkReport compares the report with the tally, exactly.
func checkReport(t *testing.T, r *report, ta *tally, mode string) {
	t.Helper()
	if r.Mode != mode {
		t.Errorf("report mode %q, want %q", r.Mode, mode)
	}
	if r.ShedEvents != 0 {
		t.Errorf("report: %d events shed", r.ShedEvents)
	}
	got := map[string]count{}
	for _, rr := range r.Rules {
		got[rr.Name] = count{flows: rr.Flows, queries: rr.Queries}
		if !slices.Equal(rr.Clients, []string{lanClient4}) && !slices.Equal(rr.Clients, []string{lanClient4, lanClient6}) && !slices.Equal(rr.Clients, []string{lanClient6, lanClient4}) {
			t.Errorf("report: rule %s clients %v, want the LAN client's addresses", rr.Name, rr.Clients)
		}
	}
	for _, name := range sortedKeys(ta.rules) {
		want := *ta.rules[name]
		if g := got[name]; g.flows != want.flows || g.queries != want.queries {
			t.Errorf("report: rule %s: %d flows, %d queries; want %d flows, %d queries", name, g.flows, g.queries, want.flows, want.queries)
		}
		delete(got, name)
	}
	for name, g := range got {
		t.Errorf("report: rule %s has %d flows, %d queries; the test made none", name, g.flows, g.queries)
	}
	var wantUnused []string
	for _, name := range policyRules {
		if ta.rules[name] == nil {
			wantUnused = append(wantUnused, name)
		}
	}
	unused := slices.Clone(r.UnusedRules)
	sort.Strings(unused)
	sort.Strings(wantUnused)
	if !slices.Equal(unused, wantUnused) {
		t.Errorf("report: unused rules %v, want %v", unused, wantUnused)
	}

	gotDrop := map[dropKey]count{}
	for _, dr := range r.Dropped {
		k := dropKey{dr.Dest, dr.Port, dr.Proto}
		if _, dup := gotDrop[k]; dup {
			t.Errorf("report: dropped entry %v listed twice", k)
		}
		gotDrop[k] = count{flows: dr.Flows, queries: dr.Queries, enforced: dr.Enforced}
		if !slices.Equal(dr.Clients, []string{lanClient4}) {
			t.Errorf("report: dropped %v clients %v, want [%s]", k, dr.Clients, lanClient4)
		}
	}
	for k, want := range ta.dropped {
		g, ok := gotDrop[k]
		if !ok {
			t.Errorf("report: dropped list has no %s:%d/%s (want %d flows, %d queries)", k.dest, k.port, k.proto, want.flows, want.queries)
			continue
		}
		if g.flows != want.flows || g.queries != want.queries || g.enforced != want.enforced {
			t.Errorf("report: dropped %s:%d/%s: %d flows, %d queries, enforced %v; want %d, %d, %v", k.dest, k.port, k.proto, g.flows, g.queries, g.enforced, want.flows, want.queries, want.enforced)
		}
		delete(gotDrop, k)
	}
	for k, g := range gotDrop {
		t.Errorf("report: dropped %s:%d/%s: %d flows, %d queries; the test made none", k.dest, k.port, k.proto, g.flows, g.queries)
	}
}

func sortedKeys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// TestInspect runs enforce mode with --inspect: the seed's host/path rule
// notion.so/nirovision/* is then checked per request, so another path of
// notion.so is blocked. The client trusts egressd's CA (egressd ca export).
func TestInspect(t *testing.T) {
	tp := newTopo(t)
	d := newDaemon(t, tp, "enforce")
	d.extra = []string{"--inspect"}
	d.start()
	pem := tp.gw.MustRun(egressdBin, "ca", "export", "--state-dir", d.stateDir)
	if !strings.Contains(pem, "BEGIN CERTIFICATE") {
		t.Fatalf("egressd ca export: %s", pem)
	}
	tp.caFile = filepath.Join(t.TempDir(), "egressd-ca.pem")
	if err := os.WriteFile(tp.caFile, []byte(pem), 0o600); err != nil {
		t.Fatal(err)
	}
	ta := newTally()
	if rcode, addrs := tp.dig(t, notionName, "A"); rcode != "NOERROR" || !slices.Equal(addrs, []string{notionIP}) {
		t.Fatalf("dig %s: %s %v", notionName, rcode, addrs)
	}
	ta.rule("dns").flows++
	ta.rule("vendor-docs").queries++

	body, err := tp.curl(notionName, 443, notionIP, "/nirovision/setup-guide", true)
	if err != nil || !strings.Contains(body, "path=/nirovision/setup-guide") {
		t.Errorf("https://notion.so/nirovision/setup-guide through inspection: %q %v", body, err)
	}
	ta.rule("vendor-docs").flows++
	body, err = tp.curl(notionName, 443, notionIP, "/someone-else/page", true)
	if err == nil {
		t.Errorf("https://notion.so/someone-else/page got through with inspection on: %q", body)
	}
	// The connection is a flow of the rule its host was decided by; the
	// refused request in it is a dropped request, not a flow (as on plain
	// HTTP).
	ta.rule("vendor-docs").flows++
	c := ta.drop(notionName, 443, "tcp")
	c.enforced = true

	time.Sleep(500 * time.Millisecond)
	d.stop()
	d.start()
	checkReport(t, d.report(), ta, "enforce")
	if t.Failed() {
		t.Logf("egressd output:\n%s", d.logs())
	}
}
