package main

import (
	"math"
	"os"
	"runtime/debug"
	"strings"
	"testing"

	"egressd/internal/memlimit"
)

// TestCaptureRingScalesWithMemory: capture's ring is a 32nd of the memory
// egressd may use, between 8 and 64 MiB. It was 64 MiB whatever the
// machine: on a 512 MiB gateway an eighth of its memory, the largest part
// of egressd's at rest.
func TestCaptureRingScalesWithMemory(t *testing.T) {
	for _, c := range []struct {
		avail int64
		lans  int
		want  int
	}{
		{0, 1, 64}, // unknown
		{24 << 30, 1, 64},
		{24 << 30, 4, 64},
		{2 << 30, 1, 64},
		{2 << 30, 2, 32}, // the rings share a 32nd
		{1 << 30, 1, 32},
		{1 << 30, 0, 32},
		{512 << 20, 1, 16},
		{512 << 20, 2, 8},
		{512 << 20, 3, 8}, // 8 MiB each at least
		{256 << 20, 1, 8},
		{128 << 20, 1, 8},
		{64 << 20, 1, 8},
	} {
		if got := captureRingMB(c.avail, c.lans); got != c.want {
			t.Errorf("ring for %d MiB, %d LANs: %d MiB, want %d", c.avail>>20, c.lans, got, c.want)
		}
	}
}

// TestApplyMemoryLimit: under a cgroup limit the runtime's soft limit is
// set below it, and the start-up line says so; without one it is left
// alone.
func TestApplyMemoryLimit(t *testing.T) {
	if v, ok := os.LookupEnv("GOMEMLIMIT"); ok {
		t.Skipf("GOMEMLIMIT=%s set for the test", v)
	}
	prev := debug.SetMemoryLimit(-1)
	defer debug.SetMemoryLimit(prev)
	debug.SetMemoryLimit(math.MaxInt64)
	if got := applyMemoryLimit(memlimit.Limits{RAM: 1 << 30}); !strings.Contains(got, "no memory limit") || debug.SetMemoryLimit(-1) != math.MaxInt64 {
		t.Errorf("without a cgroup limit: %q, runtime limit %d", got, debug.SetMemoryLimit(-1))
	}
	l := memlimit.Limits{Cgroup: 128 << 20, File: "/sys/fs/cgroup/system.slice/egressd.service/memory.max", RAM: 1 << 30}
	got := applyMemoryLimit(l)
	if want := "memory limit 112 MiB, under the cgroup's 128 MiB (/sys/fs/cgroup/system.slice/egressd.service/memory.max)"; got != want {
		t.Errorf("line %q, want %q", got, want)
	}
	if v := debug.SetMemoryLimit(-1); v != 112<<20 {
		t.Errorf("runtime limit %d, want %d", v, 112<<20)
	}
}

// TestProxyLimitsScaleWithMemory: the proxy's connection limits are half
// the memory egressd may use at 64 KiB a connection, between 1,024 and the
// proxy's defaults, a tenth for one client address. They were 50,000 and
// 5,000 whatever the machine: tunnels enough to take a 512 MiB gateway's
// memory twice over.
func TestProxyLimitsScaleWithMemory(t *testing.T) {
	for _, c := range []struct {
		avail            int64
		total, perClient int
	}{
		{0, 0, 0}, // unknown: the proxy's defaults
		{24 << 30, 50000, 5000},
		{8 << 30, 50000, 5000},
		{2 << 30, 16384, 1638},
		{1 << 30, 8192, 819},
		{512 << 20, 4096, 409},
		{128 << 20, 1024, 102},
		{32 << 20, 1024, 102},
	} {
		total, per := proxyLimits(c.avail)
		if total != c.total || per != c.perClient {
			t.Errorf("limits for %d MiB: %d, %d per client; want %d, %d", c.avail>>20, total, per, c.total, c.perClient)
		}
	}
}
