package e2e

import (
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"

	"egressd/policy"
)

// TestHostileNamesInOutputs: a LAN client chooses the names it asks for
// (DNS), the SNI it sends and the Host header and path of its requests.
// In each mode a client sends names meant to break the outputs: the
// keyword "private", quotes and YAML syntax, HTML, a newline that would
// forge a line, bytes that are not UTF-8. Then, from the event log:
//   - report --suggest pasted under the policy compiles, names no
//     keyword, and allows the client nothing more on the private ranges
//     than the policy did (before session 27 it suggested to:
//     ["private"]: RFC 1918 and ULA for the client that asked);
//   - the HTML report holds none of the client's markup;
//   - no line of the text report or of the daemon's log starts with
//     what followed a newline in a name.
func TestHostileNamesInOutputs(t *testing.T) {
	for _, mode := range []string{"audit", "enforce"} {
		t.Run(mode, func(t *testing.T) { testHostileNames(t, mode) })
	}
}

// forged is what follows a newline in a hostile name: a line of any
// output that starts with it was forged by the client.
const forged = "FORGEDH5"

func testHostileNames(t *testing.T, mode string) {
	tp := newTopo(t)
	d := newDaemon(t, tp, mode)
	d.start()
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("egressd output (last 4 KiB):\n%s", tail(d.logs(), 4096))
		}
	})
	// DNS names in presentation form: miekg/dns packs \DDD and \" as
	// the bytes they stand for.
	for _, name := range []string{
		"private.", "PRIVATE.", `evil\"q.example.`, `a\010` + forged + `.example.`, `b\013\010` + forged + `.example.`,
		"<script>x</script>.example.", `\255\254.example.`, `\000.example.`, `a\.b.example.`,
		"-.example.", "*.example.", "#c.example.", "{x}.example.",
	} {
		if _, err := tp.dnsQuery(name, dns.TypeA, 3*time.Second); err != nil {
			t.Logf("query %q: %v", name, err)
		}
	}
	trackerTLS := netip.AddrPortFrom(netip.MustParseAddr(trackerIP), 443).String()
	trackerHTTP := netip.AddrPortFrom(netip.MustParseAddr(trackerIP), 80).String()
	for _, sni := range []string{"private", "PRIVATE"} {
		tp.tlsGet(trackerTLS, sni, nil, nil) // the outcome is the mode's
	}
	for _, req := range []string{
		"GET / HTTP/1.1\r\nHost: private\r\nConnection: close\r\n\r\n",
		"GET /<script>x</script> HTTP/1.1\r\nHost: <script>y</script>.example\r\nConnection: close\r\n\r\n",
		"GET / HTTP/1.1\r\nHost: \"q\".example\r\nConnection: close\r\n\r\n",
	} {
		tp.rawHTTP(trackerHTTP, req)
	}
	time.Sleep(time.Second) // capture's ring
	d.stop()

	run := func(args ...string) string { return string(d.reportState(args...)) }
	text := run()
	t.Logf("report:\n%s", text)
	if !strings.Contains(text, "private") {
		t.Fatalf("the report has no drop for the name private: the test sent nothing\n%s", text)
	}
	sug := run("--suggest")
	t.Logf("suggestions:\n%s", sug)
	base := testPolicy(t)
	baseEng, err := policy.Compile("policy.yaml", base)
	if err != nil {
		t.Fatal(err)
	}
	pasted, err := policy.Compile("pasted.yaml", append(append(base, '\n'), sug...))
	if err != nil {
		t.Fatalf("the pasted suggestions do not compile: %v\n%s", err, sug)
	}
	if strings.Contains(sug, `"private"]`) || strings.Contains(sug, `"private",`) {
		t.Errorf("a suggestion names the keyword private:\n%s", sug)
	}
	client := netip.MustParseAddr(lanClient4)
	// A suggestion names the client by its MAC (capture saw one).
	var mac net.HardwareAddr
	for _, ev := range d.allEvents() {
		if ev.Client == lanClient4 && ev.ClientMAC != "" {
			mac, _ = net.ParseMAC(ev.ClientMAC)
			break
		}
	}
	for _, dst := range []string{"10.1.2.3", "172.16.0.9", "192.168.99.1", "fd12::1"} {
		for _, port := range []uint16{80, 443} {
			in := policy.Input{Client: client, ClientMAC: mac, Dest: netip.MustParseAddr(dst), Port: port, Proto: policy.TCP, Now: time.Now()}
			if got, was := pasted.Decide(in), baseEng.Decide(in); got.Allowed() && !was.Allowed() {
				t.Errorf("the pasted suggestions allow %s %s:%d (rule %s):\n%s", lanClient4, dst, port, got.Rule, sug)
			}
		}
	}

	htmlFile := filepath.Join(t.TempDir(), "report.html")
	run("--html", htmlFile)
	b, err := os.ReadFile(htmlFile)
	if err != nil {
		t.Fatal(err)
	}
	html := string(b)
	for _, bad := range []string{"<script", "</script"} {
		if strings.Contains(html, bad) {
			t.Errorf("the HTML report holds the client's %q", bad)
		}
	}
	for what, out := range map[string]string{"report": text, "report --suggest": sug, "egressd log": d.logs(), "report --json": run("--json")} {
		for _, l := range strings.Split(out, "\n") {
			if strings.HasPrefix(strings.ToUpper(strings.TrimSpace(l)), forged) {
				t.Errorf("%s: a line forged by a name: %q", what, l)
			}
		}
	}
}
