package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"egressd/dnsfilter"
	"egressd/policy"
	"egressd/profiles"
)

// TestDNSLoopSaysWhatToDo: on a gateway whose /etc/resolv.conf names a
// local stub (systemd-resolved's 127.0.0.53, or 127.0.0.1 of a resolver
// egressd replaces), the forwarder cannot start: the NOT RUNNING line
// says where the upstream came from and which flag names the site's
// resolver instead. Before, it said only "upstream 127.0.0.53:53 is one
// of our own listen addresses (a forwarding loop)": no word of
// resolv.conf, nor of --upstream-dns.
func TestDNSLoopSaysWhatToDo(t *testing.T) {
	src, err := profiles.Get("nirovision")
	if err != nil {
		t.Fatal(err)
	}
	eng, err := policy.Compile(profiles.File("nirovision"), src)
	if err != nil {
		t.Fatal(err)
	}
	store := policy.NewStore(eng)
	rc := filepath.Join(t.TempDir(), "resolv.conf")
	if err := os.WriteFile(rc, []byte("nameserver 127.0.0.53\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err = dnsfilter.New(dnsfilter.Config{Listen: []string{":53"}, ResolvConf: rc}, dnsfilter.Deps{Policy: store})
	if err == nil {
		t.Fatal("dnsfilter.New accepted an upstream on its own listen address")
	}
	msg := dnsNotRunning(err)
	for _, want := range []string{"127.0.0.53:53", rc, "forwarding loop", "--upstream-dns"} {
		if !strings.Contains(msg, want) {
			t.Errorf("%q does not say %q", msg, want)
		}
	}
}
