package main

import (
	"context"
	"net"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// TestRunProxyListenFails: `egressd run` says what the proxy actually
// listens on, not what it was asked to: a listener whose port is taken is
// a part not running (for the summary and /readyz), and no "proxy: ...
// on" line names it as listening.
func TestRunProxyListenFails(t *testing.T) {
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	busy := taken.Addr().String()
	for _, c := range []struct{ name, transparent, explicit string }{
		{"transparent", busy, "127.0.0.1:0"},
		{"explicit", "127.0.0.1:0", busy},
		{"both free", "127.0.0.1:0", "127.0.0.1:0"},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			var out, errb lockedBuffer
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan int, 1)
			go func() {
				done <- cmdRun(ctx, []string{"--mode", "audit", "--lan", "lo", "--wan", "lo", "--no-firewall",
					"--dns-listen", "127.0.0.1:0", "--proxy-listen", c.transparent, "--explicit-proxy-listen", c.explicit,
					"--admin", "127.0.0.1:0", "--upstream-dns", "127.0.0.1:9", "--state-dir", filepath.Join(dir, "state")}, &out, &errb)
			}()
			defer func() {
				cancel()
				select {
				case <-done:
				case <-time.After(20 * time.Second):
					t.Fatalf("egressd run did not stop within 20s\n%s", errb.String())
				}
			}()
			for deadline := time.Now().Add(10 * time.Second); !strings.Contains(out.String(), "admin: http://"); {
				if time.Now().After(deadline) {
					t.Fatalf("egressd run did not start in 10s\nstdout:\n%s\nstderr:\n%s", out.String(), errb.String())
				}
				time.Sleep(20 * time.Millisecond)
			}
			got := out.String()
			if c.name == "both free" {
				if !regexp.MustCompile(`(?m)^proxy: transparent on 127\.0\.0\.1:[1-9]\d*, explicit on 127\.0\.0\.1:[1-9]\d*$`).MatchString(got) || strings.Contains(got, "NOT RUNNING: proxy") {
					t.Errorf("want the bound addresses and no failure:\n%s", got)
				}
				return
			}
			if strings.Contains(got, " on "+busy) {
				t.Errorf("the taken address %s is named as listening:\n%s", busy, got)
			}
			if c.name == "explicit" {
				// The transparent proxy, which enforce mode's redirect
				// needs, goes on without the explicit one.
				if !regexp.MustCompile(`(?m)^proxy: transparent on 127\.0\.0\.1:[1-9]\d*, explicit not listening$`).MatchString(got) ||
					!strings.Contains(got, "NOT RUNNING: explicit-proxy: proxy: explicit listener") || !strings.Contains(got, "address already in use") ||
					strings.Contains(got, "NOT RUNNING: proxy:") {
					t.Errorf("want the transparent proxy listening and the explicit one not running:\n%s", got)
				}
				return
			}
			if !strings.Contains(got, "NOT RUNNING: proxy: proxy: "+c.name+" listener") || !strings.Contains(got, "address already in use") {
				t.Errorf("no proxy failure in the summary:\n%s", got)
			}
			if !strings.Contains(got, "proxy: not listening") {
				t.Errorf("no proxy line saying nothing listens:\n%s", got)
			}
		})
	}
}
