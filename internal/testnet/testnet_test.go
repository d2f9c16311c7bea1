package testnet

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

func TestLinkAndSockets(t *testing.T) {
	a := New(t, "tna")
	b := New(t, "tnb")
	Link(t, a, "eth0", []string{"198.18.100.1/24", "2001:db8:100::1/64"}, b, "eth0", []string{"198.18.100.2/24", "2001:db8:100::2/64"})
	if out := a.MustRun("ip", "-br", "addr", "show", "eth0"); !strings.Contains(out, "198.18.100.1/24") {
		t.Fatalf("address not assigned: %s", out)
	}
	// The index of the namespace's eth0, not the host's.
	if got, want := a.IfIndex(t, "eth0"), strings.TrimSpace(a.MustRun("cat", "/sys/class/net/eth0/ifindex")); got != want {
		t.Fatalf("IfIndex(eth0) = %s, want %s", got, want)
	}
	for _, addr := range []string{"198.18.100.2:7000", "[2001:db8:100::2]:7000"} {
		ln, err := b.Listen("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		go func() {
			c, err := ln.Accept()
			if err == nil {
				c.Write([]byte("hello"))
				c.Close()
			}
		}()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		c, err := a.DialContext(ctx, "tcp", addr)
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		got, _ := io.ReadAll(c)
		c.Close()
		ln.Close()
		if string(got) != "hello" {
			t.Fatalf("got %q", got)
		}
	}
	// The test process itself is not in either namespace.
	if _, err := (&NS{Name: "x"}).Run("true"); err == nil {
		t.Fatal("ip netns exec in a missing namespace succeeded")
	}
}

// TestTempIfName: the temporary veth names carry this process's ID (go test
// runs packages as parallel processes, each counting from zero), differ
// from one call to the next, and fit a Linux interface name.
func TestTempIfName(t *testing.T) {
	pid := fmt.Sprintf("tn%d-", os.Getpid()%100000)
	seen := map[string]bool{}
	for i := 0; i < 1000; i++ {
		n := tempIfName()
		if !strings.HasPrefix(n, pid) || len(n) > 15 || seen[n] {
			t.Fatalf("temporary name %q (prefix %q, seen before %v)", n, pid, seen[n])
		}
		seen[n] = true
	}
}

func TestSweepStale(t *testing.T) {
	RequireRoot(t)
	live := livePIDParts(false)
	dead := 0
	for p := pidModulus - 1; p > 0; p-- {
		if !live[p] {
			dead = p
			break
		}
	}
	own := os.Getpid() % pidModulus
	names := map[string]bool{ // name: should survive the sweep
		fmt.Sprintf("tnstale-%d-1", dead): false,
		fmt.Sprintf("tnlive-%d-77", own):  true,
		fmt.Sprintf("tn-odd-%d-1", dead):  true, // not New's shape
		fmt.Sprintf("tnseq-%d-x", dead):   true,
		fmt.Sprintf("TNUP-%d-1", dead):    true,
		fmt.Sprintf("tnpad-0%d-1", dead):  true,
		fmt.Sprintf("tnbusy-%d-2", dead):  true, // a process runs inside
	}
	for name := range names {
		if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
			t.Fatalf("ip netns add %s: %v: %s", name, err, out)
		}
		t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	}
	busy := exec.Command("ip", "netns", "exec", fmt.Sprintf("tnbusy-%d-2", dead), "sleep", "30")
	if err := busy.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { busy.Process.Kill(); busy.Wait() })
	for i := 0; i < 50; i++ { // wait until sleep runs inside (ip netns exec has exec'd)
		if out, _ := exec.Command("ip", "netns", "pids", fmt.Sprintf("tnbusy-%d-2", dead)).Output(); len(strings.TrimSpace(string(out))) > 0 {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}

	sweepStale(namespaceDir, false) // this process has made namespaces

	for name, survive := range names {
		_, err := os.Stat(namespaceDir + "/" + name)
		if got := err == nil; got != survive {
			t.Errorf("%s: exists after the sweep = %v, want %v", name, got, survive)
		}
	}
}

// TestSweepStaleOwnPID: a namespace left by a gone test process whose PID
// this process got again (PIDs wrap, at 32768 by default) has this
// process's PID part. The sweep at the first New kept it as "live", and
// New then failed on it (ip netns add: File exists) once the sequence
// reached its number. Before its first namespace, no name with this
// process's PID part is its own.
func TestSweepStaleOwnPID(t *testing.T) {
	RequireRoot(t)
	name := fmt.Sprintf("tnown-%d-1", os.Getpid()%pidModulus)
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v: %s", name, err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })

	sweepStale(namespaceDir, false) // namespaces made: it may be one of them
	if _, err := os.Stat(namespaceDir + "/" + name); err != nil {
		t.Fatalf("%s removed while this process has namespaces: %v", name, err)
	}
	sweepStale(namespaceDir, true) // none made yet: a gone process's
	if _, err := os.Stat(namespaceDir + "/" + name); err == nil {
		t.Errorf("%s, with this process's PID part, left by the first sweep", name)
	}
}
