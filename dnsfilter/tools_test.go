package dnsfilter

import (
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// needTool fails (not skips) when a Debian tool the tests rely on is
// missing.
func needTool(t *testing.T, name, pkg string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		t.Fatalf("%s not found: install the Debian package %s", name, pkg)
	}
	return p
}

type digResult struct {
	status  string
	answers []string // "name ttl IN type rdata", whitespace-normalised
	ede     string
	flags   string
	out     string
}

// dig runs Debian's dig against addr.
func dig(t *testing.T, addr string, args ...string) digResult {
	t.Helper()
	host, port, _ := net.SplitHostPort(addr)
	argv := append([]string{"@" + host, "-p", port, "+tries=1", "+time=3"}, args...)
	out, err := exec.Command(needTool(t, "dig", "dnsutils"), argv...).CombinedOutput()
	if err != nil {
		t.Fatalf("dig %v: %v\n%s", argv, err, out)
	}
	r := digResult{out: string(out)}
	if m := regexp.MustCompile(`status: ([A-Z]+)`).FindStringSubmatch(r.out); m != nil {
		r.status = m[1]
	}
	if m := regexp.MustCompile(`;; flags: ([a-z ]+);`).FindStringSubmatch(r.out); m != nil {
		r.flags = m[1]
	}
	if m := regexp.MustCompile(`; EDE: (.*)`).FindStringSubmatch(r.out); m != nil {
		r.ede = m[1]
	}
	section := ""
	for _, line := range strings.Split(r.out, "\n") {
		switch {
		case strings.HasPrefix(line, ";; ANSWER SECTION"):
			section = "answer"
		case strings.HasPrefix(line, ";;"), strings.TrimSpace(line) == "":
			section = ""
		case section == "answer" && !strings.HasPrefix(line, ";"):
			r.answers = append(r.answers, strings.Join(strings.Fields(line), " "))
		}
	}
	return r
}

func TestDig(t *testing.T) {
	up := newFakeUpstream(t, labZone+bigTXT(40))
	ts := startServer(t, enforcePolicy, Config{Upstreams: []string{up.Addr}}, Deps{})
	for _, tr := range []string{"+notcp", "+tcp"} {
		r := dig(t, ts.Addr, tr, "WWW.allowed.test", "A")
		if r.status != "NOERROR" || len(r.answers) != 1 || !strings.HasSuffix(r.answers[0], "IN A 192.0.2.10") || !strings.Contains(r.flags, "ra") {
			t.Errorf("dig %s allowed A: %+v", tr, r)
		}
		r = dig(t, ts.Addr, tr, "www.allowed.test.", "AAAA")
		if r.status != "NOERROR" || len(r.answers) != 1 || !strings.HasSuffix(r.answers[0], "IN AAAA 2001:db8::10") {
			t.Errorf("dig %s AAAA: %+v", tr, r)
		}
		r = dig(t, ts.Addr, tr, "tracker.evil.example", "A")
		if r.status != "REFUSED" || !strings.Contains(r.ede, "15 (Blocked)") || !strings.Contains(r.ede, "test-policy.yaml") {
			t.Errorf("dig %s denied: status %s, EDE %q\n%s", tr, r.status, r.ede, r.out)
		}
		r = dig(t, ts.Addr, tr, "use-application-dns.net", "A")
		if r.status != "NXDOMAIN" {
			t.Errorf("dig %s canary: %s", tr, r.status)
		}
		r = dig(t, ts.Addr, tr, "cdn.allowed.test", "A")
		if r.status != "NOERROR" || len(r.answers) != 2 {
			t.Errorf("dig %s CNAME chain: %+v", tr, r)
		}
	}
	// dig +ignore over UDP without EDNS shows the TC bit; without +ignore
	// dig retries over TCP itself and gets everything.
	r := dig(t, ts.Addr, "+noedns", "+ignore", "big.allowed.test", "TXT")
	if !strings.Contains(r.flags, "tc") {
		t.Errorf("big TXT over UDP without EDNS: flags %q", r.flags)
	}
	r = dig(t, ts.Addr, "+noedns", "big.allowed.test", "TXT")
	if len(r.answers) != 40 {
		t.Errorf("big TXT after dig's TCP retry: %d answers", len(r.answers))
	}
	if up.count("tracker.evil.example") != 0 {
		t.Errorf("denied name reached the upstream")
	}
}

// freeLoopbackPort returns a port free for UDP and TCP on 127.0.0.1 at the
// time of the call.
func freeLoopbackPort(t *testing.T) int {
	t.Helper()
	for i := 0; i < 20; i++ {
		pc, err := net.ListenPacket("udp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := pc.LocalAddr().(*net.UDPAddr).Port
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		pc.Close()
		if err == nil {
			l.Close()
			return port
		}
	}
	t.Fatal("no free port")
	return 0
}

// startUnbound runs Debian's unbound as an authoritative-only server for
// zone.test on a loopback port of its own (never port 53, never the
// system's service), killed by PID when the test ends.
func startUnbound(t *testing.T) string {
	t.Helper()
	bin := needTool(t, "unbound", "unbound")
	dir := t.TempDir()
	port := freeLoopbackPort(t)
	conf := fmt.Sprintf(`server:
	interface: 127.0.0.1@%[1]d
	port: %[1]d
	do-ip6: no
	num-threads: 1
	chroot: ""
	username: ""
	directory: "%[2]s"
	pidfile: "%[2]s/unbound.pid"
	use-syslog: no
	logfile: ""
	verbosity: 1
	module-config: "iterator"
	access-control: 127.0.0.0/8 allow
	local-zone: "." refuse
	local-zone: "zone.test." static
	local-data: "zone.test. 300 IN SOA ns.zone.test. h.zone.test. 1 3600 600 86400 30"
	local-data: "www.zone.test. 300 IN A 192.0.2.50"
	local-data: "www.zone.test. 300 IN AAAA 2001:db8::50"
	local-data: "meta.zone.test. 300 IN A 169.254.169.254"
	local-data: 'txt.zone.test. 300 IN TXT "hello from unbound"'
remote-control:
	control-enable: no
`, port, dir)
	path := filepath.Join(dir, "unbound.conf")
	if err := os.WriteFile(path, []byte(conf), 0o600); err != nil {
		t.Fatal(err)
	}
	logf, err := os.Create(filepath.Join(dir, "unbound.log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "-d", "-c", path)
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill() // by PID: the process we started
		<-exited
		logf.Close()
	})
	addr := "127.0.0.1:" + strconv.Itoa(port)
	deadline := time.Now().Add(10 * time.Second)
	for {
		m := new(dns.Msg)
		m.SetQuestion("www.zone.test.", dns.TypeA)
		if r, _, err := (&dns.Client{Timeout: 200 * time.Millisecond}).Exchange(m, addr); err == nil && r.Rcode == dns.RcodeSuccess {
			return addr
		}
		select {
		case <-exited:
			log, _ := os.ReadFile(logf.Name())
			t.Fatalf("unbound exited:\n%s", log)
		default:
		}
		if time.Now().After(deadline) {
			log, _ := os.ReadFile(logf.Name())
			t.Fatalf("unbound did not answer on %s:\n%s", addr, log)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestUnboundUpstream forwards to a real unbound serving a test zone.
func TestUnboundUpstream(t *testing.T) {
	ub := startUnbound(t)
	ts := startServer(t, "version: 1\nmode: enforce\nrules:\n  - name: zone\n    to: [\"*.zone.test\"]\n    ports: [443/tcp]\n",
		Config{Upstreams: []string{ub}}, Deps{})
	for _, tr := range []string{"+notcp", "+tcp"} {
		r := dig(t, ts.Addr, tr, "www.zone.test", "A")
		if r.status != "NOERROR" || len(r.answers) != 1 || !strings.HasSuffix(r.answers[0], "IN A 192.0.2.50") {
			t.Errorf("dig %s: %+v", tr, r)
		}
		r = dig(t, ts.Addr, tr, "www.zone.test", "AAAA")
		if len(r.answers) != 1 || !strings.HasSuffix(r.answers[0], "2001:db8::50") {
			t.Errorf("dig %s AAAA: %+v", tr, r)
		}
		r = dig(t, ts.Addr, tr, "txt.zone.test", "TXT")
		if len(r.answers) != 1 || !strings.Contains(r.answers[0], "hello from unbound") {
			t.Errorf("dig %s TXT: %+v", tr, r)
		}
		r = dig(t, ts.Addr, tr, "nope.zone.test", "A")
		if r.status != "NXDOMAIN" {
			t.Errorf("dig %s NXDOMAIN: %+v", tr, r)
		}
		r = dig(t, ts.Addr, tr, "meta.zone.test", "A")
		if r.status != "NOERROR" || len(r.answers) != 0 {
			t.Errorf("dig %s rebinding: %+v", tr, r)
		}
		r = dig(t, ts.Addr, tr, "www.other.test", "A")
		if r.status != "REFUSED" {
			t.Errorf("dig %s denied: %+v", tr, r)
		}
	}
	// miekg's client too, through the cache.
	for _, proto := range []string{"udp", "tcp"} {
		if r := ask(t, proto, ts.Addr, "WWW.zone.test.", dns.TypeA, true); len(answerAddrs(r)) != 1 {
			t.Errorf("%s: %v", proto, r)
		}
	}
}
