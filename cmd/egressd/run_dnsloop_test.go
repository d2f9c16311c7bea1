package main

import (
	"net"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"egressd/dnsfilter"
	"egressd/policy"
)

// TestDNSLoopSaysWhatToDo: on a gateway whose /etc/resolv.conf names a
// local stub (systemd-resolved's 127.0.0.53, or 127.0.0.1 of a resolver
// egressd replaces), the forwarder cannot start: the NOT RUNNING line
// says where the upstream came from and which flag names the site's
// resolver instead. Before, it said only "upstream 127.0.0.53:53 is one
// of our own listen addresses (a forwarding loop)": no word of
// resolv.conf, nor of --upstream-dns.
func TestDNSLoopSaysWhatToDo(t *testing.T) {
	store := policy.NewStore(seedEngine(t))
	rc := filepath.Join(t.TempDir(), "resolv.conf")
	if err := os.WriteFile(rc, []byte("nameserver 127.0.0.53\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := dnsfilter.New(dnsfilter.Config{Listen: []string{":53"}, ResolvConf: rc}, dnsfilter.Deps{Policy: store})
	if err == nil {
		t.Fatal("dnsfilter.New accepted an upstream on its own listen address")
	}
	msg := dnsNotRunning(err, err.Error())
	for _, want := range []string{"127.0.0.53:53", rc, "forwarding loop", "--upstream-dns"} {
		if !strings.Contains(msg, want) {
			t.Errorf("%q does not say %q", msg, want)
		}
	}
}

// TestRunDNSPortTaken: on a gateway where another resolver already holds
// the DNS port (systemd-resolved on 127.0.0.53:53, a dnsmasq or unbound
// egressd is to replace), the forwarder's NOT RUNNING line says that
// another program holds the port and what to do: stop it, or give
// --dns-listen an address it leaves free, and start egressd again (the
// forwarder does not try again by itself). Before, it said only "bind:
// address already in use".
func TestRunDNSPortTaken(t *testing.T) {
	taken, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	busy := taken.LocalAddr().String()
	r := startRun(t, buildEgressd(t), t.TempDir(), "--mode", "audit", "--dns-listen", busy, "--explicit-proxy-listen", "off")
	for deadline := time.Now().Add(10 * time.Second); !strings.Contains(r.out.String(), "NOT RUNNING: dns:"); {
		if time.Now().After(deadline) {
			t.Fatalf("no NOT RUNNING line for dns in 10s\nstdout:\n%s\nstderr:\n%s", r.out.String(), r.errb.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	got := r.out.String()
	// --explicit-proxy-listen off: the proxy line says the explicit
	// proxy is off, not that it listens "on off" (before).
	if !regexp.MustCompile(`(?m)^proxy: transparent on 127\.0\.0\.1:[1-9]\d*, explicit off$`).MatchString(got) {
		t.Errorf("want the proxy line to say the explicit proxy is off:\n%s", got)
	}
	for _, want := range []string{"address already in use", "another program", "--dns-listen", "start egressd again"} {
		if !strings.Contains(got, want) {
			t.Errorf("the dns NOT RUNNING line does not say %q:\n%s", want, got)
		}
	}
}

// TestRunDNSPortTakenSaysListenOnce: the forwarder's NOT RUNNING line
// names the failed listen once, for UDP and for TCP (its UDP port free,
// its TCP port held). Before session 32 it read "dnsfilter: listen tcp:
// listen tcp 127.0.0.1:53: bind: ...".
func TestRunDNSPortTakenSaysListenOnce(t *testing.T) {
	bin := buildEgressd(t)
	for _, proto := range []string{"udp", "tcp"} {
		t.Run(proto, func(t *testing.T) {
			var busy string
			if proto == "udp" {
				taken, err := net.ListenPacket("udp", "127.0.0.1:0")
				if err != nil {
					t.Fatal(err)
				}
				defer taken.Close()
				busy = taken.LocalAddr().String()
			} else {
				taken, err := net.Listen("tcp", "127.0.0.1:0")
				if err != nil {
					t.Fatal(err)
				}
				defer taken.Close()
				busy = taken.Addr().String()
			}
			r := startRun(t, bin, t.TempDir(), "--mode", "audit", "--dns-listen", busy)
			var line string
			for deadline := time.Now().Add(10 * time.Second); line == ""; {
				for _, l := range strings.Split(r.out.String(), "\n") {
					if strings.Contains(l, "NOT RUNNING: dns:") {
						line = l
					}
				}
				if line == "" && time.Now().After(deadline) {
					t.Fatalf("no NOT RUNNING line for dns in 10s\nstdout:\n%s\nstderr:\n%s", r.out.String(), r.errb.String())
				}
				time.Sleep(20 * time.Millisecond)
			}
			if n := strings.Count(line, "listen "+proto); n != 1 || !strings.Contains(line, "listen "+proto+" "+busy+": bind: address already in use") {
				t.Errorf("the dns NOT RUNNING line names the listen %d times, want once, with the address:\n%s", n, line)
			}
		})
	}
}
