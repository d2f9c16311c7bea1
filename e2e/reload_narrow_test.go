package e2e

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"testing"
	"time"
)

// narrowPolicy is an enforce policy of three rules whose traffic the
// firewall's learned sets let out (narrow-ntp: 123/udp; narrow-intake: 10516/tcp
// with --tcp-ports 443) or the proxy decides by the names DNS gave the
// address out for (narrow-web: 443/tcp without SNI; narrow-intake without
// --tcp-ports), and narrow-clock, which no reload changes. to holds the three
// rules' names ("": the rule is left out), from their clients ("": any).
func narrowPolicy(to [3]string, from string) []byte {
	p := "version: 1\nmode: enforce\nrules:\n"
	for i, r := range [3][2]string{{"narrow-ntp", "123/udp"}, {"narrow-intake", "10516/tcp"}, {"narrow-web", "443/tcp"}} {
		if to[i] == "" {
			continue
		}
		p += fmt.Sprintf("  - name: %s\n    why: a rule the reloads narrow\n    to: [%q]\n", r[0], to[i])
		if from != "" {
			p += fmt.Sprintf("    from: [%q]\n", from)
		}
		p += fmt.Sprintf("    ports: [%s]\n", r[1])
	}
	return append([]byte(p), "  - name: narrow-clock\n    why: an NTP server no reload touches\n    to: [\""+clockName+"\"]\n    ports: [123/udp]\n"...)
}

// TestReloadNarrowsLearnedAddresses: a reload that removes or narrows a
// rule takes effect at once for new connections to the addresses DNS
// gave out under the old rule, before their TTL (300 s) ends, and one
// that adds a rule (or widens it) opens the addresses already given out
// for its names at once, without the client asking DNS again. In enforce
// mode the client resolves 0.pool.ntp.org and 1.pool.ntp.org (narrow-ntp),
// agent-intake.logs.datadoghq.com (narrow-intake) and
// production.cloudflare.docker.com (narrow-web); then, after each reload, it
// sends NTP to both pool addresses, TCP to intake's port 10516 and a TLS
// hello without SNI to docker's port 443, each from a new socket (a new
// conntrack entry) and without asking DNS again:
//
//   - every rule's names narrowed to one that is not the name asked
//     (narrow-ntp to 0.pool.ntp.org): all denied but 0.pool's NTP;
//   - every rule's names as at the start, its clients narrowed to this
//     client: all let out (the sets start afresh from its answers);
//   - every rule's clients narrowed to another address: all denied;
//   - every rule as at the start: all let out, at once;
//   - every rule removed: all denied.
//
// NTP to clock.example (narrow-clock, never changed) is answered throughout.
// TCP to 10516 goes through the proxy (decided by the names DNS gave the
// address out for, dns-learned), and with --tcp-ports 443 through the
// forward chain (narrow-intake's learned set).
func TestReloadNarrowsLearnedAddresses(t *testing.T) {
	for _, c := range []struct {
		name string
		args []string
	}{{"proxy", nil}, {"forwarded", []string{"--tcp-ports", "443"}}} {
		t.Run(c.name, func(t *testing.T) { testReloadNarrows(t, c.args) })
	}
}

// testReloadNarrows is TestReloadNarrowsLearnedAddresses with egressd
// run's extra arguments: none (TCP to 10516 goes through the proxy,
// which decides it by the names DNS gave the address out for), or
// --tcp-ports 443 (the forward chain lets it out to narrow-intake's learned
// set).
func testReloadNarrows(t *testing.T, extra []string) {
	tp := newTopo(t)
	d := newDaemon(t, tp, "")
	d.extra = extra
	proxied := len(extra) == 0
	wide := [3]string{"*.pool.ntp.org", "*.logs.datadoghq.com", "*.docker.com"}
	d.writePolicy(narrowPolicy(wide, ""))
	d.start()
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("egressd output:\n%s", d.logs())
		}
	})

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	resolve := func(name string) netip.Addr { return tp.resolve4(t, ctx, name) }
	ntpAsk := func(a netip.Addr, timeout time.Duration) error { return tp.ntpFrom(ctx, a, timeout) }
	pool0, pool1, clock := resolve(poolNames[0]), resolve(poolNames[1]), resolve(clockName)
	intake, docker := resolve(intakeName), resolve(dockerName)

	// open checks what a new connection to each address gets now; a
	// connection the proxy denies is no-rule, or why's reason where a
	// rule still names the name (the name's reason: policy.DecideLearned).
	type want struct{ pool0, pool1, intake, web bool }
	open := func(when string, w want, why ...string) {
		t.Helper()
		for _, c := range []struct {
			name string
			addr netip.Addr
			ok   bool
		}{{poolNames[0], pool0, w.pool0}, {poolNames[1], pool1, w.pool1}, {clockName, clock, true}} {
			timeout := 2 * time.Second
			if !c.ok {
				timeout = 700 * time.Millisecond
			}
			err := ntpAsk(c.addr, timeout)
			switch {
			case c.ok && err != nil:
				t.Errorf("%s: NTP to %s (%s) from a new socket: %v; want an answer", when, c.name, c.addr, err)
			case !c.ok && err == nil:
				t.Errorf("%s: NTP to %s (%s) from a new socket was answered; want it dropped", when, c.name, c.addr)
			case !c.ok:
				if ne, ok := err.(net.Error); !ok || !ne.Timeout() {
					t.Errorf("%s: NTP to %s: %v, want a timeout (dropped)", when, c.name, err)
				}
			}
		}
		if proxied {
			// The proxy takes the connection, and decides it by the names
			// DNS gave the address out for (no SNI: not TLS).
			_, port, err := tp.rawHTTP(netip.AddrPortFrom(intake, 10516).String(), "SSH-2.0-OpenSSH_9.2\r\n")
			if err != nil && port == 0 {
				t.Fatalf("%s: raw TCP to %s:10516: %v", when, intake, err)
			}
			verdict, reason := "deny", denied(why)
			if w.intake {
				verdict, reason = "allow", ""
			}
			ev := wantEvent(t, d, when+": not TLS to "+intakeName+"'s address", byClientPort(port), verdict, reason)
			if ev.Name != intakeName || ev.NameSource != "dns-learned" {
				t.Errorf("%s: not TLS to %s:10516: recorded as %v, want %s (dns-learned)", when, intake, ev, intakeName)
			}
		} else if got := tp.dialOK(netip.AddrPortFrom(intake, 10516).String()); got != w.intake {
			t.Errorf("%s: a new TCP connection to %s:10516 (%s) completed: %v, want %v", when, intakeName, intake, got, w.intake)
		}
		o := tp.sendHello(netip.AddrPortFrom(docker, 443).String(), buildHello(helloSpec{}), 0, 0)
		if w.web {
			if o.denied || o.err != nil {
				t.Errorf("%s: hello without SNI to %s (given for %s): %v; want it let through", when, docker, dockerName, o)
			}
			ev := wantEvent(t, d, when+": no SNI to "+dockerName+"'s address", byClientPort(o.port), "allow", "")
			if ev.Name != dockerName || ev.NameSource != "dns-learned" {
				t.Errorf("%s: no SNI to %s: recorded as %v, want %s (dns-learned)", when, docker, ev, dockerName)
			}
		} else {
			if !o.denied {
				t.Errorf("%s: hello without SNI to %s (given for %s under a removed rule): %v; want it denied", when, docker, dockerName, o)
			}
			wantEvent(t, d, when+": no SNI to "+dockerName+"'s address", byClientPort(o.port), "deny", denied(why))
		}
	}

	open("before any reload", want{true, true, true, true})

	d.writePolicy(narrowPolicy([3]string{poolNames[0], "other.logs.datadoghq.com", "other.docker.com"}, ""))
	d.hup(true)
	open("every rule's names narrowed", want{pool0: true})

	// Narrowed to this client alone: its sets start afresh from the
	// answers given to it, so all is let out.
	d.writePolicy(narrowPolicy(wide, lanClient4+"/32"))
	d.hup(true)
	open("every rule's clients narrowed to this client", want{true, true, true, true})

	d.writePolicy(narrowPolicy(wide, "198.18.1.99/32"))
	d.hup(true)
	open("every rule's clients narrowed to another address", want{}, "client-not-allowed")

	d.writePolicy(narrowPolicy(wide, ""))
	d.hup(true)
	open("every rule as at the start", want{true, true, true, true})

	d.writePolicy(narrowPolicy([3]string{}, ""))
	d.hup(true)
	open("every rule removed but narrow-clock", want{})
}

// denied is the reason of a denial: no-rule unless why gives one.
func denied(why []string) string {
	if len(why) > 0 {
		return why[0]
	}
	return "no-rule"
}
