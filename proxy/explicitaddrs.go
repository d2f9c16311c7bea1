package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"slices"

	"egressd/audit"
)

// The explicit listeners follow the LAN's addresses.
//
// egressd run lets the explicit proxy listen on port 3128 of each LAN
// interface's address. Those change while it runs (an address given to a
// LAN interface after the start, a renumbered LAN, a new delegated IPv6
// prefix): SetExplicitAddrs opens a listener on each address it is given
// that has none, and closes those it is not given any more, the ones Run
// opened too. A new listener gets the WAN interface's socket filter as the
// others (listenExplicit, SetDropFrom). Of the connections a closed
// listener accepted, a request under way finishes (retireServer) and a
// tunnel goes on.

// errNotReady is SetExplicitAddrs's answer before Run has opened its
// listeners.
var errNotReady = errors.New("proxy: not listening yet")

// SetExplicitAddrs makes the explicit listeners those of addrs: it opens
// one on each address that has none, and closes the others. It logs one
// line for each listener opened or closed (proxy: explicit proxy:
// listening on ADDR; stopped listening on ADDR), and one for an address
// that does not open (once, until it opens or is no longer given). It returns errNotReady
// before Run has opened the configured listeners, net.ErrClosed once the
// proxy is closed; else the addresses that did not open, which the next
// call tries again (an IPv6 address is not bound to until the kernel's
// duplicate address detection is done).
func (p *Proxy) SetExplicitAddrs(addrs []string) error {
	select {
	case <-p.ready:
	default:
		return errNotReady
	}
	p.explicitMu.Lock()
	defer p.explicitMu.Unlock()
	select {
	case <-p.done:
		return net.ErrClosed
	default:
	}
	for a, ln := range p.explicitLns {
		if slices.Contains(addrs, a) {
			continue
		}
		delete(p.explicitLns, a)
		p.retired[ln] = true
		p.forgetListener(ln)
		_ = ln.Close()
		p.log.Info("proxy: explicit proxy: stopped listening on "+a, "addr", a)
	}
	for a := range p.explicitFailed {
		if !slices.Contains(addrs, a) {
			delete(p.explicitFailed, a) // logged again if given again and failing
		}
	}
	var errs []error
	for _, a := range addrs {
		if _, ok := p.explicitLns[a]; ok {
			continue
		}
		ln, err := p.listenExplicit(context.Background(), a)
		if err != nil {
			err = fmt.Errorf("proxy: explicit listener %s: %w", a, err)
			if !p.explicitFailed[a] {
				p.explicitFailed[a] = true
				p.log.Warn("proxy: explicit proxy: cannot listen on "+a+" (tried again on the next address change)", "addr", a, audit.LogError, err.Error())
			}
			errs = append(errs, err)
			continue
		}
		delete(p.explicitFailed, a)
		p.explicitLns[a] = ln
		p.log.Info("proxy: explicit proxy: listening on "+a, "addr", a)
		go func() {
			if err := p.ServeExplicit(ln); err != nil {
				p.log.Warn("proxy: explicit proxy: stopped listening on "+a, "addr", a, audit.LogError, err.Error())
			}
		}()
	}
	return errors.Join(errs...)
}

// retiredExplicit reports whether SetExplicitAddrs closed ln, and forgets
// it.
func (p *Proxy) retiredExplicit(ln net.Listener) bool {
	p.explicitMu.Lock()
	defer p.explicitMu.Unlock()
	retired := p.retired[ln]
	delete(p.retired, ln)
	return retired
}

// retireServer lets the connections srv, the server of a listener
// SetExplicitAddrs closed, accepted finish their request (up to its idle
// timeout), then closes them and forgets srv. Tunnels (CONNECT, taken
// over from the server) go on: the proxy's Close closes them.
func (p *Proxy) retireServer(srv *http.Server) {
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), srv.IdleTimeout)
		_ = srv.Shutdown(ctx)
		cancel()
		_ = srv.Close()
		p.mu.Lock()
		delete(p.servers, srv)
		p.mu.Unlock()
	}()
}

// forgetListener takes ln off the listeners SetDropFrom gives the filter.
func (p *Proxy) forgetListener(ln net.Listener) {
	p.dropMu.Lock()
	defer p.dropMu.Unlock()
	p.opened = slices.DeleteFunc(p.opened, func(o openedListener) bool { return o.ln == ln })
}
