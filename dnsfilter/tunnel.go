package dnsfilter

import (
	"hash/maphash"
	"math"
	"strings"
	"sync"
	"time"

	"egressd/policy"
)

// ReasonTunnel is the reason of the alarm event a (client, zone) pair
// raises when it sent more distinct names of a wildcard zone upstream in
// one window than Config.TunnelThreshold (THREATS.md E2).
const ReasonTunnel = "dns-tunnel"

// The bounds of the tunnel watch: a sketch of tunnelBits bits per
// (client, zone) pair, at most tunnelKeys pairs (512 KiB of sketches in
// all, whatever names clients send), and the largest threshold the sketch
// counts well (linear counting: at 5,000 names a quarter of the bits are
// still zero, and the estimate is within a few percent).
const (
	tunnelBits         = 4096
	tunnelKeys         = 1024
	maxTunnelThreshold = 5000
)

// tunnelWatch counts, per (client, zone), the distinct names a client had
// sent upstream under a wildcard rule's zone in the current fixed window
// (THREATS.md E2: a client tunnelling data through the labels of names an
// allowed `*.zone` lets it resolve, whose answers come from a server the
// attacker runs). A name is hashed into a bitmap of tunnelBits bits and
// the distinct count is estimated by linear counting, so a client sending
// random names costs one bitmap per pair, never a set that grows; pairs
// are capped at tunnelKeys, and a new one takes the place of one whose
// window is over, else of the one with the fewest names. A pair alarms
// once per window.
type tunnelWatch struct {
	threshold int
	window    int64 // nanoseconds
	seed      maphash.Seed

	mu   sync.Mutex // guards m
	m    map[tunnelKey]*tunnelSketch
	free []*tunnelSketch // sketches of evicted pairs, reused
}

type tunnelKey struct {
	client string // the device's MAC, else unresolvedTunnelKey, else the address
	zone   string
}

// unresolvedTunnelKey is the client of the tunnel watch the addresses
// of a LAN link without a device share, as they share the rate limit's
// bucket (rateLimiter.unresolvedSource): not a MAC or an address.
const unresolvedTunnelKey = "unresolved"

type tunnelSketch struct {
	start   int64 // window start, unix nanoseconds
	set     int   // bits set
	alarmed bool
	bits    [tunnelBits / 64]uint64
}

func newTunnelWatch(threshold int, window time.Duration) *tunnelWatch {
	return &tunnelWatch{threshold: threshold, window: int64(window), seed: maphash.MakeSeed(), m: map[tunnelKey]*tunnelSketch{}}
}

// estimate is the linear-counting estimate of the distinct names hashed
// into s.
func (s *tunnelSketch) estimate() int {
	zero := tunnelBits - s.set
	if zero == 0 {
		zero = 1
	}
	return int(math.Round(-tunnelBits * math.Log(float64(zero)/tunnelBits)))
}

// observe counts name for (client, zone) at now and returns the estimated
// distinct names of the pair's window and true when this name took the
// pair over the threshold (once per window).
func (w *tunnelWatch) observe(client, zone, name string, now int64) (int, bool) {
	h := maphash.String(w.seed, name) % tunnelBits
	k := tunnelKey{client, zone}
	w.mu.Lock()
	defer w.mu.Unlock()
	s := w.m[k]
	if s == nil {
		if len(w.m) >= tunnelKeys {
			w.evictLocked(now)
		}
		if n := len(w.free); n > 0 {
			s, w.free = w.free[n-1], w.free[:n-1]
		} else {
			s = new(tunnelSketch)
		}
		s.start = now
		w.m[k] = s
	}
	if now-s.start >= w.window || now < s.start {
		*s = tunnelSketch{start: now}
	}
	if word, bit := &s.bits[h/64], uint64(1)<<(h%64); *word&bit == 0 {
		*word |= bit
		s.set++
	}
	n := s.estimate()
	if n < w.threshold || s.alarmed {
		return n, false
	}
	s.alarmed = true
	return n, true
}

// evictLocked makes room for one pair: the pairs whose window is over go,
// else the one with the fewest names. Not an arbitrary one: a client
// that sends names of new zones (a "*" rule lets it resolve any) between
// its tunnel's names would push its own pair out again and again, its
// count never reaching the threshold.
func (w *tunnelWatch) evictLocked(now int64) {
	var minK tunnelKey
	var minS *tunnelSketch
	for k, s := range w.m {
		if now-s.start >= w.window {
			delete(w.m, k)
			w.free = append(w.free, s)
			continue
		}
		if minS == nil || s.set < minS.set {
			minK, minS = k, s
		}
	}
	if len(w.m) < tunnelKeys || minS == nil {
		return
	}
	delete(w.m, minK)
	w.free = append(w.free, minS)
}

// len is the number of pairs held, for tests.
func (w *tunnelWatch) len() int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return len(w.m)
}

// tunnelZone returns the zone a name allowed by the rule of d counts
// under, and whether it counts at all: the suffix after the '*' of the
// rule's wildcard name pattern the name ends in (the longest, from its
// first dot: `*.t.tenant.cloud` and `api-*.tenant.cloud` count under
// `t.tenant.cloud` and `tenant.cloud`); for a "*" rule, which lets the
// client resolve every name, the name's last two labels. A name one of the
// rule's patterns names exactly does not count: no label of it is the
// client's to choose.
func tunnelZone(eng *policy.Engine, d policy.Decision, name string) (string, bool) {
	rules := eng.Rules()
	if d.RuleIndex < 0 || d.RuleIndex >= len(rules) {
		return "", false
	}
	zone, any := "", false
	for _, t := range rules[d.RuleIndex].To {
		switch t.Kind {
		case policy.TargetAny:
			any = true
		case policy.TargetName, policy.TargetHostPath:
			p := t.Pattern
			if p == name {
				return "", false
			}
			i := strings.LastIndexByte(p, '*')
			if i < 0 {
				continue
			}
			suf := p[i+1:]
			j := strings.IndexByte(suf, '.')
			if j < 0 || !strings.HasSuffix(name, suf) {
				continue
			}
			if z := suf[j+1:]; len(z) > len(zone) {
				zone = z
			}
		}
	}
	if zone == "" && any {
		zone = lastLabels(name, 2)
	}
	return zone, zone != ""
}

// lastLabels returns the last n labels of name.
func lastLabels(name string, n int) string {
	i := len(name)
	for ; n > 0 && i > 0; n-- {
		i = strings.LastIndexByte(name[:i], '.')
		if i < 0 {
			return name
		}
	}
	return name[i+1:]
}
