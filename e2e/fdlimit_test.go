package e2e

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
	"golang.org/x/sys/unix"
)

// TestFDExhaustion: egressd run out of file descriptors (its soft
// RLIMIT_NOFILE lowered to a few dozen above what it holds at rest, as a
// low LimitNOFILE or a leak elsewhere would) while LAN clients open
// connections to the transparent proxy, the explicit proxy and DNS over
// TCP, and a local client to the admin listener. While it is out, no
// accept loop may spin (CPU) or flood the log, and each says so in a
// line of its own; once the clients close, every listener serves again,
// with the limit still low.
func TestFDExhaustion(t *testing.T) {
	tp := newTopo(t)
	d := newDaemon(t, tp, "enforce")
	d.start()
	defer d.stop()
	pid := d.proc.Cmd.Process.Pid

	// serve is what a client gets: every part answers, or the errors.
	serve := func() (errs []error) {
		if rcode, addrs := tp.dig(t, dockerName, "A"); rcode != "NOERROR" || len(addrs) == 0 {
			errs = append(errs, fmt.Errorf("dig %s: %s %v", dockerName, rcode, addrs))
		}
		if err := tp.askTCP(dockerName); err != nil {
			errs = append(errs, fmt.Errorf("DNS over TCP: %w", err))
		}
		if err := tp.legitGet(); err != nil {
			errs = append(errs, fmt.Errorf("transparent proxy: %w", err))
		}
		if status, _, err := connectVia(tp.dialTCP, net.JoinHostPort(gwLAN4, "3128"), dockerName+":443"); err != nil || !strings.Contains(status, " 200") {
			errs = append(errs, fmt.Errorf("explicit proxy CONNECT: %q %v", status, err))
		}
		return errs
	}
	if errs := serve(); errs != nil {
		t.Fatalf("before the limit: %v", errs)
	}

	cpuRest, tRest := procCPU(pid), time.Now()
	time.Sleep(2 * time.Second)
	t.Logf("egressd at rest: CPU %.0f %% of a core", 100*(procCPU(pid)-cpuRest).Seconds()/time.Since(tRest).Seconds())

	var old unix.Rlimit
	if err := unix.Prlimit(pid, unix.RLIMIT_NOFILE, nil, &old); err != nil {
		t.Fatalf("prlimit: %v", err)
	}
	rest := d.fds()
	low := uint64(rest + 40)
	if err := unix.Prlimit(pid, unix.RLIMIT_NOFILE, &unix.Rlimit{Cur: low, Max: old.Max}, nil); err != nil {
		t.Fatalf("prlimit %d: %v", low, err)
	}
	defer unix.Prlimit(pid, unix.RLIMIT_NOFILE, &old, nil)
	t.Logf("egressd holds %d fds at rest; soft RLIMIT_NOFILE %d → %d", rest, old.Cur, low)

	// Hold connections: to the transparent proxy first (each holds a
	// descriptor while its hello is awaited), then, once egressd is out
	// of descriptors, to the explicit proxy and to DNS over TCP: those
	// wait in their listeners' accept queues. 300 at most, 10 s at most.
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	hello := buildHello(helloSpec{sni: [][]string{{dockerName}}})
	targets := []string{dockerIP4 + ":443", net.JoinHostPort(gwLAN4, "3128"), net.JoinHostPort(gwLAN4, "53")}
	deadline := time.Now().Add(10 * time.Second)
	for i := 0; i < 300 && time.Now().Before(deadline); i++ {
		addr := targets[0]
		if i >= 100 {
			addr = targets[1+i%2]
		}
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		c, err := tp.dialTCP(ctx, addr)
		cancel()
		if err != nil {
			t.Logf("dial %s (#%d): %v", addr, i, err)
			continue
		}
		if addr == targets[0] {
			c.Write(hello[:1])
		}
		conns = append(conns, c)
	}
	// And a few to the admin listener, which waits in its queue too.
	for i := 0; i < 3; i++ {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		c, err := d.tp.gw.DialContext(ctx, "tcp", d.adminAddr())
		cancel()
		if err != nil {
			t.Logf("dial the admin listener (#%d): %v", i, err)
			continue
		}
		conns = append(conns, c)
	}
	time.Sleep(500 * time.Millisecond)
	t.Logf("%d connections held; egressd has %d fds (limit %d)", len(conns), d.fds(), low)
	if n := d.fds(); uint64(n) < low-2 {
		t.Fatalf("egressd has %d fds, under its limit %d: the test did not exhaust them", n, low)
	}

	// Out of descriptors for 3 s: egressd's CPU and its log.
	cpu0, lines0, t0 := procCPU(pid), logLines(d.logFile), time.Now()
	time.Sleep(3 * time.Second)
	cpu, lines, took := procCPU(pid)-cpu0, logLines(d.logFile)-lines0, time.Since(t0)
	cpuPct := 100 * cpu.Seconds() / took.Seconds()
	linesPerSec := float64(lines) / took.Seconds()
	t.Logf("out of descriptors for %v: egressd CPU %.0f %% of a core, %d log lines (%.1f/s), %d fds", took.Round(time.Millisecond), cpuPct, lines, linesPerSec, d.fds())
	if !d.alive() {
		t.Fatalf("egressd exited out of descriptors: %v\n%s", d.proc.Cmd.ProcessState, d.logs())
	}
	// Idle connections cost egressd next to no CPU (a few % at most); an
	// accept loop retrying EMFILE at once took 32–42 % of a core on this
	// shared, loaded 2-core box (all it could get).
	if cpuPct > 15 {
		t.Errorf("egressd used %.0f %% of a core while out of descriptors (an accept loop spinning on EMFILE?)", cpuPct)
	}
	if linesPerSec > 20 {
		t.Errorf("egressd logged %.1f lines a second while out of descriptors", linesPerSec)
	}

	// The log says what happens, once per listener kind at least.
	logs := d.logs()
	for _, want := range []string{"dnsfilter: tcp accept failing: retrying", "proxy: accept failing: retrying", "admin: accept failing: retrying"} {
		n := strings.Count(logs, want)
		t.Logf("egressd's log says %q %d times", want, n)
		if n == 0 {
			t.Errorf("egressd's log does not say %q while out of descriptors", want)
		}
	}

	// No http.Server (the explicit proxy's, the admin's) waits the
	// errors out itself, logging each retry ("http: Accept error: ...;
	// retrying in 5ms") and sleeping through shutdown: the listener does
	// (netutil.RetryListener).
	if n := strings.Count(logs, "http: Accept error"); n > 0 {
		t.Errorf("egressd's log has %d lines of an http.Server retrying an accept itself", n)
	}

	// The clients close: every listener serves again, the limit still low.
	for _, c := range conns {
		c.Close()
	}
	conns = nil
	// The connections that waited in the queues are accepted now, dead
	// (their clients gone): the DNS ones take the client's TCP slots
	// (16) for a moment, so a new connection may be refused at first.
	closed := time.Now()
	var errs []error
	for deadline := time.Now().Add(15 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		if errs = serve(); errs == nil || time.Now().After(deadline) {
			break
		}
	}
	t.Logf("every part served again %v after the clients closed (limit still %d); egressd has %d fds", time.Since(closed).Round(time.Millisecond), low, d.fds())
	if errs != nil {
		t.Errorf("15 s after the clients closed, the limit still low: %v", errs)
	}
	if code, body, err := d.get("/readyz"); err != nil || code != 200 {
		t.Errorf("/readyz after recovery: %d %q %v", code, body, err)
	}
	if t.Failed() {
		t.Logf("egressd's log:\n%s", tail(d.logs(), 8000))
	}
}

// askTCP asks the gateway's resolver for name's A over TCP from the LAN.
func (tp *topo) askTCP(name string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	c, err := tp.lan.DialContext(ctx, "tcp", net.JoinHostPort(gwLAN4, "53"))
	if err != nil {
		return err
	}
	defer c.Close()
	m := new(dns.Msg)
	m.SetQuestion(dns.Fqdn(name), dns.TypeA)
	co := &dns.Conn{Conn: c}
	co.SetDeadline(time.Now().Add(3 * time.Second))
	if err := co.WriteMsg(m); err != nil {
		return err
	}
	r, err := co.ReadMsg()
	if err != nil {
		return err
	}
	if r.Rcode != dns.RcodeSuccess || len(r.Answer) == 0 {
		return fmt.Errorf("answer %s with %d records", dns.RcodeToString[r.Rcode], len(r.Answer))
	}
	return nil
}

// procCPU is the CPU time (user and system) process pid has used.
func procCPU(pid int) time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// The fields after the command's ")": state is field 3, utime 14 and
	// stime 15 (clock ticks, 100 a second).
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+1:]))
	if len(f) < 13 {
		return 0
	}
	u, _ := strconv.ParseInt(f[11], 10, 64)
	s, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(u+s) * 10 * time.Millisecond
}

// logLines is the number of lines in file.
func logLines(file string) int {
	b, _ := os.ReadFile(file)
	return bytes.Count(b, []byte("\n"))
}
