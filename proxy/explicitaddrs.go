package proxy

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/http"
	"slices"
	"time"

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
//
// An explicit listener whose accept fails for good (anything but the
// errors waited out on the same listener, netutil.AcceptRetry's: out
// of file descriptors, memory or socket buffers; the kernel aborted the
// listening socket, say) is closed and opened again on the same address,
// reopenFirst later, doubling with each failure in a row up to
// reopenLongest (keepExplicit), each reopening counted
// (egress_proxy_listener_reopens_total). ExplicitDown names those closed
// meanwhile, and ExplicitChanges wakes its reader on each change, so
// that egressd run's /readyz follows.

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
		if rl := p.retryLns[ln]; rl != nil {
			_ = rl.Close() // ln's too, and an accept's pause ends
		} else {
			_ = ln.Close()
		}
		p.log.Info("proxy: explicit proxy: stopped listening on "+a, "addr", a)
	}
	for a := range p.explicitFailed {
		if !slices.Contains(addrs, a) {
			delete(p.explicitFailed, a) // logged again if given again and failing
		}
	}
	for a, down := range p.explicitDown {
		if !slices.Contains(addrs, a) {
			delete(p.explicitDown, a)
			close(down.gone) // its keepExplicit gives up now
			p.log.Info("proxy: explicit proxy: stopped listening on "+a, "addr", a)
			p.explicitChanged()
		}
	}
	var errs []error
	for _, a := range addrs {
		if _, ok := p.explicitLns[a]; ok {
			continue
		}
		if _, ok := p.explicitDown[a]; ok {
			continue // keepExplicit opens it again
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
		go p.keepExplicit(a, ln)
	}
	return errors.Join(errs...)
}

const (
	// reopenFirst is how long keepExplicit waits before it opens a
	// listener that failed to accept again; it doubles with each failure
	// in a row up to reopenLongest. A listener that served for
	// reopenLongest starts over at reopenFirst.
	reopenFirst   = time.Second
	reopenLongest = time.Minute
)

// downListener is an explicit listener that failed to accept, closed
// until keepExplicit opens it again: why (the accept's error, then the
// last failure to open it again); gone is closed when SetExplicitAddrs
// no longer gives its address, which ends keepExplicit's wait.
type downListener struct {
	err  error
	gone chan struct{}
}

// keepExplicit serves ln, the explicit listener opened for addr, until
// the proxy closes it or SetExplicitAddrs does; when its accept fails,
// it closes ln and opens addr again after a wait (reopenFirst, doubling
// up to reopenMax), logging each failure, while the address is still
// given, and serves the new listener.
func (p *Proxy) keepExplicit(addr string, ln net.Listener) {
	var delay time.Duration
	for {
		start := time.Now()
		err := p.ServeExplicit(ln)
		if p.afterServe != nil {
			p.afterServe()
		}
		if err == nil || errors.Is(err, net.ErrClosed) || p.isClosed() {
			return
		}
		if time.Since(start) >= p.reopenMax {
			delay = 0 // it served long enough: start over
		}
		delay = min(max(2*delay, p.reopenBase), p.reopenMax)
		down := &downListener{err: err, gone: make(chan struct{})}
		p.explicitMu.Lock()
		if p.explicitLns[addr] != ln {
			// SetExplicitAddrs retired it after ServeExplicit looked
			// (retiredExplicit): its mark is forgotten here, or it would
			// stay in the map for good.
			delete(p.retired, ln)
			p.explicitMu.Unlock()
			_ = ln.Close()
			return
		}
		delete(p.explicitLns, addr)
		p.explicitDown[addr] = down
		p.forgetListener(ln)
		_ = ln.Close()
		p.explicitMu.Unlock()
		p.log.Warn("proxy: explicit proxy: accept on "+addr+" failed; its listener is closed and opened again in "+delay.String(), "addr", addr, audit.LogError, err.Error())
		p.explicitChanged()
		if ln = p.reopenExplicit(addr, down, delay); ln == nil {
			return
		}
	}
}

// reopenExplicit opens addr again for keepExplicit, after delay, then
// (each failure logged) after a delay doubled each time up to
// reopenMax; it returns the new listener, or nil once the proxy is
// closed or the address no longer down (SetExplicitAddrs no longer
// gives it).
func (p *Proxy) reopenExplicit(addr string, down *downListener, delay time.Duration) net.Listener {
	t := time.NewTimer(delay)
	defer t.Stop()
	for {
		select {
		case <-p.done:
			return nil
		case <-down.gone:
			return nil
		case <-t.C:
		}
		p.explicitMu.Lock()
		if p.explicitDown[addr] != down || p.isClosed() {
			p.explicitMu.Unlock()
			return nil
		}
		listen := p.relisten
		if listen == nil {
			listen = func(a string) (net.Listener, error) { return p.listenExplicit(context.Background(), a) }
		}
		ln, err := listen(addr)
		if err != nil {
			down.err = err
			p.explicitMu.Unlock()
			delay = min(2*delay, p.reopenMax)
			p.log.Warn("proxy: explicit proxy: cannot open "+addr+" again; tried again in "+delay.String(), "addr", addr, audit.LogError, err.Error())
			t.Reset(delay)
			continue
		}
		delete(p.explicitDown, addr)
		p.explicitLns[addr] = ln
		p.explicitMu.Unlock()
		p.met.reopens.Inc()
		p.log.Info("proxy: explicit proxy: listening on "+addr, "addr", addr)
		p.explicitChanged()
		return ln
	}
}

// ExplicitDown returns, for each explicit listener that failed to accept
// and is not open again yet, why ("ADDR: error"), by address; none when
// every one is open.
func (p *Proxy) ExplicitDown() []error {
	p.explicitMu.Lock()
	defer p.explicitMu.Unlock()
	var out []error
	for _, a := range slices.Sorted(maps.Keys(p.explicitDown)) {
		out = append(out, fmt.Errorf("%s: %w", a, p.explicitDown[a].err))
	}
	return out
}

// ExplicitChanges wakes its reader when an explicit listener fails to
// accept, or is opened again (ExplicitDown changed).
func (p *Proxy) ExplicitChanges() <-chan struct{} { return p.explicitChanges }

func (p *Proxy) explicitChanged() {
	select {
	case p.explicitChanges <- struct{}{}:
	default:
	}
}

// isClosed reports whether Close has been called.
func (p *Proxy) isClosed() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
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
