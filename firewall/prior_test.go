package firewall

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"egressd/policy"
)

// TestEnforceCutsFlowsFromBefore: flows that went out before enforcement
// began (in audit mode, with conntrack already tracking them for the
// masquerade or the WAN guard) are not let through by "established" once
// enforce is on: a UDP flow and a TCP connection to destinations the
// policy denies stop at the switch, by reload and by a fresh Install
// (THREATS.md F3/G4: nothing the policy forbids gets out in enforce mode).
// So does DNS straight to a server of the client's choosing, which the
// forwarder redirect would have caught had the flow begun under enforce.
// A flow the policy allows carries on.
func TestEnforceCutsFlowsFromBefore(t *testing.T) {
	requireNft(t)
	for _, how := range []string{"replace", "install"} {
		t.Run(how, func(t *testing.T) {
			tp := newTopo(t)
			tp.proxyStandIn(t)
			tp.dnsStandIn(t)
			tp.serverUDP(t, "198.18.2.2:9000", "198.18.2.3:9000", "[2001:db8:2::3]:9000", "198.18.2.3:53", "[2001:db8:2::3]:53")
			echo := func(addr string) {
				ln, err := tp.server.Listen("tcp", addr)
				if err != nil {
					t.Fatal(err)
				}
				serve(t, ln, func(c net.Conn) {
					r := bufio.NewReader(c)
					for {
						line, err := r.ReadString('\n')
						if err != nil {
							return
						}
						fmt.Fprintf(c, "echo %s", line)
					}
				})
			}
			echo("[::]:2000")
			echo("[::]:53")

			// The seed's dns rule: DNS is the forwarder's, every query
			// from the LAN is redirected to it.
			eng := compile(t, testPolicy+`
  - name: dns
    to: ["0.0.0.0/0", "::/0"]
    ports: [53/udp, 53/tcp]
`)
			audit := tp.firewall(t, Config{GuardWAN: true})
			if err := audit.Install(eng.WithMode(policy.ModeAudit)); err != nil {
				t.Fatal(err)
			}

			// Long-lived flows opened in audit mode: UDP and TCP to
			// destinations no rule allows, and UDP one rule allows.
			udpDenied := dialFlow(t, tp, "udp", "198.18.2.3:9000")
			udpDenied6 := dialFlow(t, tp, "udp", "[2001:db8:2::3]:9000")
			udpAllowed := dialFlow(t, tp, "udp", "198.18.2.2:9000")
			tcpDenied := dialFlow(t, tp, "tcp", "198.18.2.2:2000")
			tcpDenied6 := dialFlow(t, tp, "tcp", "[2001:db8:2::2]:2000")
			// A DNS tunnel to the attacker's own server, on one socket.
			dnsDirect := dialFlow(t, tp, "udp", "198.18.2.3:53")
			dnsDirect6 := dialFlow(t, tp, "udp", "[2001:db8:2::3]:53")
			dnsDirectTCP := dialFlow(t, tp, "tcp", "198.18.2.3:53")
			prior := []*flow{udpDenied, udpDenied6, tcpDenied, tcpDenied6, dnsDirect, dnsDirect6, dnsDirectTCP}
			for _, f := range append(prior, udpAllowed) {
				if err := f.ask(3 * time.Second); err != nil {
					t.Fatalf("audit mode, %s: %v", f.addr, err)
				}
			}

			switch how {
			case "replace":
				if err := audit.Replace(eng); err != nil {
					t.Fatal(err)
				}
			case "install":
				// egressd restarted in enforce mode.
				audit.Detach()
				if err := tp.firewall(t, Config{}).Install(eng); err != nil {
					t.Fatal(err)
				}
			}
			for _, f := range prior {
				if err := f.ask(700 * time.Millisecond); err == nil {
					t.Errorf("enforce: the %s flow to %s opened in audit mode still gets through", f.network, f.addr)
				}
			}
			if err := udpAllowed.ask(3 * time.Second); err != nil {
				t.Errorf("enforce: the allowed UDP flow to %s: %v", udpAllowed.addr, err)
			}
		})
	}
}

// flow is one long-lived connected socket from the client.
type flow struct {
	network, addr string
	c             net.Conn
	r             *bufio.Reader
	n             int
}

func dialFlow(t *testing.T, tp *topo, network, addr string) *flow {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	c, err := tp.client.DialContext(ctx, network, addr)
	if err != nil {
		t.Fatalf("%s %s: %v", network, addr, err)
	}
	t.Cleanup(func() { c.Close() })
	return &flow{network: network, addr: addr, c: c, r: bufio.NewReader(c)}
}

// ask sends one message on the flow and waits for its answer.
func (f *flow) ask(timeout time.Duration) error {
	f.n++
	msg := fmt.Sprintf("ping%d\n", f.n)
	f.c.SetDeadline(time.Now().Add(timeout))
	if _, err := f.c.Write([]byte(msg)); err != nil {
		return err
	}
	if f.network == "udp" {
		buf := make([]byte, 1500)
		n, err := f.c.Read(buf)
		if err != nil {
			return err
		}
		if !strings.HasPrefix(string(buf[:n]), msg) {
			return fmt.Errorf("answer %q", buf[:n])
		}
		return nil
	}
	for {
		line, err := f.r.ReadString('\n')
		if err != nil {
			return err
		}
		if line == "echo "+msg {
			return nil
		}
	}
}
