package proxy

import (
	"bufio"
	"io"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	"egressd/audit"
	"egressd/policy"
)

// TestTransparentThisNetwork: a TCP connection from the LAN to 0.0.0.0/8
// past 0.0.0.0 itself (a client's kernel routes 0.0.0.5 to its gateway,
// and, since Linux 5.3, so does the gateway's, like any address), which
// the REDIRECT gives the transparent proxy, is decided as capture and
// audit --replay judge it (policy.Engine.LANRefuses): by the rules and
// the special-range guard, opened by a CIDR rule inside 0.0.0.0/8
// (0.0.0.5/32 here: dialled, the server answers), refused special-range
// under 0.0.0.0/0 only (0.255.255.255: never dialled).
// 0.0.0.0 itself the proxy refuses as loopback (lanLoopback,
// policy.LANThisHost).
//
// Both addresses are the test's own: the server's namespace holds them
// and the gateway's routes them there, so the proxy's dial (and one it
// should not make) reaches the test's server and nothing else.
func TestTransparentThisNetwork(t *testing.T) {
	tp := newTopo(t, topoOpts{})
	for _, a := range []string{"0.0.0.5", "0.255.255.255"} {
		tp.s.MustRun("ip", "addr", "add", a+"/32", "dev", "lo")
		tp.g.MustRun("ip", "route", "add", a+"/32", "via", "198.18.2.2")
	}
	eng, err := policy.Compile("p", []byte("version: 1\nmode: enforce\nrules:\n  - {name: five, to: [\"0.0.0.5/32\"], ports: [80/tcp]}\n  - {name: wide, to: [\"0.0.0.0/0\"], ports: [80/tcp]}\n"))
	if err != nil {
		t.Fatal(err)
	}
	tp.store.Swap(eng)
	for _, c := range []struct {
		dest   string
		allow  bool
		reason string
	}{
		{"0.0.0.5", true, "allowed"},
		{"0.255.255.255", false, ReasonSpecialRange},
	} {
		dest := netip.AddrPortFrom(netip.MustParseAddr(c.dest), 80)
		in := policy.Input{Client: clientV4, Dest: dest.Addr(), Port: 80, Proto: policy.TCP, Now: time.Now()}
		_, refused := eng.LANRefuses(in, nil, nil)
		if lan := eng.Decide(in).Allowed() && !refused; lan != c.allow {
			t.Fatalf("%s: capture's guard allows %v, want %v", dest, lan, c.allow)
		}
		conn := tp.dialFromClient(t, clientV4, dest)
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.WriteString(conn, "GET /thisnet HTTP/1.1\r\nHost: "+c.dest+"\r\n\r\n"); err != nil {
			t.Fatal(err)
		}
		port := addrPortOf(conn.LocalAddr()).Port()
		resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
		body := ""
		if err == nil {
			b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
			resp.Body.Close()
			body = string(b)
		}
		if served := err == nil && resp.StatusCode == http.StatusOK && strings.Contains(body, "path=/thisnet"); served != c.allow {
			t.Errorf("%s: served by the test's server %v (%v %q), want %v", dest, served, err, body, c.allow)
		}
		conn.Close()
		ev := tp.ev.wait(t, "of the connection to "+c.dest, func(ev audit.Event) bool { return ev.ClientPort == port })
		if (ev.Verdict == policy.Allow) != c.allow || ev.Reason != c.reason || ev.Dest != dest.Addr() {
			t.Errorf("%s: event %+v: want allowed %v, reason %s, as capture's guard", dest, ev, c.allow, c.reason)
		}
	}
}
