package main

import (
	"bytes"
	"context"
	"encoding/json"
	"html"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"egressd/audit"
	"egressd/policy"
)

// seedFlow is one flow a site would make for a line of the vendor page.
type seedFlow struct {
	name  string // SNI or Host; "" for a bare address
	ip    string
	port  uint16
	proto string
	path  string
	rule  string // the profile's rule that must credit it
}

// seedLines maps every bracketed requirement of the vendor page
// (../shared/seed/firewall-exceptions.txt) to flows that exercise it.
// Every flow has its own destination, so each line is its own entry in
// the report.
var seedLines = map[string][]seedFlow{
	"443 TCP": {
		{"api.nirovision.com", "198.51.100.10", 443, "tcp", "", "vendor-cloud"},
		{"android.apis.google.com", "198.51.100.40", 443, "tcp", "", "android-mdm"}, // the Android section's [443 TCP]
	},
	"*.nirovision.com":       {{"a.b.nirovision.com", "198.51.100.11", 443, "tcp", "", "vendor-cloud"}},
	"*.balena-cloud.com":     {{"api.balena-cloud.com", "198.51.100.12", 443, "tcp", "", "vendor-cloud"}},
	"*.docker.com":           {{"production.cloudflare.docker.com", "198.51.100.13", 443, "tcp", "", "vendor-cloud"}},
	"*.docker.io":            {{"registry-1.docker.io", "198.51.100.14", 443, "tcp", "", "vendor-cloud"}},
	"*.agent.datadoghq.com":  {{"7-50-0-app.agent.datadoghq.com", "198.51.100.15", 443, "tcp", "", "vendor-cloud"}},
	"notion.so/nirovision/*": {{"notion.so", "198.51.100.16", 443, "tcp", "/nirovision/setup", "vendor-docs"}},
	"10516 TCP":              {{"agent-intake.logs.datadoghq.com", "198.51.100.17", 10516, "tcp", "", "health-logging"}},
	"123 UDP":                {{"pool.ntp.org", "198.51.100.18", 123, "udp", "", "ntp"}},
	"53 UDP":                 {{"", "192.0.2.53", 53, "udp", "", "dns"}},
	"Port 7001":              {{"", "192.168.10.70", 7001, "tcp", "", "nx-witness"}},
	"Port 5000":              {{"", "192.168.10.50", 5000, "tcp", "", "nx-witness"}},
	"5223 TCP":               {{"", "17.57.144.10", 5223, "tcp", "", "apple-mdm"}},
	"443 & 2197 TCP": {
		{"", "17.57.144.11", 443, "tcp", "", "apple-mdm"},
		{"", "17.57.144.12", 2197, "tcp", "", "apple-mdm"},
	},
	"5228, 5229, and 5230": {
		{"mtalk.google.com", "198.51.100.41", 5228, "tcp", "", "android-mdm"},
		{"alt1-mtalk.google.com", "198.51.100.42", 5229, "tcp", "", "android-mdm"},
		{"mtalk4.google.com", "198.51.100.43", 5230, "tcp", "", "android-mdm"},
	},
}

func (f seedFlow) dest() string {
	if f.name != "" {
		return f.name
	}
	return f.ip
}

// TestSeedPageInReport takes every requirement of the vendor page through
// the embedded profile and the report: each bracketed line of the page
// has flows here, the profile's decision allows each with the rule meant
// for it, and `egressd report` shows every one of them, under that rule,
// in JSON, text and HTML; a destination the page does not name is in the
// dropped list. A line added to the page without flows here fails.
func TestSeedPageInReport(t *testing.T) {
	page, err := os.ReadFile("../../../shared/seed/firewall-exceptions.txt")
	if err != nil {
		t.Fatalf("the seed page: %v", err)
	}
	var items []string
	for _, m := range regexp.MustCompile(`\[([^\]]+)\]`).FindAllStringSubmatch(string(page), -1) {
		items = append(items, m[1])
	}
	if len(items) < 15 {
		t.Fatalf("the seed page has %d bracketed requirements, want at least 15: %q", len(items), items)
	}
	for _, it := range items {
		if _, ok := seedLines[it]; !ok {
			t.Errorf("the seed page requires [%s]; the test has no flow for it", it)
		}
	}
	if !bytes.Contains(page, []byte("17.0.0.0/8")) {
		t.Errorf("the seed page no longer names 17.0.0.0/8")
	}

	eng, err := loadEngine("profile:nirovision", &bytes.Buffer{})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	l := audit.NewLedger(eng, audit.LedgerOptions{})
	j, _, err := audit.OpenJournal(audit.JournalConfig{Dir: dir}, l)
	if err != nil {
		t.Fatal(err)
	}
	go j.Run(context.Background())
	client := netip.MustParseAddr("192.168.10.5")
	i := 0
	emit := func(f seedFlow) audit.Event {
		i++
		ev := audit.Event{Kind: audit.KindFlow, Source: audit.SourceProxy, Time: time.Now().Add(-time.Hour + time.Duration(i)*time.Second),
			Client: client, ClientPort: uint16(40000 + i), Dest: netip.MustParseAddr(f.ip), DestPort: f.port, Proto: f.proto,
			Name: f.name, Path: f.path, BytesOut: 10, BytesIn: 100}
		if f.name != "" {
			ev.NameSource = audit.NameSNI
		}
		pr, _ := policy.ParseProto(f.proto)
		ev.Stamp(eng.Decide(policy.Input{Client: client, Dest: ev.Dest, Port: f.port, Proto: pr, Name: f.name, Path: f.path, Now: ev.Time}))
		j.Emit(ev)
		return ev
	}
	for _, it := range items {
		for _, f := range seedLines[it] {
			if ev := emit(f); ev.Verdict != policy.Allow || ev.Rule != f.rule {
				t.Errorf("[%s] %s:%d/%s: %s (%s) by %q, want allowed by %s", it, f.dest(), f.port, f.proto, ev.Verdict, ev.Reason, ev.Rule, f.rule)
			}
		}
	}
	tracker := seedFlow{"tracker.example", "203.0.113.9", 443, "tcp", "", ""}
	if ev := emit(tracker); ev.Verdict != policy.Deny {
		t.Errorf("%s: %s by %s, want denied", tracker.name, ev.Verdict, ev.Rule)
	}
	if err := j.Close(); err != nil {
		t.Fatal(err)
	}

	code, out, stderr := runCmd(t, "report", "--state-dir", dir, "--policy", "profile:nirovision", "--json")
	if code != exitOK {
		t.Fatalf("report --json: exit %d: %s", code, stderr)
	}
	var rep audit.Report
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatal(err)
	}
	rules := map[string]audit.RuleReport{}
	for _, rr := range rep.Rules {
		rules[rr.Name] = rr
	}
	code, text, stderr := runCmd(t, "report", "--state-dir", dir, "--policy", "profile:nirovision")
	if code != exitOK {
		t.Fatalf("report: exit %d: %s", code, stderr)
	}
	page2 := filepath.Join(t.TempDir(), "r.html")
	if code, _, stderr := runCmd(t, "report", "--state-dir", dir, "--policy", "profile:nirovision", "--html", page2); code != exitOK {
		t.Fatalf("report --html: exit %d: %s", code, stderr)
	}
	hb, err := os.ReadFile(page2)
	if err != nil {
		t.Fatal(err)
	}
	htmlPage := html.UnescapeString(string(hb))

	flows := map[string]uint64{}
	for _, it := range items {
		for _, f := range seedLines[it] {
			flows[f.rule]++
			rr, ok := rules[f.rule]
			if !ok {
				t.Errorf("[%s]: the JSON report has no rule %s", it, f.rule)
				continue
			}
			if !slices.Contains(rr.Destinations, f.dest()) {
				t.Errorf("[%s]: the JSON report's rule %s does not list %s: %v", it, f.rule, f.dest(), rr.Destinations)
			}
			row := regexp.MustCompile(`(?s)<tr data-rule="` + regexp.QuoteMeta(f.rule) + `">.*?</tr>`).FindString(htmlPage)
			if !strings.Contains(row, f.dest()+" (") {
				t.Errorf("[%s]: the HTML report's row of rule %s does not list %s: %q", it, f.rule, f.dest(), row)
			}
		}
	}
	for rule, n := range flows {
		if rules[rule].Flows != n {
			t.Errorf("rule %s: %d flows in the report, want %d", rule, rules[rule].Flows, n)
		}
		if !regexp.MustCompile(`(?m)^  ` + regexp.QuoteMeta(rule) + ` +` + regexp.QuoteMeta(itoa(n)) + ` `).MatchString(text) {
			t.Errorf("the text report has no line for rule %s with %d flows:\n%s", rule, n, text)
		}
	}
	if len(rep.UnusedRules) != 0 {
		t.Errorf("unused rules %v: every rule of the profile was exercised", rep.UnusedRules)
	}
	if len(rep.Dropped) != 1 || rep.Dropped[0].Dest != tracker.name || rep.Dropped[0].Port != 443 || rep.Dropped[0].Flows != 1 {
		t.Errorf("dropped %+v, want one flow to %s:443", rep.Dropped, tracker.name)
	}
	if !strings.Contains(text, tracker.name) || !strings.Contains(htmlPage, tracker.name) {
		t.Errorf("the text or HTML report does not list the dropped %s", tracker.name)
	}
}

func itoa(n uint64) string {
	b, _ := json.Marshal(n)
	return string(b)
}
