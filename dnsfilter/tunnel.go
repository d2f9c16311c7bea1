package dnsfilter

import (
	"hash/maphash"
	"math"
	"strings"
	"sync"
	"time"

	"egressd/audit"
	"egressd/policy"
)

// The reasons of the alarm events of the tunnel watch (THREATS.md E2).
// ReasonTunnel: a (client, zone) pair sent more distinct names of a
// wildcard rule's zone upstream in one window than
// Config.TunnelThreshold. ReasonTunnelZone: all clients together sent
// more than tunnelZoneFactor times it of one zone in one window (a tunnel
// spread over many devices or addresses); its event names no client.
// ReasonTunnelSlow: a pair sent more than tunnelSlowFactor times it in a
// window tunnelSlowWindows times as long (an hour by default: a tunnel
// kept under the threshold every minute). ReasonTunnelZoneSlow: all
// clients together sent more than tunnelZoneFactor times the long
// window's threshold of one zone in the long window (a slow tunnel spread
// over many devices, each under its own); its event names no client.
const (
	ReasonTunnel         = "dns-tunnel"
	ReasonTunnelZone     = "dns-tunnel-zone"
	ReasonTunnelSlow     = "dns-tunnel-slow"
	ReasonTunnelZoneSlow = "dns-tunnel-zone-slow"
)

// The bounds of the tunnel watch: a sketch of tunnelBits bits (512
// bytes, and the few words of its window and top clients) per
// (client, zone) pair and per zone in each of the short and the long
// window, at most tunnelKeys of each (under 4 MiB in all, whatever names
// clients send: 3.8 MiB with the longest keys, a "*" rule's zone that
// keeps its 253-byte name, an IPv6 address's text, five top clients a
// zone; TestTunnelWatchMemory), and the largest count one sketch counts well (linear
// counting: at 5,000 names a quarter of the bits are still zero, and the
// estimate is within a few percent). A watch whose threshold is above it
// (the zone's, the long window's) samples names by their hash.
const (
	tunnelBits         = 4096
	tunnelKeys         = 1024
	maxTunnelThreshold = 5000
	// tunnelZoneFactor: the zone-wide threshold is twice the pair's (in
	// the long window too), and the names of all clients but the one
	// that added the most must reach the pair's: the names of a zone many devices use add up (a
	// cache miss of each for each TTL), and a tunnel on one client
	// alarms as a pair already (its zone does not alarm again).
	tunnelZoneFactor = 2
	// tunnelSlowWindows and tunnelSlowFactor: the long window is sixty
	// short ones, its threshold ten times the short one's (83 names a
	// minute sustained, at the default of 500): a tunnel kept at 400 a
	// minute alarms in under 13 minutes, and a device that resolves tens
	// of new names of a zone a minute for an hour does not.
	tunnelSlowWindows = 60
	tunnelSlowFactor  = 10
	// tunnelTop is how many of a zone's clients its alarm names.
	tunnelTop = audit.MaxAlarmClients
)

// tunnels is the forwarder's tunnel watch: per (client, zone) and per
// zone over all clients, each in the short and in the long window. A
// name is hashed once.
type tunnels struct {
	seed                       maphash.Seed
	pair, zone, slow, zoneSlow *tunnelWatch
}

func newTunnels(threshold int, window time.Duration) *tunnels {
	return &tunnels{
		seed:     maphash.MakeSeed(),
		pair:     newTunnelWatch(threshold, window),
		zone:     newTunnelWatch(tunnelZoneFactor*threshold, window),
		slow:     newTunnelWatch(tunnelSlowFactor*threshold, tunnelSlowWindows*window),
		zoneSlow: newTunnelWatch(tunnelZoneFactor*tunnelSlowFactor*threshold, tunnelSlowWindows*window),
	}
}

// tunnelHits are the alarms one name raised: the estimated distinct names
// of the window of each watch that alarmed, 0 for one that did not, and,
// for the zone's in each window, the clients that added the most names
// to it, most first ("" past the last).
type tunnelHits struct {
	pair, zone, slow, zoneSlow int
	top, topSlow               [tunnelTop]string
}

// observe counts name, which client sent upstream under zone at now, in
// each watch.
func (t *tunnels) observe(client, zone, name string, now int64) tunnelHits {
	h := maphash.String(t.seed, name)
	var hits tunnelHits
	if n, a := t.pair.observe(client, zone, h, now); a {
		hits.pair = n
	}
	if n, a := t.slow.observe(client, zone, h, now); a {
		hits.slow = n
	}
	if n, a := t.zone.observeTop(client, zone, h, now, &hits.top); a {
		hits.zone = n
	}
	if n, a := t.zoneSlow.observeTop(client, zone, h, now, &hits.topSlow); a {
		hits.zoneSlow = n
	}
	return hits
}

// tunnelWatch counts, per (client, zone), the distinct names a client had
// sent upstream under a wildcard rule's zone in the current fixed window
// (THREATS.md E2: a client tunnelling data through the labels of names an
// allowed `*.zone` lets it resolve, whose answers come from a server the
// attacker runs); the zone-wide watch counts with the client "". A
// name's hash sets one bit of a bitmap of tunnelBits bits and the
// distinct count is estimated by linear counting, so a client sending
// random names costs one bitmap per pair, never a set that grows. Past
// maxTunnelThreshold names a bitmap fills: a watch whose threshold is
// above it counts only the names whose hash's top shift bits are zero
// (one in 2^shift) and scales its estimate. Pairs are capped at
// tunnelKeys, and a new one takes the place of one whose window is over,
// else of the one with the fewest names. A pair alarms once per window.
type tunnelWatch struct {
	threshold int
	window    int64 // nanoseconds
	shift     uint  // names are sampled one in 1<<shift

	mu   sync.Mutex // guards m
	m    map[tunnelKey]*tunnelSketch
	free []*tunnelSketch // sketches of evicted pairs, reused
}

type tunnelKey struct {
	client string // the device's MAC, else unresolvedTunnelKey, else the address; "" zone-wide
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
	top     [tunnelTop]tunnelClient // zone-wide: the clients that set the most bits
	bits    [tunnelBits / 64]uint64
}

// tunnelClient is a client of a zone-wide sketch and the bits it set (a
// space-saving count: a client that takes the place of the last one
// starts from its count).
type tunnelClient struct {
	key string
	n   int
}

func newTunnelWatch(threshold int, window time.Duration) *tunnelWatch {
	w := &tunnelWatch{threshold: threshold, window: int64(window), m: map[tunnelKey]*tunnelSketch{}}
	for threshold>>w.shift > maxTunnelThreshold {
		w.shift++
	}
	return w
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

// observe counts the name of hash h for (client, zone) at now and returns
// the estimated distinct names of the pair's window and true when this
// name took the pair over the threshold (once per window).
func (w *tunnelWatch) observe(client, zone string, h uint64, now int64) (int, bool) {
	return w.observeTop(client, zone, h, now, nil)
}

// observeTop is observe; with top non-nil it counts zone-wide (the
// client "" in the key) and credits client with the name when it was new,
// and an alarm fills top with the clients that added the most.
func (w *tunnelWatch) observeTop(client, zone string, h uint64, now int64, top *[tunnelTop]string) (int, bool) {
	k := tunnelKey{client, zone}
	if top != nil {
		k.client = ""
	}
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
	if w.shift == 0 || h>>(64-w.shift) == 0 {
		b := h % tunnelBits
		if word, bit := &s.bits[b/64], uint64(1)<<(b%64); *word&bit == 0 {
			*word |= bit
			s.set++
			if top != nil {
				s.credit(client)
			}
		}
	}
	n := s.estimate() << w.shift
	if n < w.threshold || s.alarmed {
		return n, false
	}
	if top != nil && s.set > 0 && n*(s.set-s.top[0].n)/s.set < w.threshold/tunnelZoneFactor {
		// Zone-wide, the names of all but the client that added the
		// most are under a pair's threshold: one client's names, whose
		// pair alarms on its own, not a tunnel spread over many. The
		// clients' shares are of the bits set, not of the names (a
		// name whose bit was set already credits no one): the others'
		// names are the estimate times their share of the bits.
		return n, false
	}
	s.alarmed = true
	if top != nil {
		for i, c := range s.top {
			top[i] = c.key
		}
	}
	return n, true
}

// credit counts one new name for client in s.top, kept most first: a
// client not there takes the last one's place and count (space-saving),
// so a client that sent many names is there whatever came between.
func (s *tunnelSketch) credit(client string) {
	i := 0
	for ; i < tunnelTop && s.top[i].key != client; i++ {
	}
	if i == tunnelTop {
		i = tunnelTop - 1
		s.top[i].key = client
	}
	s.top[i].n++
	for ; i > 0 && s.top[i].n > s.top[i-1].n; i-- {
		s.top[i], s.top[i-1] = s.top[i-1], s.top[i]
	}
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
