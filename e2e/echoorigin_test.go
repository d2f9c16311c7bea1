package e2e

import (
	"fmt"
	"net"
	"os"
	"strings"
	"testing"
	"time"

	"egressd/internal/testnet"
)

// echoOriginEnv names the address the test binary serves as an echo origin
// when it is set (TestMain): the load test's origin runs in a process of
// its own, so that its descriptors (one per tunnel) are not the test's.
const echoOriginEnv = "E2E_ECHO_ORIGIN"

// echoOriginLife bounds the child's life should its parent never kill it.
const echoOriginLife = 10 * time.Minute

// echoOriginMain serves addr as the witness does (TCP: "hit\n", then an
// echo of what the peer sends) until it is killed or echoOriginLife ends.
// It says "ready" on its standard output once it listens.
func echoOriginMain(addr string) int {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e: echo origin:", err)
		return 1
	}
	fmt.Println("ready")
	time.AfterFunc(echoOriginLife, func() {
		fmt.Fprintln(os.Stderr, "e2e: echo origin: its life ended")
		os.Exit(2)
	})
	for {
		c, err := ln.Accept()
		if err != nil {
			if ne, ok := err.(net.Error); ok && ne.Timeout() {
				continue
			}
			fmt.Fprintln(os.Stderr, "e2e: echo origin: accept:", err)
			time.Sleep(10 * time.Millisecond) // EMFILE: the accept loop must not spin
			continue
		}
		go func() {
			defer c.Close()
			c.Write([]byte("hit\n"))
			// A read/write loop, not io.Copy (a splice holds a pipe's two
			// descriptors while blocked).
			buf := make([]byte, 2048)
			for {
				n, err := c.Read(buf)
				if n > 0 {
					if _, werr := c.Write(buf[:n]); werr != nil {
						return
					}
				}
				if err != nil {
					return
				}
			}
		}()
	}
}

// echoOrigin is the test binary serving as an echo origin in a namespace
// (echoOriginMain), killed by PID at the test's end.
type echoOrigin struct {
	proc *testnet.Proc
	addr string
}

// startEchoOrigin adds addr's host to the internet namespace and starts the
// echo origin there, waiting until it listens.
func (tp *topo) startEchoOrigin(t *testing.T, addr string) *echoOrigin {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatalf("echo origin: %v", err)
	}
	h, _, _ := net.SplitHostPort(addr)
	tp.inet.AddAddr(t, "eth0", h+"/32")
	// env execs the binary: the PID ip netns exec gives is the server's.
	p := tp.inet.Start("env", echoOriginEnv+"="+addr, exe)
	o := &echoOrigin{proc: p, addr: addr} // Start kills it at cleanup
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(p.StdoutSoFar(), "ready") {
		select {
		case <-p.Done():
			t.Fatalf("echo origin exited at start: %v\n%s", p.Cmd.ProcessState, p.Stderr)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("echo origin not listening on %s after 10 s", addr)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return o
}

// pid is the server's process ID.
func (o *echoOrigin) pid() int { return o.proc.Cmd.Process.Pid }

// fds is how many descriptors the server holds (its connections, its
// listener and a few of the runtime's).
func (o *echoOrigin) fds() int {
	ents, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", o.pid()))
	return len(ents)
}

// running fails t if the server has exited.
func (o *echoOrigin) running(t *testing.T) {
	t.Helper()
	select {
	case <-o.proc.Done():
		t.Fatalf("echo origin exited: %v\n%s", o.proc.Cmd.ProcessState, o.proc.Stderr)
	default:
	}
}

// stop kills the server by PID (its process group) and waits for it.
func (o *echoOrigin) stop() { o.proc.Stop() }
