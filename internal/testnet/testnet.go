// Package testnet builds test topologies out of network namespaces and veth
// pairs for egressd's tests: a client, a gateway and an "internet", each its
// own namespace, joined by veth links that carry only addresses the tests
// assign (198.18.0.0/15 and the TEST-NET ranges). Everything it creates is
// removed by t.Cleanup, processes by PID.
//
// Code in the test process can create sockets inside a namespace with Do,
// Listen and Dial: a socket belongs to the namespace of the thread that
// created it, for its whole life.
package testnet

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"egressd/internal/netns"
)

// RequireRoot skips the test when not root, unless CI is set: in CI the
// namespace tests must run, so there it fails instead.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() == 0 {
		if _, err := exec.LookPath("ip"); err != nil {
			t.Fatalf("testnet: ip (iproute2) is not installed: %v", err)
		}
		return
	}
	if os.Getenv("CI") != "" {
		t.Fatal("testnet: this test needs root (network namespaces); CI must run it as root")
	}
	t.Skip("testnet: needs root for network namespaces")
}

var seq atomic.Uint64

// NS is a network namespace made by a test.
type NS struct {
	Name string
	t    testing.TB
}

// New makes a namespace with loopback up. The name gets a unique suffix so
// parallel tests and packages do not collide.
func New(t testing.TB, prefix string) *NS {
	t.Helper()
	RequireRoot(t)
	sweepOnce.Do(func() { sweepStale(namespaceDir, true) })
	// TESTNET_TAG, when set, begins every name: whose namespaces these
	// are, where several runs share the machine.
	name := fmt.Sprintf("%s%s-%d-%d", os.Getenv("TESTNET_TAG"), prefix, os.Getpid()%pidModulus, seq.Add(1))
	if len(name) > 30 {
		name = name[:30]
	}
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("testnet: ip netns add %s: %v: %s", name, err, out)
	}
	ns := &NS{Name: name, t: t}
	t.Cleanup(func() { ns.destroy() })
	ns.MustRun("ip", "link", "set", "lo", "up")
	return ns
}

// pidModulus keeps the PID part of a namespace name short.
const pidModulus = 100000

// namespaceDir is where ip netns keeps its named namespaces.
const namespaceDir = "/var/run/netns"

var sweepOnce sync.Once

// sweepStale removes namespaces that New made in test processes that are
// gone: a test binary killed before its cleanups ran (a timeout, kill -9)
// leaves its namespaces behind. A name New made ends in -PID-SEQ; it is
// removed only when no live process has a PID that gives that part and no
// process runs inside it. Names of any other shape are never touched.
// fresh says this process has made no namespace yet: then a name with its
// own PID part is a gone process's whose PID it got again (New would
// otherwise fail on it, File exists), unless another live process has
// that part too.
func sweepStale(dir string, fresh bool) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	var live map[int]bool
	for _, e := range entries {
		pidPart, ok := newNamePID(e.Name())
		if !ok {
			continue
		}
		if live == nil {
			live = livePIDParts(fresh)
		}
		if live[pidPart] {
			continue
		}
		if out, err := exec.Command("ip", "netns", "pids", e.Name()).Output(); err != nil || len(bytes.TrimSpace(out)) > 0 {
			continue
		}
		exec.Command("ip", "netns", "del", e.Name()).Run()
	}
}

// newNamePID returns the PID part of a name of New's shape: a prefix of
// lower-case letters and digits, then -PID-SEQ.
func newNamePID(name string) (int, bool) {
	parts := strings.Split(name, "-")
	if len(parts) != 3 || parts[0] == "" {
		return 0, false
	}
	for _, r := range parts[0] {
		if (r < 'a' || r > 'z') && (r < '0' || r > '9') {
			return 0, false
		}
	}
	pid, err := strconv.Atoi(parts[1])
	if err != nil || pid <= 0 || strconv.Itoa(pid) != parts[1] {
		return 0, false
	}
	if seq, err := strconv.Atoi(parts[2]); err != nil || seq <= 0 || strconv.Itoa(seq) != parts[2] {
		return 0, false
	}
	return pid, true
}

// livePIDParts returns the PID parts (PID modulo pidModulus) of every live
// process, this one's left out when notSelf is set.
func livePIDParts(notSelf bool) map[int]bool {
	live := map[int]bool{}
	self := os.Getpid()
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		if pid, err := strconv.Atoi(e.Name()); err == nil && !(notSelf && pid == self) {
			live[pid%pidModulus] = true
		}
	}
	return live
}

func (ns *NS) destroy() {
	// Kill what still lives in the namespace, by PID.
	out, _ := exec.Command("ip", "netns", "pids", ns.Name).Output()
	for _, f := range strings.Fields(string(out)) {
		var pid int
		if _, err := fmt.Sscan(f, &pid); err == nil && pid > 1 && pid != os.Getpid() {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	exec.Command("ip", "netns", "del", ns.Name).Run()
}

// Run runs a command in the namespace and returns its combined output.
func (ns *NS) Run(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", ns.Name}, args...)...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// MustRun is Run that fails the test on error.
func (ns *NS) MustRun(args ...string) string {
	ns.t.Helper()
	out, err := ns.Run(args...)
	if err != nil {
		ns.t.Fatalf("testnet: %s: %s: %v: %s", ns.Name, strings.Join(args, " "), err, out)
	}
	return out
}

// Proc is a process started in a namespace.
type Proc struct {
	Cmd    *exec.Cmd
	Stdout *bytes.Buffer // safe to read after Wait or Stop
	Stderr *bytes.Buffer
	out    *lockedWriter
	done   chan struct{}
	err    error
}

// StdoutSoFar returns what the process has written to its standard output
// so far; safe to call while it runs.
func (p *Proc) StdoutSoFar() string {
	for !p.out.mu.CompareAndSwap(false, true) {
		runtime.Gosched()
	}
	defer p.out.mu.Store(false)
	return p.out.b.String()
}

// Start starts a command in the namespace. It is killed (by PID) at cleanup
// if it is still running.
func (ns *NS) Start(args ...string) *Proc {
	ns.t.Helper()
	cmd := exec.Command("ip", append([]string{"netns", "exec", ns.Name}, args...)...)
	p := &Proc{Cmd: cmd, Stdout: &bytes.Buffer{}, Stderr: &bytes.Buffer{}, done: make(chan struct{})}
	p.out = &lockedWriter{b: p.Stdout}
	cmd.Stdout, cmd.Stderr = p.out, &lockedWriter{b: p.Stderr}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		ns.t.Fatalf("testnet: start %s: %v", strings.Join(args, " "), err)
	}
	go func() { p.err = cmd.Wait(); close(p.done) }()
	ns.t.Cleanup(func() { p.Stop() })
	return p
}

// Stop kills the process group by PID and waits for it.
func (p *Proc) Stop() error {
	select {
	case <-p.done:
		return p.err
	default:
	}
	syscall.Kill(-p.Cmd.Process.Pid, syscall.SIGKILL)
	<-p.done
	return p.err
}

// Signal sends sig to the process (the ip netns exec wrapper execs the
// command, so the PID is the command's).
func (p *Proc) Signal(sig syscall.Signal) error { return syscall.Kill(p.Cmd.Process.Pid, sig) }

// Done is closed when the process has exited.
func (p *Proc) Done() <-chan struct{} { return p.done }

type lockedWriter struct {
	mu atomic.Bool
	b  *bytes.Buffer
}

func (w *lockedWriter) Write(p []byte) (int, error) {
	for !w.mu.CompareAndSwap(false, true) {
		runtime.Gosched()
	}
	defer w.mu.Store(false)
	return w.b.Write(p)
}

// tempIfName names a veth end for the moment it exists in the test's own
// namespace, before Link moves it. go test runs packages as parallel
// processes, each with its own seq, so the name carries the process ID as
// the namespaces' names do: without it two packages both made "tn3" and
// one failed with "File exists". At most 15 bytes (IFNAMSIZ - 1).
func tempIfName() string {
	return fmt.Sprintf("tn%d-%d", os.Getpid()%100000, seq.Add(1)%10000000)
}

// Link joins two namespaces with a veth pair: ifA in a with addrsA, ifB in b
// with addrsB (CIDR notation, IPv4 or IPv6). IPv6 duplicate address
// detection is turned off, and Link returns once every address is usable
// (WaitAddr): an IPv6 address is tentative, without its local route,
// until both ends are up and addrconf's work has run.
func Link(t testing.TB, a *NS, ifA string, addrsA []string, b *NS, ifB string, addrsB []string) {
	t.Helper()
	tmpA, tmpB := tempIfName(), tempIfName()
	if out, err := exec.Command("ip", "link", "add", tmpA, "type", "veth", "peer", "name", tmpB).CombinedOutput(); err != nil {
		t.Fatalf("testnet: veth: %v: %s", err, out)
	}
	for _, x := range []struct {
		ns        *NS
		tmp, name string
		addrs     []string
	}{{a, tmpA, ifA, addrsA}, {b, tmpB, ifB, addrsB}} {
		if out, err := exec.Command("ip", "link", "set", x.tmp, "netns", x.ns.Name).CombinedOutput(); err != nil {
			t.Fatalf("testnet: move veth: %v: %s", err, out)
		}
		x.ns.MustRun("ip", "link", "set", x.tmp, "name", x.name)
		x.ns.MustRun("sysctl", "-qw", "net.ipv6.conf."+x.name+".accept_dad=0")
		for _, ad := range x.addrs {
			if strings.Contains(ad, ":") {
				x.ns.MustRun("ip", "-6", "addr", "add", ad, "dev", x.name, "nodad")
			} else {
				x.ns.MustRun("ip", "addr", "add", ad, "dev", x.name)
			}
		}
		x.ns.MustRun("ip", "link", "set", x.name, "up")
	}
	a.WaitAddr(t, addrsA...)
	b.WaitAddr(t, addrsB...)
}

// Do runs fn on a thread switched into the namespace (a goroutine of its
// own: internal/netns), and waits for it. Sockets fn creates stay in the
// namespace.
func (ns *NS) Do(fn func() error) error {
	return netns.Do("/var/run/netns/"+ns.Name, fn)
}

// IfIndex is the index of the interface dev in the namespace, as a zone
// ("3"), read with Go on a thread in it: not from ip's output, which under
// load may begin with an error about a veth peer in another namespace
// ("Error: ..."), nor through the net package's cache of interface names,
// which is the process's and may have been filled in another namespace.
// It fails t (the test asking: a subtest may not fail its parent) when
// dev is not there.
func (ns *NS) IfIndex(t testing.TB, dev string) string {
	t.Helper()
	var idx int
	if err := ns.Do(func() error {
		ifi, err := net.InterfaceByName(dev)
		if err == nil {
			idx = ifi.Index
		}
		return err
	}); err != nil {
		t.Fatalf("testnet: %s: interface %s: %v", ns.Name, dev, err)
	}
	return strconv.Itoa(idx)
}

// Listen listens inside the namespace.
func (ns *NS) Listen(network, addr string) (net.Listener, error) {
	var ln net.Listener
	err := ns.Do(func() (err error) { ln, err = net.Listen(network, addr); return })
	return ln, err
}

// ListenPacket listens for packets inside the namespace.
func (ns *NS) ListenPacket(network, addr string) (net.PacketConn, error) {
	var pc net.PacketConn
	err := ns.Do(func() (err error) { pc, err = net.ListenPacket(network, addr); return })
	return pc, err
}

// DialContext dials from inside the namespace. Its signature fits
// net.Dialer-style hooks.
func (ns *NS) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	var c net.Conn
	err := ns.Do(func() (err error) {
		var d net.Dialer
		c, err = d.DialContext(ctx, network, addr)
		return
	})
	return c, err
}

// WaitTCP waits until addr accepts TCP connections from inside ns, or the
// timeout passes.
func (ns *NS) WaitTCP(addr string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
		c, err := ns.DialContext(ctx, "tcp", addr)
		cancel()
		if err == nil {
			c.Close()
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("testnet: %s not accepting in %s: %w", addr, ns.Name, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// WithoutNetAdmin runs fn on a thread without CAP_NET_ADMIN in its
// effective set, then restores it: the kernel checks the sender's
// capabilities as a netlink message is processed, so nftables refuses a
// transaction sent from fn (a real refusal, for tests of what follows).
func WithoutNetAdmin(t testing.TB, fn func()) {
	t.Helper()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var caps [2]unix.CapUserData
	if err := unix.Capget(&hdr, &caps[0]); err != nil {
		t.Fatal(err)
	}
	saved := caps
	caps[0].Effective &^= 1 << unix.CAP_NET_ADMIN
	if err := unix.Capset(&hdr, &caps[0]); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := unix.Capset(&hdr, &saved[0]); err != nil {
			panic(err) // the thread is locked: it dies with the test
		}
	}()
	fn()
}

// UDPEcho answers each datagram pc reads with reply(payload, sender), or
// with the payload itself when reply is nil, until the test ends (it then
// closes pc).
func UDPEcho(t testing.TB, pc net.PacketConn, reply func(p []byte, from net.Addr) []byte) {
	t.Cleanup(func() { pc.Close() })
	go func() {
		buf := make([]byte, 1500)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			out := buf[:n]
			if reply != nil {
				out = reply(out, from)
			}
			pc.WriteTo(out, from)
		}
	}()
}
