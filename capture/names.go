package capture

import (
	"net"
	"net/netip"
	"sync"
	"time"

	"egressd/policy"
)

// DNSFacts is what capture asks egressd's DNS forwarder. NamesFor: the
// names it gave addr out for to client (client zero means any client),
// most recent first, or else to another address of the client's device,
// as the proxy is told (egressd run: Devices). Given: every client it
// gave addr out to, with the name, unexpired: what the firewall's learned
// sets were fed from (a set is per rule and admits every client the rule
// covers, whoever asked).
// cmd/ passes dnsfilter's learned-address table; nil means none. Both must
// be safe for concurrent use and must not block.
type DNSFacts interface {
	NamesFor(client, addr netip.Addr) []string
	Given(addr netip.Addr) []DNSGrant
}

// Devices tells whether two LAN addresses are one device's (egressd run:
// the LAN interface's neighbour table, netutil.Devices): a dual-stack
// device asks DNS from one and connects from another. It must be safe for
// concurrent use; it may wait briefly for the kernel, so capture asks only
// when an answer to the address itself did not do.
type Devices interface {
	SameDevice(a, b netip.Addr) bool
}

// ClientMACs tells a LAN client's MAC as egressd's proxy and DNS
// forwarder see it (egressd run: the LAN interfaces' neighbour tables,
// netutil.Devices.MAC): nil for a client behind a router, whose frames
// carry the router's MAC, which the proxy and the forwarder never see. It
// must be safe for concurrent use; it may wait briefly for the kernel, so
// capture asks only while the policy names MAC addresses, once per flow.
type ClientMACs interface {
	ClientMAC(client netip.Addr) net.HardwareAddr
}

// DNSGrant is one answer of egressd's DNS forwarder: Client was given an
// address for Name (normalised). Since, when set, is when the firewall
// began to hold the address for it: a flow whose first packet came
// before was not let out by it (enforce mode dropped it), and capture
// does not credit it to the answer. Zero: held since before any flow.
type DNSGrant struct {
	Client netip.Addr
	Name   string
	Since  time.Time
}

// learned is capture's own table of names learned from DNS answers seen on
// the wire: address -> the names asked for it, with the client that asked.
// It is bounded: when full, an arbitrary entry is dropped and counted.
type learned struct {
	mu      sync.Mutex // guards following
	m       map[netip.Addr]*learnedEntry
	byName  map[string]*nameAnswer // names seen answered: the addresses given
	max     int
	evicted uint64
}

type learnedEntry struct {
	names [4]learnedName // most recent first
	n     int
}

type learnedName struct {
	name    string
	client  netip.Addr
	expires time.Time // after minLearnedTTL
	// fwExpires is when the firewall would let the address go had
	// egressd's forwarder given this answer: policy.LearnedLifetime of
	// its TTL.
	fwExpires time.Time
	// seen is when the answer was first seen, or again after the
	// firewall's hold (fwExpires) of an earlier one had ended: a flow
	// whose first packet came before it was not let out by it.
	seen time.Time
}

// nameAnswer is what answers for one name gave out, to any client: the
// most recent maxNameAddrs addresses. It is kept apart from the table by
// address, whose few names per address a shared (CDN) address overflows.
type nameAnswer struct {
	addrs []learnedAddr // oldest first
}

type learnedAddr struct {
	addr    netip.Addr
	expires time.Time
}

// maxNameAddrs bounds the addresses kept per name: an answer of a
// round-robin or CDN name holds up to eight or so.
const maxNameAddrs = 8

// minLearnedTTL keeps names longer than short DNS TTLs: clients reuse
// addresses well after the record expired, and an offline audit replays
// captures whose flows follow their lookups by minutes.
const minLearnedTTL = 30 * time.Minute

func newLearned(max int) *learned {
	return &learned{m: make(map[netip.Addr]*learnedEntry), byName: make(map[string]*nameAnswer), max: max}
}

// add records that client was told name for addr at now, valid for ttl.
func (l *learned) add(client, addr netip.Addr, name string, now time.Time, ttl time.Duration) {
	// The firewall's default minimum: egressd run does not change it.
	fwExp := now.Add(policy.LearnedLifetime(ttl, 0))
	if ttl < minLearnedTTL {
		ttl = minLearnedTTL
	}
	addr = addr.Unmap()
	l.mu.Lock()
	defer l.mu.Unlock()
	e := l.m[addr]
	if e == nil {
		if len(l.m) >= l.max {
			for k := range l.m {
				delete(l.m, k)
				l.evicted++
				break
			}
		}
		e = &learnedEntry{}
		l.m[addr] = e
	}
	na := l.byName[name]
	if na == nil {
		if len(l.byName) >= l.max {
			for k := range l.byName {
				delete(l.byName, k)
				break
			}
		}
		na = &nameAnswer{}
		l.byName[name] = na
	}
	na.add(addr, now.Add(ttl))
	// Move or insert name at the front.
	nn := learnedName{name: name, client: client, expires: now.Add(ttl), fwExpires: fwExp, seen: now}
	j := 0
	for ; j < e.n; j++ {
		if e.names[j].name == name && e.names[j].client == client {
			break
		}
	}
	if j == e.n {
		if e.n < len(e.names) {
			e.n++
		}
		j = e.n - 1
	} else {
		// The firewall never shortens an address's time in its set.
		nn.fwExpires = maxTime(nn.fwExpires, e.names[j].fwExpires)
		if !now.After(e.names[j].fwExpires) {
			nn.seen = e.names[j].seen // the same hold
		}
	}
	copy(e.names[1:j+1], e.names[:j])
	e.names[0] = nn
}

// namesFor returns the live names for addr, those learned by client first.
func (l *learned) namesFor(client, addr netip.Addr, now time.Time, out []string) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	e := l.m[addr.Unmap()]
	if e == nil {
		return out
	}
	for pass := 0; pass < 2; pass++ {
		for _, n := range e.names[:e.n] {
			if now.After(n.expires) {
				continue
			}
			if (n.client == client) == (pass == 0) && !contains(out, n.name) {
				out = append(out, n.name)
			}
		}
	}
	return out
}

// given appends to out the answers that gave addr out, with the client
// that asked, live at now: seen by last (a flow's last packet so far: one
// seen after it let none of the flow out), and until their TTL as the
// firewall keeps them (fw), or else as long as namesFor keeps them.
func (l *learned) given(addr netip.Addr, now, last time.Time, fw bool, out []DNSGrant) []DNSGrant {
	l.mu.Lock()
	defer l.mu.Unlock()
	e := l.m[addr.Unmap()]
	if e == nil {
		return out
	}
	for _, n := range e.names[:e.n] {
		exp := n.expires
		if fw {
			exp = n.fwExpires
		}
		if !now.After(exp) && !n.seen.After(last) {
			out = append(out, DNSGrant{Client: n.client, Name: n.name})
		}
	}
	return out
}

// add records that an answer gave addr out for the name until expires.
func (na *nameAnswer) add(addr netip.Addr, expires time.Time) {
	for i, a := range na.addrs {
		if a.addr == addr {
			na.addrs = append(na.addrs[:i], na.addrs[i+1:]...)
			break
		}
	}
	if len(na.addrs) >= maxNameAddrs {
		na.addrs = append(na.addrs[:0], na.addrs[1:]...)
	}
	na.addrs = append(na.addrs, learnedAddr{addr, expires})
}

// answered reports whether a live answer for name was seen (resolved),
// and whether one gave out addr (gave).
func (l *learned) answered(name string, addr netip.Addr, now time.Time) (resolved, gave bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	na := l.byName[name]
	if na == nil {
		return false, false
	}
	addr = addr.Unmap()
	for _, a := range na.addrs {
		if now.After(a.expires) {
			continue
		}
		resolved = true
		if a.addr == addr {
			gave = true
		}
	}
	return resolved, gave
}

func (l *learned) len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.m)
}

func contains(s []string, v string) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

func maxTime(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}
