// Package sysmon keeps the Go runtime's sysmon thread out of deep sleep in
// egressd's long-running daemon (egressd run, and proxybench and dnsbench,
// which stand in for it in the benchmarks). It runs first thing in main,
// before anything else in the flow.
//
// Why: when every processor of a Go program goes idle, sysmon sleeps until
// the next system call wakes it, and then polls every 20 µs again, backing
// off only after 50 quiet rounds (golang/go#18236). A proxy at half a
// core's load goes idle and busy again many times a second, so its sysmon
// woke about 3,000 times a second under the transparent benchmark and cost
// about 40 µs of CPU per connection, 12 % of the proxy's
// (bench/proxy-cpu.sh prints it). Go has no setting for sysmon's tick, but
// with GODEBUG's schedtrace set sysmon never enters deep sleep, so it backs
// off to its 10 ms tick and stays there: about 100 wakeups a second,
// idle or busy.
//
// GODEBUG is read once, when the runtime starts, so Reexec executes the
// binary again (same process, same arguments) with it set. The interval
// is the largest schedtrace takes, 2^31-1 ms (24.8 days): the runtime
// writes its one-line scheduler summary to standard error once per that
// interval of the host's uptime (on a host up longer than that, once at
// start too). GODEBUG=schedtrace=0 turns all this off.
package sysmon

import (
	"fmt"
	"os"
	"strings"
	"syscall"
)

// Setting is the GODEBUG setting Reexec adds.
const Setting = "schedtrace=2147483647"

// Reexec executes the running binary again with Setting added to GODEBUG,
// unless GODEBUG already has a schedtrace setting (whatever its value). It
// returns only when it did not execute: nil when nothing was needed, or
// the error (the caller goes on with sysmon as it is).
func Reexec() error {
	gd, _ := os.LookupEnv("GODEBUG")
	if hasSchedtrace(gd) {
		return nil
	}
	exe, err := os.Executable()
	if err != nil {
		return fmt.Errorf("sysmon: %w", err)
	}
	err = syscall.Exec(exe, os.Args, environ(os.Environ()))
	return fmt.Errorf("sysmon: execute %s again: %w", exe, err)
}

// hasSchedtrace reports whether the GODEBUG value gd sets schedtrace, read
// as the runtime reads it: comma-separated key=value, keys untrimmed.
func hasSchedtrace(gd string) bool {
	for kv := range strings.SplitSeq(gd, ",") {
		if k, _, ok := strings.Cut(kv, "="); ok && k == "schedtrace" {
			return true
		}
	}
	return false
}

// environ returns env with Setting added to its GODEBUG (or a GODEBUG of
// Setting alone), the other settings kept.
func environ(env []string) []string {
	out := make([]string, 0, len(env)+1)
	found := false
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, "GODEBUG="); ok && !found {
			found = true
			if v != "" {
				kv = "GODEBUG=" + v + "," + Setting
			} else {
				kv = "GODEBUG=" + Setting
			}
		}
		out = append(out, kv)
	}
	if !found {
		out = append(out, "GODEBUG="+Setting)
	}
	return out
}
