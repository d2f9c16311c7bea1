package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestAuditCommand runs `egressd audit` over a real capture (read in place,
// never copied) and checks the report JSON names the flow by its SNI.
func TestAuditCommand(t *testing.T) {
	pcap := "../../../shared/pcaps/ndpi/tls_2_reasms.pcapng"
	if _, err := os.Stat(pcap); err != nil {
		t.Fatalf("real captures missing: %v", err)
	}
	dir := t.TempDir()
	pol := filepath.Join(dir, "p.yaml")
	os.WriteFile(pol, []byte("version: 1\nrules:\n  - name: insta\n    to: [\"*.instagram.com\"]\n    ports: [443/tcp]\n"), 0o644)

	var out, errb bytes.Buffer
	if code := run(context.Background(), []string{"audit", pcap, "--policy", pol, "--json"}, &out, &errb); code != 0 {
		t.Fatalf("exit %d: %s", code, errb.String())
	}
	var rep struct {
		Rules []struct {
			Name         string `json:"name"`
			Flows        int    `json:"flows"`
			Destinations []any  `json:"destinations"`
		} `json:"rules"`
		Dropped []any `json:"dropped"`
	}
	if err := json.Unmarshal(out.Bytes(), &rep); err != nil {
		t.Fatalf("report JSON: %v\n%s", err, out.String())
	}
	if len(rep.Rules) != 1 || rep.Rules[0].Name != "insta" || rep.Rules[0].Flows != 1 || len(rep.Dropped) != 0 {
		t.Fatalf("report %s", out.String())
	}
	if !strings.Contains(out.String(), "i.instagram.com") {
		t.Errorf("report does not name i.instagram.com: %s", out.String())
	}

	// HTML goes to the file, the text report to stdout.
	out.Reset()
	html := filepath.Join(dir, "r.html")
	if code := run(context.Background(), []string{"audit", "--policy", pol, pcap, "--html", html}, &out, &errb); code != 0 {
		t.Fatalf("exit %d: %s", code, errb.String())
	}
	if b, err := os.ReadFile(html); err != nil || !bytes.Contains(b, []byte("insta")) {
		t.Errorf("html report: %v %.200s", err, b)
	}
	// --replay hands the policy and the path to runReplay (no capture).
	out.Reset()
	if code := run(context.Background(), []string{"audit", "--policy", pol, "--replay", t.TempDir(), "--json"}, &out, &errb); code != 0 {
		t.Errorf("--replay: exit %d: %s", code, errb.String())
	}
	if code := run(context.Background(), []string{"audit", "--policy", pol, "--replay", dir, pcap}, &out, &errb); code != exitUsage {
		t.Errorf("--replay with a capture: exit %d, want %d", code, exitUsage)
	}
	// Usage errors.
	if code := run(context.Background(), []string{"audit", pcap}, &out, &errb); code != exitUsage {
		t.Errorf("no --policy: exit %d, want %d", code, exitUsage)
	}
	if code := run(context.Background(), []string{"audit", "--policy", pol, filepath.Join(dir, "none.pcap")}, &out, &errb); code != exitFail {
		t.Errorf("missing file: exit %d, want %d", code, exitFail)
	}
}

// TestAuditReplayFlags checks the flags --replay cannot honour: --html (a
// replay has no HTML form) must be refused rather than ignored, which left
// no file behind and exited 0, and --mode (which a replay cannot honour)
// is a usage error there too.
func TestAuditReplayFlags(t *testing.T) {
	dir := t.TempDir()
	pol := filepath.Join(dir, "p.yaml")
	os.WriteFile(pol, []byte("rules:\n  - {name: a, to: [a.test], ports: [443/tcp]}\n"), 0o644)
	html := filepath.Join(dir, "r.html")
	for _, args := range [][]string{
		{"audit", "--policy", pol, "--replay", dir, "--html", html},
		{"audit", "--replay", dir, "--policy", pol, "--json", "--html", html},
		{"audit", "--policy", pol, "--replay", dir, "--mode", "enforcing"},
	} {
		code, _, stderr := runCLI(t, args...)
		if code != exitUsage {
			t.Errorf("%v: exit %d, want %d (%s)", args, code, exitUsage, stderr)
		}
	}
	if _, err := os.Stat(html); err == nil {
		t.Errorf("an HTML file was written")
	}
	// A replay decides nothing the mode changes: --mode would do nothing.
	if code, _, stderr := runCLI(t, "audit", "--replay", dir, "--mode", "enforce", "--policy", pol); code != exitUsage || !strings.Contains(stderr, "--mode") {
		t.Errorf("replay with --mode enforce: exit %d, want %d and a word on --mode: %s", code, exitUsage, stderr)
	}
	if code, _, stderr := runCLI(t, "audit", "--replay", dir, "--policy", pol); code != exitOK {
		t.Errorf("replay: exit %d: %s", code, stderr)
	}
}

// TestAuditMACNotes: where a policy names clients by MAC, the offline
// audit says that it matches a client's frames' MAC, which for a client
// behind a router is the router's (egressd run's proxy and forwarder see
// none), and a replay says how many recorded events carry no MAC (the
// candidate's MAC rules matched none of them); without MACs neither says
// anything.
func TestAuditMACNotes(t *testing.T) {
	pcap := "../../../shared/pcaps/ndpi/tls_2_reasms.pcapng"
	if _, err := os.Stat(pcap); err != nil {
		t.Fatalf("real captures missing: %v", err)
	}
	dir := t.TempDir()
	plain := filepath.Join(dir, "p.yaml")
	os.WriteFile(plain, []byte("version: 1\nrules:\n  - name: insta\n    to: [\"*.instagram.com\"]\n    ports: [443/tcp]\n"), 0o644)
	macs := filepath.Join(dir, "m.yaml")
	os.WriteFile(macs, []byte("version: 1\ngroups:\n  kiosks: [\"02:00:00:00:00:0a\"]\nrules:\n  - name: insta\n    from: [kiosks]\n    to: [\"*.instagram.com\"]\n    ports: [443/tcp]\n"), 0o644)
	events := t.TempDir()
	recordEvents(t, events)
	for _, c := range []struct {
		pol  string
		want bool
	}{{plain, false}, {macs, true}} {
		var out, errb bytes.Buffer
		if code := run(context.Background(), []string{"audit", pcap, "--policy", c.pol, "--json"}, &out, &errb); code != 0 {
			t.Fatalf("exit %d: %s", code, errb.String())
		}
		if got := strings.Contains(errb.String(), "offline, a client's MAC is its frames' source address"); got != c.want {
			t.Errorf("%s: the offline MAC note %v, want %v:\n%s", c.pol, got, c.want, errb.String())
		}
		out.Reset()
		errb.Reset()
		if code := run(context.Background(), []string{"audit", "--policy", c.pol, "--replay", events}, &out, &errb); code != 0 {
			t.Fatalf("--replay: exit %d: %s", code, errb.String())
		}
		if got := strings.Contains(errb.String(), "recorded flows, requests or queries carry no client MAC"); got != c.want {
			t.Errorf("%s: the replay's MAC warning %v, want %v:\n%s", c.pol, got, c.want, errb.String())
		}
	}
}
