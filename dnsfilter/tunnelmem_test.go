package dnsfilter

import (
	"fmt"
	"net/netip"
	"runtime"
	"strings"
	"testing"
	"time"
)

// TestTunnelWatchMemory measures the tunnel watch with every watch full
// (tunnelKeys pairs and zones each) of the longest keys a client can make
// them hold: a "*" rule's zone is the last two labels of the client's
// name (two 63-byte labels), kept as a part of the name, so the whole
// name (253 bytes) stays; a client without a device is its address's
// text (the longest IPv6 form); each zone's sketch names five clients.
// The heap it holds must be within the bound tunnel.go states.
func TestTunnelWatchMemory(t *testing.T) {
	const bound = 4 << 20 // tunnel.go and README: "under 4 MiB"
	label, first := strings.Repeat("a", 60), strings.Repeat("b", 61)
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	tun := newTunnels(500, time.Minute)
	now := time.Now().UnixNano()
	for z := range tunnelKeys {
		for c := range tunnelTop {
			// A fresh name and address text for each query, as the
			// forwarder has: nothing shared between the keys.
			name := fmt.Sprintf("%s.%s%03d.%s%03d.%s%03d", first, label, c, label, z/1000, label, z%1000)
			if len(name) != 253 {
				t.Fatalf("name of %d bytes", len(name))
			}
			zone := lastLabels(name, 2)
			client := netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, byte(c), byte(z >> 8), byte(z)}).String()
			tun.observe(client, zone, name, now)
		}
	}
	for _, w := range []*tunnelWatch{tun.pair, tun.zone, tun.slow, tun.zoneSlow} {
		if n := w.len(); n != tunnelKeys {
			t.Fatalf("a watch holds %d keys, want it full (%d)", n, tunnelKeys)
		}
	}
	for _, s := range tun.zone.m {
		if s.top[tunnelTop-1].key == "" {
			t.Fatalf("a zone's sketch names fewer than %d clients", tunnelTop)
		}
		break
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	held := int64(after.HeapAlloc) - int64(before.HeapAlloc)
	runtime.KeepAlive(tun)
	t.Logf("tunnel watch, full: %d bytes (%.2f MiB), %d per key", held, float64(held)/(1<<20), held/(4*tunnelKeys))
	if held > bound {
		t.Errorf("the full tunnel watch holds %d bytes, bound %d", held, bound)
	}
}
