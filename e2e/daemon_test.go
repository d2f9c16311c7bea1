package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"egressd/internal/testnet"
	"egressd/profiles"
)

// testPolicy is the seed profile with one change: the Apple rule's
// 17.0.0.0/8, a real-world range, becomes appleTest, a test range inside
// the namespaces. Every other rule is the seed's, byte for byte.
func testPolicy(t *testing.T) []byte {
	t.Helper()
	seed, err := profiles.Get("nirovision")
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Count(seed, []byte("- 17.0.0.0/8\n")) != 1 {
		t.Fatal("the seed profile no longer lists 17.0.0.0/8 once: update the e2e test policy")
	}
	return bytes.Replace(seed, []byte("- 17.0.0.0/8\n"), []byte("- "+appleTest+"\n"), 1)
}

// newRule is appended to the policy by the reload test: it allows what the
// seed denies.
const newRule = `
  - name: e2e-new
    why: added by the end-to-end test's reload
    to: ["` + trackerName + `"]
    ports: [443/tcp]
`

// daemon is one egressd run process in the gateway namespace.
type daemon struct {
	t        *testing.T
	tp       *topo
	mode     string
	noGuard  bool // audit mode without --guard-wan: nothing to install
	policy   string
	stateDir string
	proc     *testnet.Proc
	runs     int
	logDir   string
	logFile  string
	extra    []string // more egressd run flags
	wrap     []string // a command egressd runs under (setpriv ...), egressd's path and arguments its own
	bin      string   // the egressd binary to run; "": egressdBin
	admin    string   // --admin; "": adminAddr
	// unready makes start wait for /readyz to answer, 503 too: a part
	// is expected not to run at start.
	unready bool
}

// logs returns what egressd printed so far (stdout and stderr).
func (d *daemon) logs() string {
	var b strings.Builder
	for i := 1; i <= d.runs; i++ {
		l, _ := os.ReadFile(filepath.Join(d.logDir, fmt.Sprintf("egressd-%d.log", i)))
		fmt.Fprintf(&b, "--- run %d\n%s", i, l)
	}
	return b.String()
}

// dumpOnFailure logs what egressd printed and its flow events when the
// test has failed, at its end.
func (d *daemon) dumpOnFailure() {
	d.t.Cleanup(func() {
		if d.t.Failed() {
			d.t.Logf("egressd output:\n%s", d.logs())
			d.t.Logf("flows:\n%s", d.events())
		}
	})
}

// events returns the flow events of the event log in the state directory,
// one short line each, for failure messages.
func (d *daemon) events() string {
	var b strings.Builder
	files, _ := filepath.Glob(filepath.Join(d.stateDir, "*"))
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(data), "\n") {
			var ev struct {
				Kind, Source, Client, Proto, Name, Verdict, Rule, Time string
				Dest                                                   string `json:"dest_ip"`
				ClientPort                                             int    `json:"client_port"`
				DestPort                                               int    `json:"dest_port"`
			}
			if json.Unmarshal([]byte(line), &ev) != nil || ev.Kind != "flow" {
				continue
			}
			fmt.Fprintf(&b, "%s %-8s %s:%d > %s:%d/%s %s %s %s\n", ev.Time, ev.Source, ev.Client, ev.ClientPort, ev.Dest, ev.DestPort, ev.Proto, ev.Name, ev.Verdict, ev.Rule)
		}
	}
	return b.String()
}

// waitDropped waits up to 10s until the running daemon's report lists
// flows flows to dest:port/proto as dropped: the ledger has them (capture
// reports a TCP flow when it closes).
func (d *daemon) waitDropped(dest string, port uint16, proto string, flows uint64) {
	d.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		var got uint64
		for _, dr := range d.report().Dropped {
			if dr.Dest == dest && dr.Port == port && dr.Proto == proto {
				got = dr.Flows
			}
		}
		if got == flows {
			return
		}
		if time.Now().After(deadline) {
			d.t.Fatalf("report: dropped %s:%d/%s has %d flows after 10s, want %d", dest, port, proto, got, flows)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func newDaemon(t *testing.T, tp *topo, mode string) *daemon {
	d := &daemon{t: t, tp: tp, mode: mode, stateDir: t.TempDir(), logDir: t.TempDir()}
	d.policy = filepath.Join(t.TempDir(), "policy.yaml")
	d.writePolicy(testPolicy(t))
	return d
}

func (d *daemon) writePolicy(b []byte) {
	d.t.Helper()
	// World-readable, as /etc/egressd/policy.yaml is: the unit runs
	// egressd as a user of its own (TestSystemdUnitLimits).
	if err := os.WriteFile(d.policy+".tmp", b, 0o644); err != nil {
		d.t.Fatal(err)
	}
	if err := os.Rename(d.policy+".tmp", d.policy); err != nil {
		d.t.Fatal(err)
	}
}

// start runs egressd and waits until /readyz says every part runs.
func (d *daemon) start() {
	t := d.t
	t.Helper()
	bin := d.bin
	if bin == "" {
		bin = egressdBin
	}
	args := []string{bin, "run", "--policy", d.policy,
		"--lan", "lan0", "--wan", "wan0", "--state-dir", d.stateDir, "--upstream-dns", authDNS4,
		"--admin", d.adminAddr(), "--log-level", "info"}
	if d.mode != "" { // "": the policy file's mode
		args = append(args, "--mode", d.mode)
	}
	args = append(args, d.extra...)
	if d.mode == "audit" && !d.noGuard {
		// The WAN guard is off by default in audit mode (see the
		// firewall package); the suite checks it keeps the internet
		// out in both modes.
		args = append(args, "--guard-wan")
	}
	args = append(slices.Clone(d.wrap), args...)
	// Output goes to a file (read while egressd runs, without racing its
	// writes); sh execs egressd, so the PID signalled is egressd's.
	// SSL_CERT_FILE is the test CA: the inspecting proxy verifies the
	// origins with it.
	d.runs++
	d.logFile = filepath.Join(d.logDir, fmt.Sprintf("egressd-%d.log", d.runs))
	d.proc = d.tp.gw.Start(append([]string{"sh", "-c", `SSL_CERT_FILE='` + d.tp.caFile + `' exec "$0" "$@" >'` + d.logFile + `' 2>&1`}, args...)...)
	deadline := time.Now().Add(20 * time.Second)
	for {
		code, body, err := d.get("/readyz")
		if err == nil && (code == 200 || d.unready && code == 503) {
			return
		}
		select {
		case <-d.proc.Done():
			t.Fatalf("egressd exited at start: %v\n%s", d.proc.Cmd.ProcessState, d.logs())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("egressd not ready in 20s: %d %s %v\n%s", code, body, err, d.logs())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// stop sends SIGTERM and waits for a clean exit.
func (d *daemon) stop() {
	t := d.t
	t.Helper()
	d.proc.Signal(syscall.SIGTERM)
	select {
	case <-d.proc.Done():
	case <-time.After(20 * time.Second):
		t.Fatalf("egressd did not stop within 20s of SIGTERM\n%s", d.logs())
	}
	if st := d.proc.Cmd.ProcessState; st == nil || st.ExitCode() != 0 {
		t.Fatalf("egressd exited with %v after SIGTERM\n%s", st, d.logs())
	}
}

// kill9 kills egressd with SIGKILL and waits for it to be gone.
func (d *daemon) kill9() {
	d.t.Helper()
	d.proc.Signal(syscall.SIGKILL)
	select {
	case <-d.proc.Done():
	case <-time.After(10 * time.Second):
		d.t.Fatal("egressd still alive 10s after SIGKILL")
	}
}

// adminAddr is the daemon's --admin.
func (d *daemon) adminAddr() string {
	if d.admin != "" {
		return d.admin
	}
	return adminAddr
}

// get fetches a path of the admin address, from inside the gateway.
func (d *daemon) get(path string) (int, string, error) {
	c := &http.Client{Timeout: 3 * time.Second, Transport: &http.Transport{DialContext: d.tp.gw.DialContext, DisableKeepAlives: true}}
	resp, err := c.Get("http://" + d.adminAddr() + path)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 8<<20))
	return resp.StatusCode, string(b), err
}

// metric returns the value of one series on /metrics (0 when absent).
func (d *daemon) metric(series string) float64 {
	d.t.Helper()
	_, body, err := d.get("/metrics")
	if err != nil {
		d.t.Fatalf("GET /metrics: %v", err)
	}
	re := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(series) + ` (\S+)$`)
	m := re.FindStringSubmatch(body)
	if m == nil {
		return 0
	}
	v, _ := strconv.ParseFloat(m[1], 64)
	return v
}

// metricSum returns the sum of every series of the metric name on
// /metrics, whatever their labels (0 when there is none).
func (d *daemon) metricSum(name string) float64 {
	d.t.Helper()
	_, body, err := d.get("/metrics")
	if err != nil {
		d.t.Fatalf("GET /metrics: %v", err)
	}
	var sum float64
	for _, line := range strings.Split(body, "\n") {
		series, v, ok := strings.Cut(line, " ")
		if !ok || series != name && !strings.HasPrefix(series, name+"{") {
			continue
		}
		f, err := strconv.ParseFloat(v, 64)
		if err != nil {
			d.t.Fatalf("/metrics: %q: %v", line, err)
		}
		sum += f
	}
	return sum
}

// captureCounters returns capture's counters on /metrics
// (egress_capture_*_total: packets, kernel drops, malformed, evicted, …)
// as one line, for a failure's diagnosis; the error when /metrics fails.
func (d *daemon) captureCounters() string {
	_, body, err := d.get("/metrics")
	if err != nil {
		return fmt.Sprintf("GET /metrics: %v", err)
	}
	var out []string
	for _, line := range strings.Split(body, "\n") {
		if name, v, ok := strings.Cut(line, " "); ok && strings.HasPrefix(name, "egress_capture_") && strings.HasSuffix(name, "_total") {
			out = append(out, strings.TrimPrefix(strings.TrimSuffix(name, "_total"), "egress_capture_")+"="+v)
		}
	}
	return strings.Join(out, " ")
}

// hup sends SIGHUP and waits (10s at most) for the daemon's log line of
// the reload's outcome, then checks the reload gauge on /metrics.
func (d *daemon) hup(ok bool) {
	d.t.Helper()
	line := `"msg":"reload failed`
	if ok {
		line = `"msg":"policy reloaded"`
	}
	runLog := func() string { b, _ := os.ReadFile(d.logFile); return string(b) }
	before := strings.Count(runLog(), line)
	if err := d.proc.Signal(syscall.SIGHUP); err != nil {
		d.t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for strings.Count(runLog(), line) == before {
		if time.Now().After(deadline) {
			d.t.Fatalf("no %s line 10s after SIGHUP\n%s", line, d.logs())
		}
		time.Sleep(50 * time.Millisecond)
	}
	want := 0.0
	if ok {
		want = 1
	}
	if v := d.metric("egress_config_last_reload_successful"); v != want {
		d.t.Fatalf("egress_config_last_reload_successful = %v after the reload, want %v", v, want)
	}
}

// report is the report JSON of DESIGN.md (the fields the suite checks).
type report struct {
	Mode  string `json:"mode"`
	Rules []struct {
		Name         string   `json:"name"`
		Flows        uint64   `json:"flows"`
		Queries      uint64   `json:"queries"`
		Requests     uint64   `json:"requests"`
		BytesOut     uint64   `json:"bytes_out"`
		BytesIn      uint64   `json:"bytes_in"`
		Clients      []string `json:"clients"`
		Destinations []string `json:"destinations"`
	} `json:"rules"`
	UnusedRules []string `json:"unused_rules"`
	Dropped     []struct {
		Dest     string   `json:"dest"`
		IP       string   `json:"ip"`
		Port     uint16   `json:"port"`
		Proto    string   `json:"proto"`
		Flows    uint64   `json:"flows"`
		Queries  uint64   `json:"queries"`
		Requests uint64   `json:"requests"`
		Clients  []string `json:"clients"`
		Enforced bool     `json:"enforced"`
		Reason   string   `json:"reason"`
	} `json:"dropped"`
	ShedEvents      uint64 `json:"shed_events"`
	UnwrittenEvents uint64 `json:"unwritten_events"`
}

// report runs `egressd report --json` in the gateway, against the running
// daemon's admin address.
func (d *daemon) report() *report {
	d.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ip", "netns", "exec", d.tp.gw.Name, egressdBin, "report", "--json", "--admin", d.adminAddr())
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		d.t.Fatalf("egressd report --json: %v\n%s", err, stderr.String())
	}
	var r report
	if err := json.Unmarshal(out, &r); err != nil {
		d.t.Fatalf("egressd report --json: %v\n%s", err, out)
	}
	return &r
}

// reportState runs `egressd report --state-dir` with args over the
// stopped daemon's state directory and returns its output.
func (d *daemon) reportState(args ...string) []byte {
	d.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, egressdBin, append([]string{"report", "--state-dir", d.stateDir}, args...)...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		d.t.Fatalf("egressd report %v: %v\n%s%s", args, err, out, stderr.String())
	}
	return out
}

// reportStateJSON runs `egressd report --json` over the stopped daemon's
// state directory and returns the report and its text.
func (d *daemon) reportStateJSON() (*report, []byte) {
	d.t.Helper()
	out := d.reportState("--json")
	var r report
	if err := json.Unmarshal(out, &r); err != nil {
		d.t.Fatalf("report --json: %v\n%s", err, out)
	}
	return &r, out
}

// nftTable returns whether egressd's nftables table exists in the gateway.
func (tp *topo) nftTable() bool {
	_, err := tp.gw.Run("nft", "list", "table", "inet", "egressd")
	return err == nil
}

// dialOK reports whether a TCP connection from the LAN to addr completes.
func (tp *topo) dialOK(addr string) bool {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	c, err := tp.lan.DialContext(ctx, "tcp", addr)
	if err != nil {
		return false
	}
	c.Close()
	return true
}
