package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"egressd/audit"
)

// linkRecheck is how often watchLinks calls its checks besides the
// netlink notices (which a full socket buffer may lose).
const linkRecheck = 30 * time.Second

// watchLinks follows interfaces by name and the gateway's addresses: it
// calls each of checks at once, then on every link change (netlink,
// RTMGRP_LINK: an interface made, deleted, up, down, renamed) or address
// change (RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR: an address added or
// removed), and every linkRecheck besides, until ctx is done. The checks
// are what holds an interface's index where the operator gave a name (the
// WAN interface's socket filters: followWAN; capture's sockets on the LAN
// interfaces: Capture.Follow) and what holds the gateway's addresses (the
// proxies' and capture's own addresses: addrFollower; the explicit
// listeners on the LAN addresses). They run in this goroutine, one after
// the other, each cheap when nothing changed. A send on one of wakes
// (capture's Changes: a socket failed, or is due to be opened again)
// calls them too.
func (d *daemon) watchLinks(ctx context.Context, checks []func(), wakes ...<-chan struct{}) {
	wake := make(chan struct{}, 1)
	if err := linkNotices(ctx, wake); err != nil {
		d.log.Warn("links: no netlink link and address notices; the WAN interface's index, capture's LAN interfaces and the gateway's addresses are checked every "+linkRecheck.String(), audit.LogError, err.Error())
	}
	for _, w := range wakes {
		go func() {
			for {
				select {
				case <-ctx.Done():
					return
				case <-w:
					select {
					case wake <- struct{}{}:
					default:
					}
				}
			}
		}()
	}
	t := time.NewTicker(linkRecheck)
	defer t.Stop()
	for {
		for _, check := range checks {
			check()
		}
		select {
		case <-ctx.Done():
			return
		case <-wake:
		case <-t.C:
		}
	}
}

// linkNotices sends on wake (without blocking) for every netlink message
// of the link and the address groups until ctx is done.
func linkNotices(ctx context.Context, wake chan<- struct{}) error {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, unix.NETLINK_ROUTE)
	if err != nil {
		return fmt.Errorf("netlink: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK, Groups: unix.RTMGRP_LINK | unix.RTMGRP_IPV4_IFADDR | unix.RTMGRP_IPV6_IFADDR}); err != nil {
		_ = unix.Close(fd)
		return fmt.Errorf("netlink: %w", err)
	}
	f := os.NewFile(uintptr(fd), "netlink-link") // non-blocking: read through the netpoller, so Close ends the read
	go func() {
		<-ctx.Done()
		_ = f.Close()
	}()
	go func() {
		buf := make([]byte, 32<<10)
		for {
			_, err := f.Read(buf)
			if err != nil && (ctx.Err() != nil || errors.Is(err, os.ErrClosed)) {
				return
			}
			// ENOBUFS (notices lost) wakes too: the checks are by name.
			select {
			case wake <- struct{}{}:
			default:
			}
		}
	}()
	return nil
}
