package firewall

import (
	"bufio"
	"io"
	"strings"
	"testing"
	"time"
)

// TestDropFastPath: the fast path's queue reader is gone; DropFastPath
// puts the ruleset in again without the fast path (no chain fastpath,
// nothing queued), so a new connection to a fast port is redirected to
// the proxy; the fast-allowed connection open then is cut (its mark is
// no rule's without the fast path, and the port is the proxy's); a
// later Replace renders without it too. A rule's connection open then
// (UDP, rule udp-net) is kept: its mark is read as the fast path's
// ruleset's, and its rule is unchanged without it.
func TestDropFastPath(t *testing.T) {
	const num = 61
	tp, fw, proxied := fastTopo(t, num)
	tp.serverUDP(t, "198.18.2.2:9000")
	u := dialFlow(t, tp, "udp", "198.18.2.2:9000")
	if err := u.ask(3 * time.Second); err != nil {
		t.Fatalf("the rule's UDP flow before DropFastPath: %v", err)
	}
	s := tp.fastServer(t, "198.18.2.2:443")
	q := tp.openTestQueue(t, num)
	m := FastMarks(Config{})
	conn, data := pendingConn(t, tp, q, "198.18.2.2:443")
	q.verdict(t, data.id, nfRepeat, int64(data.mark&^m.Mask|m.Allowed))
	r := bufio.NewReader(conn)
	if line, err := r.ReadString('\n'); line != "hi\n" {
		t.Fatalf("first line %q, %v; want the server's hi", line, err)
	}
	buf := make([]byte, 5)
	if _, err := io.ReadFull(r, buf); err != nil || string(buf) != "hello" {
		t.Fatalf("echo %q, %v", buf, err)
	}
	q.Close()

	eng := compile(t, testPolicy)
	replaced, err := fw.DropFastPath(eng)
	if err != nil || !replaced {
		t.Fatalf("DropFastPath: %v, %v; want the ruleset replaced", replaced, err)
	}
	check := func(when string) {
		t.Helper()
		rs := tp.gw.MustRun("nft", "list", "table", "inet", TableName)
		if strings.Contains(rs, "chain fastpath") || strings.Contains(rs, "queue") {
			t.Errorf("%s: the ruleset has the fast path:\n%s", when, rs)
		}
		if got := fw.Ruleset(); got == nil || got.fast {
			t.Errorf("%s: the installed ruleset is not one without the fast path", when)
		}
	}
	check("after DropFastPath")
	if err := u.ask(3 * time.Second); err != nil {
		t.Errorf("the rule's UDP flow after DropFastPath: %v (cut)", err)
	}

	// A new connection to the fast port: the proxy's.
	before := proxied.Load()
	c := connOf(t, dialAsync(tp, "198.18.2.2:443"))
	if line, err := bufio.NewReader(c).ReadString('\n'); line != "proxy orig=198.18.2.2:443\n" {
		t.Errorf("a new connection after DropFastPath: %q, %v; want the proxy's line", line, err)
	}
	if proxied.Load() != before+1 {
		t.Errorf("the proxy got %d connections, want %d", proxied.Load(), before+1)
	}

	// The fast-allowed connection: cut.
	conn.SetDeadline(time.Now().Add(1500 * time.Millisecond))
	if _, err := conn.Write([]byte("again")); err == nil {
		if _, err := io.ReadFull(r, buf); err == nil {
			t.Errorf("the fast-allowed connection still echoes after DropFastPath: %q", buf)
		}
	}
	if n := s.read.Load(); n != 5 {
		t.Errorf("the server read %d bytes, want the 5 before DropFastPath", n)
	}

	if err := fw.Replace(eng); err != nil {
		t.Fatal(err)
	}
	check("after a Replace")
	if replaced, err := fw.DropFastPath(eng); replaced || err != nil {
		t.Errorf("DropFastPath again: %v, %v; want nothing replaced", replaced, err)
	}
}
