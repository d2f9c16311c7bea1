package capture

import (
	"net/netip"
	"sync"
	"time"
)

// proxied are the connections the transparent proxy said it accepted
// (ProxyAccepted) before capture first reported them, each until capture
// does (proxiedLine), and the connections capture reported, with their
// line, before the proxy said it accepted them (lined), each until the
// proxy does: whichever of the two comes second leaves the line to the
// other, so a connection has one line whichever comes first (the proxy
// accepts a connection from its queue, which under a burst can be long
// after capture saw its client's reset). Each is kept at most proxiedTTL:
// a connection one of them never saw (capture's packets lost, a
// handshake the proxy never accepted) must not stay. At most proxiedMax
// of each are kept; past it (once expired ones made room, at most once a
// second) a word is dropped, and that connection has the proxy's line
// beside capture's.
type proxied struct {
	mu     sync.Mutex
	m      map[flowKey]time.Time // the proxy's word, before capture's report
	lined  map[flowKey]time.Time // capture's line, before the proxy's word
	pruned time.Time
}

const (
	// proxiedTTL: capture reports a TCP connection at its end or, if it
	// lasts, within about a minute of its start, so a note is read well
	// within it.
	proxiedTTL = 5 * time.Minute
	proxiedMax = 1 << 16
)

// ProxyAccepted notes that the transparent proxy accepted a connection
// from client to dest (its original destination), and so writes its
// decision line and event: capture's report of the connection is then an
// event only, whatever redirected it there (egressd's firewall, or an
// operator's own under --no-firewall, which Config.ProxyLines cannot
// know of). It reports true where capture reported the connection
// already, with its line: then the proxy writes the event only. The
// proxy accepts a connection after its handshake, before its first
// bytes; capture reads its ring in blocks, and reports a connection at
// its end or a minute in, so the note comes first, unless the proxy's
// accept queue is long and the client ends the connection first.
//
// client and dest are without a zone, as capture keys a connection from
// its packets: the proxy tells a link-local client's address as its
// event has it (audit.ClientAddr drops the zone its socket gives), and
// an original destination as the kernel gives it (no scope).
//
// ended says whether the client had ended the connection (a reset, a
// FIN) when the proxy took it from its queue; it is asked only where
// capture lined the connection's 4-tuple (a system call in the proxy). Capture reports a connection at its
// end, so its line before the proxy's word is of an ended one: a record
// of it matches only an ended connection. One the client still holds is a
// new connection of the same 4-tuple (a new SYN, within proxiedTTL of one
// the proxy never accepted, its handshake's end dropped on a full accept
// queue): the record is the earlier's, and is dropped.
func (c *Capture) ProxyAccepted(client, dest netip.AddrPort, ended func() bool) (lined bool) {
	k := makeKey(client.Addr().Unmap(), client.Port(), dest.Addr().Unmap(), dest.Port(), 6)
	s := &c.proxied
	s.mu.Lock()
	defer s.mu.Unlock()
	if at, ok := s.lined[k]; ok {
		delete(s.lined, k)
		if time.Since(at) <= proxiedTTL && ended() {
			return true
		}
	}
	s.m = s.put(s.m, k)
	return false
}

// put adds k to m (made if nil), unless m is full of words younger than
// proxiedTTL; s.mu held.
func (s *proxied) put(m map[flowKey]time.Time, k flowKey) map[flowKey]time.Time {
	now := time.Now()
	if m == nil {
		m = make(map[flowKey]time.Time)
	}
	if len(m) >= proxiedMax && now.Sub(s.pruned) >= time.Second {
		s.pruned = now
		for _, mm := range []map[flowKey]time.Time{s.m, s.lined} {
			for k, at := range mm {
				if now.Sub(at) > proxiedTTL {
					delete(mm, k)
				}
			}
		}
	}
	if len(m) < proxiedMax {
		m[k] = now
	}
	return m
}

// take reports whether the proxy noted the connection of k, and forgets
// the note. Else, if mayBe (the connection may yet be one the proxy
// accepts: capture writes its line now), it keeps that capture wrote k's
// line, for ProxyAccepted.
func (s *proxied) take(k flowKey, mayBe bool) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	at, ok := s.m[k]
	if ok {
		delete(s.m, k)
		if time.Since(at) <= proxiedTTL {
			return true
		}
	}
	if mayBe {
		s.lined = s.put(s.lined, k)
	}
	return false
}
