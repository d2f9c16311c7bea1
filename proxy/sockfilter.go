package proxy

import (
	"errors"
	"fmt"
	"net"
	"syscall"

	"egressd/internal/netutil"
)

// SetDropFrom changes the interfaces whose packets the transparent and the
// explicit listener drop (Config.DropTransparentFrom, DropExplicitFrom),
// on the listeners Run opened and those it opens later: egressd run calls
// it when the WAN interface comes back with another index (a PPP link
// re-made). Zero takes a filter off. Connections already accepted keep
// the filter they had.
func (p *Proxy) SetDropFrom(transparent, explicit int) error {
	if transparent < 0 || explicit < 0 {
		return fmt.Errorf("proxy: interface index %d, %d: negative", transparent, explicit)
	}
	p.dropMu.Lock()
	defer p.dropMu.Unlock()
	p.dropFrom = [2]int{transparent, explicit}
	var errs []error
	for _, o := range p.opened {
		errs = append(errs, netutil.DropFromConn(o.ln, p.dropFrom[o.kind]))
	}
	return errors.Join(errs...)
}

// openedListener is a listener Run opened: kind 0 transparent, 1
// explicit (its index in dropFrom).
type openedListener struct {
	kind int
	ln   net.Listener
}

// dropFromNow is the index listener i (0 transparent, 1 explicit) is to
// drop, for its Control.
func (p *Proxy) dropFromNow(i int) int {
	p.dropMu.Lock()
	defer p.dropMu.Unlock()
	return p.dropFrom[i]
}

// opensListener records listener i, opened with the filter for index
// drop, and gives it the current one if SetDropFrom changed it meanwhile.
// On failure it closes ln.
func (p *Proxy) opensListener(i int, ln net.Listener, drop int) error {
	p.dropMu.Lock()
	defer p.dropMu.Unlock()
	p.opened = append(p.opened, openedListener{i, ln})
	if p.dropFrom[i] == drop {
		return nil
	}
	if err := netutil.DropFromConn(ln, p.dropFrom[i]); err != nil {
		_ = ln.Close()
		return err
	}
	return nil
}

// dropControl attaches the filter in a ListenConfig's Control (none for
// index 0).
func dropControl(rc syscall.RawConn, ifindex int) error {
	if ifindex == 0 {
		return nil
	}
	if err := netutil.DropFromInterface(rc, ifindex); err != nil {
		return fmt.Errorf("proxy: %w", err)
	}
	return nil
}
