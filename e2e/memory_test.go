package e2e

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// memoryMax is the cgroup limit of TestMemoryMaxUnderFlood: small enough
// that the SYN flood's tables (capture's flow table at its 65,536 flows,
// the ledger's recent flows) with the garbage the collector leaves by
// default pass it, large enough for them with a collector that works
// harder near it.
const memoryMax = 128 << 20

// TestMemoryMaxUnderFlood: egressd run in a cgroup with a memory limit
// (systemd's MemoryMax=; here a group the test makes, cgroup v2 where the
// memory controller is there, else v1's memory.limit_in_bytes) reads the
// limit at start, gives the Go runtime a soft limit below it and sizes
// capture's ring to it, and survives rounds of the SYN flood that makes it
// largest, serving a legitimate client after each. First, to show the
// test's load is enough, the same run with the soft limit turned off
// (GOMEMLIMIT=off) must be killed by the OOM killer within the rounds:
// without the soft limit the collector lets the heap grow to twice what
// is live, and that passes the limit.
func TestMemoryMaxUnderFlood(t *testing.T) {
	tp := newTopo(t)
	tp.inet.MustRun("ip", "addr", "add", floodIP+"/32", "dev", "eth0")
	const rounds = 4

	// run starts egressd in a fresh group under memoryMax with env (sh
	// export lines) and floods it up to rounds times; it returns how many
	// rounds it survived and the daemon.
	run := func(t *testing.T, env string) (int, *daemon, *memoryGroup) {
		cg := newMemoryGroup(t, memoryMax)
		d := newDaemon(t, tp, "enforce")
		d.wrap = []string{"sh", "-c", cg.join + " && " + env + " && exec \"$@\"", "sh"}
		d.start()
		t.Cleanup(func() {
			if d.alive() {
				d.stop()
			}
		})
		if rcode, addrs := tp.dig(t, dockerName, "A"); rcode != "NOERROR" || len(addrs) == 0 {
			t.Fatalf("dig %s: %s %v", dockerName, rcode, addrs)
		}
		rss0, _, _ := d.rss()
		t.Logf("at rest: RSS %d KiB, the cgroup's usage %d KiB", rss0, cg.usage()>>10)
		for r := range rounds {
			sent, took, err := tp.synFlood(floodSources, netip.MustParseAddr(floodIP), floodPort, envInt("E2E_SYN_FLOOD", 200000), 10*time.Second)
			if err != nil {
				t.Fatalf("flood: %v", err)
			}
			// Until capture has read the flood (or the process died).
			for deadline := time.Now().Add(5 * time.Second); d.alive() && time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
				if v, ok := metricIfUp(d, "egress_capture_active_flows"); ok && v >= captureMaxFlows {
					break
				}
			}
			time.Sleep(time.Second)
			if !d.alive() {
				st := d.proc.Cmd.ProcessState
				t.Logf("round %d: %d SYNs in %v; egressd died: %v (the cgroup's peak %d KiB)", r+1, sent, took.Round(time.Millisecond), st, cg.peak()>>10)
				if ws, ok := st.Sys().(syscall.WaitStatus); !ok || ws.Signal() != syscall.SIGKILL {
					t.Errorf("egressd ended with %v, not killed (by the OOM killer)\n%s", st, d.logs())
				}
				return r, d, cg
			}
			rss, hwm, _ := d.rss()
			t.Logf("round %d: %d SYNs in %v; RSS %d KiB (peak %d), the cgroup's usage %d KiB (peak %d); capture's flow table %v, kernel drops %v",
				r+1, sent, took.Round(time.Millisecond), rss, hwm, cg.usage()>>10, cg.peak()>>10, d.metric("egress_capture_active_flows"), d.metric("egress_capture_kernel_drops_total"))
			if err := tp.legitGet(); err != nil {
				t.Errorf("round %d: legitimate client after the flood: %v", r+1, err)
			}
		}
		return rounds, d, cg
	}

	t.Run("without-soft-limit", func(t *testing.T) {
		survived, d, _ := run(t, "export GOMEMLIMIT=off")
		if !strings.Contains(d.logs(), "go: no memory limit (GOMEMLIMIT)") {
			t.Errorf("start-up lines lack the memory line\n%s", d.logs())
		}
		// The control: on this 2-core box it died in round 2 or 3 every
		// time. A machine where it survives shows less by the subtest
		// below, but is no failure of egressd's: said, not failed.
		if survived == rounds {
			t.Logf("control: egressd without a soft memory limit survived all %d rounds of the flood under a %d MiB limit here, so the soft-limit run below shows less than it does where the control dies", rounds, memoryMax>>20)
		}
	})
	t.Run("soft-limit", func(t *testing.T) {
		survived, d, cg := run(t, "true")
		for _, want := range []string{
			fmt.Sprintf("go: memory limit %d MiB, under the cgroup's %d MiB", (memoryMax-16<<20)>>20, memoryMax>>20),
			"proxy: at most 1024 connections, 102 per client (memory)",
		} {
			if !strings.Contains(d.logs(), want) {
				t.Errorf("start-up lines lack %q\n%s", want, d.logs())
			}
		}
		if survived != rounds {
			t.Fatalf("egressd under a %d MiB limit died in round %d of %d, with its soft memory limit", memoryMax>>20, survived+1, rounds)
		}
		// The ring is a 32nd of the memory, 8 MiB at least: egressd's
		// own mapping of it says what the kernel gave.
		if ring := packetRingBytes(t, d.proc.Cmd.Process.Pid); ring != 8<<20 {
			t.Errorf("capture's ring is %d KiB under a %d MiB limit, want 8 MiB", ring>>10, memoryMax>>20)
		}
		if code, body, err := d.get("/healthz"); err != nil || code != 200 {
			t.Errorf("/healthz after the floods: %d %q %v", code, body, err)
		}
		// The proxy's limits follow the memory: one client address
		// holds 102 tunnels, not the 5,000 of a larger machine.
		var held []net.Conn
		refused := 0
		for range 110 {
			if c, err := helloTunnel(tp, dockerIP4+":443", dockerName); err == nil {
				held = append(held, c)
			} else {
				refused++
			}
		}
		for _, c := range held {
			c.Close()
		}
		if len(held) != 102 {
			t.Errorf("%d of 110 tunnels from one client opened (%d refused), want the 102 its memory allows", len(held), refused)
		}
		// The stop ends capture's 65,536 flows, each an event for the
		// log: the peak after it says what the stop added. What stays
		// charged once egressd is gone is page cache (the event log's).
		before := cg.peak()
		d.stop()
		t.Logf("after the stop: the cgroup's peak %d KiB (%d KiB before it); %d KiB of page cache still charged", cg.peak()>>10, before>>10, cg.stat("cache", "file")>>10)
	})
}

// memoryGroup is a cgroup with a memory limit that the test made.
type memoryGroup struct {
	dir  string // on the host
	v2   bool
	join string // sh commands that put the shell in it from inside `ip netns exec` (which mounts a /sys of its own, without cgroups)
}

// newMemoryGroup makes a group limited to max bytes (removed when the
// test ends); without a writable memory controller the test fails in CI
// (CI=true: there it must run) and skips elsewhere.
func newMemoryGroup(t *testing.T, max int64) *memoryGroup {
	t.Helper()
	name := fmt.Sprintf("egressd-e2e-%d-%d", os.Getpid(), time.Now().UnixNano())
	var g memoryGroup
	if b, err := os.ReadFile("/sys/fs/cgroup/cgroup.subtree_control"); err == nil && hasField(string(b), "memory") {
		g = memoryGroup{dir: filepath.Join("/sys/fs/cgroup", name), v2: true,
			join: "mount -t cgroup2 cgroup2 /sys/fs/cgroup && echo $$ > /sys/fs/cgroup/" + name + "/cgroup.procs"}
	} else if _, err := os.Stat("/sys/fs/cgroup/memory/memory.limit_in_bytes"); err == nil {
		g = memoryGroup{dir: filepath.Join("/sys/fs/cgroup/memory", name),
			join: "mount -t tmpfs cgroup /sys/fs/cgroup && mkdir /sys/fs/cgroup/memory && mount -t cgroup -o memory cgroup /sys/fs/cgroup/memory && echo $$ > /sys/fs/cgroup/memory/" + name + "/cgroup.procs"}
	} else {
		noGroup(t, "no cgroup memory controller here (v2 with memory in the root's subtree_control, or v1's memory hierarchy)")
	}
	if err := os.Mkdir(g.dir, 0o755); err != nil {
		noGroup(t, fmt.Sprintf("cannot make a cgroup: %v", err))
	}
	t.Cleanup(func() {
		// The group can go once its processes have: egressd's cleanup
		// runs before this one (registered later).
		for i := 0; i < 50 && os.Remove(g.dir) != nil; i++ {
			time.Sleep(100 * time.Millisecond)
		}
	})
	file := "memory.limit_in_bytes"
	if g.v2 {
		file = "memory.max"
		os.WriteFile(filepath.Join(g.dir, "memory.swap.max"), []byte("0"), 0o644) // as without swap
	}
	if err := os.WriteFile(filepath.Join(g.dir, file), []byte(strconv.FormatInt(max, 10)), 0o644); err != nil {
		t.Fatalf("cgroup limit: %v", err)
	}
	return &g
}

func (g *memoryGroup) read(v1, v2 string) int64 {
	f := v1
	if g.v2 {
		f = v2
	}
	b, _ := os.ReadFile(filepath.Join(g.dir, f))
	v, _ := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	return v
}

// usage is the memory the group's processes are charged for now; peak the
// most (0 where the kernel keeps no peak).
func (g *memoryGroup) usage() int64 { return g.read("memory.usage_in_bytes", "memory.current") }
func (g *memoryGroup) peak() int64  { return g.read("memory.max_usage_in_bytes", "memory.peak") }

// stat is one field of the group's memory.stat (v1's name, or v2's), in
// bytes.
func (g *memoryGroup) stat(v1, v2 string) int64 {
	f := v1
	if g.v2 {
		f = v2
	}
	b, _ := os.ReadFile(filepath.Join(g.dir, "memory.stat"))
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, f+" "); ok {
			n, _ := strconv.ParseInt(v, 10, 64)
			return n
		}
	}
	return 0
}

func hasField(s, w string) bool {
	for _, f := range strings.Fields(s) {
		if f == w {
			return true
		}
	}
	return false
}

// packetRingBytes is the size of pid's shared mapping of a socket: the
// AF_PACKET ring (egressd maps no other socket).
func packetRingBytes(t *testing.T, pid int) int64 {
	t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/maps", pid))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var total int64
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) < 6 || !strings.HasPrefix(fs[5], "socket:") {
			continue
		}
		lo, hi, _ := strings.Cut(fs[0], "-")
		a, _ := strconv.ParseUint(lo, 16, 64)
		b, _ := strconv.ParseUint(hi, 16, 64)
		total += int64(b - a)
	}
	return total
}

// metricIfUp is d.metric for a daemon that may have died: false when
// /metrics does not answer.
func metricIfUp(d *daemon, series string) (float64, bool) {
	_, body, err := d.get("/metrics")
	if err != nil {
		return 0, false
	}
	for _, l := range strings.Split(body, "\n") {
		if v, ok := strings.CutPrefix(l, series+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			return f, err == nil
		}
	}
	return 0, false
}

// helloTunnel opens a connection from the LAN client to addr through the
// proxy: a ClientHello naming sni, and the origin's first answer bytes.
func helloTunnel(tp *topo, addr, sni string) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := tp.lan.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write(buildHello(helloSpec{sni: [][]string{{sni}}})); err != nil {
		c.Close()
		return nil, err
	}
	if _, err := c.Read(make([]byte, 1)); err != nil {
		c.Close()
		return nil, err
	}
	c.SetDeadline(time.Time{})
	return c, nil
}

// TestMemoryAtRest: `egressd run` with the seed profile, audit and
// enforce, at rest after one lookup. Its resident memory is capture's
// ring (a 32nd of the machine's memory, 8 to 64 MiB), the binary's pages
// and a few MiB of Go heap; the figures are logged (README, "Memory").
// The heap held 6.9 MiB at rest, 4 MiB of it the DNS forwarder's UDP
// read buffers (64 KiB a datagram); the bound below fails if such a
// buffer comes back.
func TestMemoryAtRest(t *testing.T) {
	tp := newTopo(t)
	for _, mode := range []string{"audit", "enforce"} {
		t.Run(mode, func(t *testing.T) {
			d := newDaemon(t, tp, mode)
			d.start()
			defer d.stop()
			if rcode, _ := tp.dig(t, dockerName, "A"); rcode != "NOERROR" {
				t.Fatalf("dig: %s", rcode)
			}
			time.Sleep(2 * time.Second)
			pid := d.proc.Cmd.Process.Pid
			rollup := smapsRollup(t, pid)
			ring := packetRingBytes(t, pid)
			heap, sys := d.metric("go_memstats_heap_inuse_bytes"), d.metric("go_memstats_sys_bytes")
			t.Logf("%s at rest: RSS %d KiB (anonymous %d KiB, file and shared %d KiB), capture's ring %d KiB; Go heap in use %.0f KiB, from the OS %.0f KiB",
				mode, rollup["Rss"], rollup["Anonymous"], rollup["Rss"]-rollup["Anonymous"], ring>>10, heap/1024, sys/1024)
			if want := int64(min(max(memTotal(t)>>20/32, 8), 64)) << 20; ring != want {
				t.Errorf("capture's ring is %d KiB, want %d KiB (a 32nd of the machine's memory, 8 to 64 MiB)", ring>>10, want>>10)
			}
			if heap > 6<<20 {
				t.Errorf("Go heap in use at rest %.0f KiB, over 6 MiB", heap/1024)
			}
			if rollup["Anonymous"] > 8<<10 {
				t.Errorf("anonymous memory at rest %d KiB, over 8 MiB", rollup["Anonymous"])
			}
		})
	}
}

// smapsRollup reads /proc/PID/smaps_rollup: its fields in KiB.
func smapsRollup(t *testing.T, pid int) map[string]int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]int64{}
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) == 3 && f[2] == "kB" {
			v, _ := strconv.ParseInt(f[1], 10, 64)
			out[strings.TrimSuffix(f[0], ":")] = v
		}
	}
	return out
}

// memTotal is the machine's memory in bytes (/proc/meminfo).
func memTotal(t *testing.T) int64 {
	t.Helper()
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) == 3 && f[0] == "MemTotal:" {
			v, _ := strconv.ParseInt(f[1], 10, 64)
			return v << 10
		}
	}
	t.Fatal("no MemTotal in /proc/meminfo")
	return 0
}

// noGroup ends a test that needs a memory cgroup the machine does not
// give: a failure in CI, where every test must run, a skip elsewhere.
func noGroup(t *testing.T, why string) {
	t.Helper()
	if os.Getenv("CI") != "" {
		t.Fatal(why)
	}
	t.Skip(why)
}
