package main

import (
	"context"
	"io"
	"slices"
	"strings"
	"testing"
)

// TestFastPathFlags: --fast-path needs the firewall and TLS ports to
// decide; the values it takes reach the firewall's configuration.
func TestFastPathFlags(t *testing.T) {
	parse := func(args ...string) (runConfig, error) {
		var cfg runConfig
		fs := newFlags("run", io.Discard)
		cfg.flags(fs)
		if _, err := cfg.parse(fs, args); err != nil {
			t.Fatal(err)
		}
		return cfg, checkFlagValues(cfg)
	}
	for _, tc := range []struct {
		args []string
		want string // in the error; "": none
	}{
		{[]string{"--fast-path"}, ""},
		{[]string{"--fast-path", "--fast-path-ports", "443,8443,5223"}, ""},
		{[]string{"--fast-path", "--no-firewall"}, "--fast-path: egressd: the fast path needs the firewall"},
		{[]string{"--fast-path", "--fast-path-ports", "all"}, "--fast-path-ports: egressd: \"all\": name the TLS ports"},
		{[]string{"--fast-path", "--fast-path-ports", "1-1000"}, "more than 64 ports"},
		{[]string{"--fast-path", "--fast-path-ports", "443/udp"}, "--fast-path-ports"},
		{[]string{"--fast-path", "--ct-mark-bits", "0x00003000"}, "the fast path needs at least 3 tag bits"},
		{[]string{"--fast-path", "--fast-path-ports", "443"}, ""},
		// Without --fast-path the ports would do nothing: refused, the
		// default too when it is given; not given, it is not read.
		{[]string{"--fast-path-ports", "8443"}, "--fast-path-ports needs --fast-path"},
		{[]string{"--fast-path-ports", "443"}, "--fast-path-ports needs --fast-path"},
		{[]string{"--fast-path-ports=8443"}, "--fast-path-ports needs --fast-path"},
		{[]string{"-fast-path-ports", "8443", "--mode", "audit"}, "--fast-path-ports needs --fast-path"},
		{[]string{"--fast-path-ports=8443", "--fast-path"}, ""},
		{[]string{"--no-firewall", "--fast-path-ports", "all"}, "--fast-path-ports needs --fast-path"},
		{[]string{"--fast-path=false", "--fast-path-ports", "443"}, "--fast-path-ports needs --fast-path"},
		{[]string{"--no-firewall"}, ""},
	} {
		_, err := parse(tc.args...)
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%v: %v", tc.args, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%v: error %v, want one saying %q", tc.args, err, tc.want)
		}
	}
	cfg, err := parse("--fast-path", "--fast-path-ports", "8443,443,9000-9001")
	if err != nil {
		t.Fatal(err)
	}
	fc, err := firewallConfig(cfg, nil, "", "")
	if err != nil || !fc.FastPath || len(fc.FastPathPorts) != 3 {
		t.Fatalf("firewall config: fast path %v, ports %v (%v)", fc.FastPath, fc.FastPathPorts, err)
	}
	if got := portList(fc.FastPathPorts); !slices.Equal(got, []uint16{8443, 443, 9000, 9001}) {
		t.Errorf("the proxy's ports: %v", got)
	}
	cfg, _ = parse()
	if fc, _ := firewallConfig(cfg, nil, "", ""); fc.FastPath {
		t.Error("the fast path is on without --fast-path")
	}

	// Both commands, as the operator runs them: a usage error, with the
	// message, before anything starts.
	for _, args := range [][]string{
		{"run", "--no-firewall", "--state-dir", t.TempDir(), "--fast-path-ports", "8443"},
		{"firewall", "print", "--mode", "enforce", "--lan", "lan0", "--fast-path-ports", "8443"},
		{"firewall", "print", "--fast-path-ports", "443"},
	} {
		var out, errb strings.Builder
		code := run(context.Background(), args, &out, &errb)
		if code != exitUsage || !strings.Contains(errb.String(), "--fast-path-ports needs --fast-path") || out.Len() != 0 {
			t.Errorf("egressd %s: exit %d, want %d saying --fast-path-ports needs --fast-path\nstdout: %s\nstderr: %s", strings.Join(args, " "), code, exitUsage, out.String(), errb.String())
		}
	}
}
