package capture

import (
	"net/netip"
	"sync"
	"time"
)

// proxied are the connections the transparent proxy said it accepted
// (ProxyAccepted), each until capture first reports it (proxiedLine) or
// for proxiedTTL: a connection capture never saw (its packets lost) must
// not stay. At most proxiedMax are kept; past it (once expired ones made
// room, at most once a second) a note is dropped, and that connection
// keeps capture's line beside the proxy's.
type proxied struct {
	mu     sync.Mutex
	m      map[flowKey]time.Time
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
// know of). The proxy accepts a connection after its handshake, before
// its first bytes; capture reads its ring in blocks, and reports a
// connection at its end or a minute in, so the note comes first.
func (c *Capture) ProxyAccepted(client, dest netip.AddrPort) {
	k := makeKey(client.Addr().Unmap(), client.Port(), dest.Addr().Unmap(), dest.Port(), 6)
	now := time.Now()
	s := &c.proxied
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.m == nil {
		s.m = make(map[flowKey]time.Time)
	}
	if len(s.m) >= proxiedMax && now.Sub(s.pruned) >= time.Second {
		s.pruned = now
		for k, at := range s.m {
			if now.Sub(at) > proxiedTTL {
				delete(s.m, k)
			}
		}
	}
	if len(s.m) < proxiedMax {
		s.m[k] = now
	}
}

// take reports whether the proxy noted the connection of k, and forgets
// the note.
func (s *proxied) take(k flowKey) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	at, ok := s.m[k]
	if ok {
		delete(s.m, k)
	}
	return ok && time.Since(at) <= proxiedTTL
}
