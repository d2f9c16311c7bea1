package main

import (
	"fmt"
	"net"
	"slices"
	"strings"

	"egressd/audit"
	"egressd/policy"
)

// wanDrop says which of egressd's listening sockets drop what arrives on
// the WAN interface: a classic BPF socket filter on each
// (netutil.DropFromInterface), in every mode, with nothing installed in
// nftables (THREATS.md: never an open resolver, nor an open proxy, on the
// WAN side). Whatever address a WAN-side host sends to (the WAN address,
// or the LAN one routed over the WAN link), the forwarder gives it no
// answer and the proxies no handshake.
type wanDrop struct {
	dnsUDP, dnsTCP, transparent, explicit bool
	// open are the --wan-open ports that keep a listener reachable from
	// the WAN side, such as "53/udp": the operator asked for them.
	open []string
}

// wanDropFor is every listener, but those whose port --wan-open lists;
// none when there is no WAN side apart from the LAN (one interface for
// both: the forwarder must answer there). explicit is the first explicit
// listen address: every other one has its port.
func wanDropFor(lans []string, wan string, wanOpen []policy.PortRange, dnsListen []string, transparent, explicit string) wanDrop {
	if wan == "" || slices.Contains(lans, wan) {
		return wanDrop{}
	}
	w := wanDrop{dnsUDP: true, dnsTCP: true, transparent: transparent != "", explicit: explicit != ""}
	keep := func(addr string, proto policy.Proto) bool {
		p := listenPort(addr)
		if p == 0 || !portListed(wanOpen, p, proto) {
			return true
		}
		s := fmt.Sprintf("%d/%s", p, proto)
		for _, o := range w.open {
			if o == s {
				return false
			}
		}
		w.open = append(w.open, s)
		return false
	}
	for _, a := range dnsListen {
		w.dnsUDP = keep(a, policy.UDP) && w.dnsUDP
		w.dnsTCP = keep(a, policy.TCP) && w.dnsTCP
	}
	if w.transparent {
		w.transparent = keep(transparent, policy.TCP)
	}
	if w.explicit {
		w.explicit = keep(explicit, policy.TCP)
	}
	return w
}

func (w wanDrop) any() bool { return w.dnsUDP || w.dnsTCP || w.transparent || w.explicit }

// listening is w without the listeners that are not listening (dns: the
// forwarder; transparent: the transparent proxy; explicit: an explicit
// listener at least), for the start-up line: it names what drops, not
// what would have.
func (w wanDrop) listening(dns, transparent, explicit bool) wanDrop {
	w.dnsUDP, w.dnsTCP = w.dnsUDP && dns, w.dnsTCP && dns
	w.transparent = w.transparent && transparent
	w.explicit = w.explicit && explicit
	return w
}

// dns and proxy are the indexes the forwarder's and the proxy's sockets
// drop, for the WAN interface's index idx.
func (w wanDrop) dns(idx int) (udp, tcp int) { return on(w.dnsUDP, idx), on(w.dnsTCP, idx) }
func (w wanDrop) proxy(idx int) (transparent, explicit int) {
	return on(w.transparent, idx), on(w.explicit, idx)
}

func on(b bool, idx int) int {
	if b {
		return idx
	}
	return 0
}

// portListed reports whether ranges hold port/proto.
func portListed(ranges []policy.PortRange, port uint16, proto policy.Proto) bool {
	for _, r := range ranges {
		if r.Proto == proto && r.Lo <= port && port <= r.Hi {
			return true
		}
	}
	return false
}

// wanIndex is the index the filters drop for the interface wan: 0 when
// it does not exist (yet: followWAN attaches the filters when it appears;
// until then nothing arrives on it) or is loopback (filtering it would
// cut the gateway's own queries; auditWANExposure warns).
func wanIndex(wan string) (idx int, loopback bool) {
	i, err := net.InterfaceByName(wan)
	if err != nil {
		return 0, false
	}
	if i.Flags&net.FlagLoopback != 0 {
		return 0, true
	}
	return i.Index, false
}

// followWAN returns the check (watchLinks calls it) that gives the
// filters the WAN interface's new index when it changes: the interface
// came up after egressd started, or went and came back with another
// index (a PPP link re-made, a bridge re-created). The filter holds an
// index, not a name: without this, a re-made WAN interface would reach
// every listener. An interface that goes away keeps its old index in
// the filters, harmless: nothing arrives on it.
func (d *daemon) followWAN(wan string, idx int, apply func(idx int) error) func() {
	return func() {
		now, _ := wanIndex(wan)
		if now == 0 || now == idx {
			return
		}
		if err := apply(now); err != nil {
			d.log.Error("wan: could not give the listeners' socket filters the WAN interface's new index", "wan", wan, "ifindex", now, audit.LogError, err.Error())
			return
		}
		d.log.Info("wan: the WAN interface has a new index: the listeners drop what arrives on it", "wan", wan, "ifindex", now, "was", idx)
		idx = now
	}
}

// wanDropSay is the start-up line that says what the filters drop.
func wanDropSay(wan string, w wanDrop, idx int, loopback bool) string {
	var drop []string
	for _, x := range []struct {
		on   bool
		what string
	}{{w.dnsUDP && w.dnsTCP, "the DNS forwarder"}, {w.dnsUDP && !w.dnsTCP, "the DNS forwarder's UDP"}, {!w.dnsUDP && w.dnsTCP, "the DNS forwarder's TCP"},
		{w.transparent, "the transparent proxy"}, {w.explicit, "the explicit proxy"}} {
		if x.on {
			drop = append(drop, x.what)
		}
	}
	open := ""
	if len(w.open) > 0 {
		open = fmt.Sprintf("; --wan-open %s stays reachable from it", strings.Join(w.open, ","))
	}
	switch {
	case loopback:
		return fmt.Sprintf("wan: %s is a loopback interface: no listener drops what arrives on it", wan)
	case len(drop) == 0:
		return fmt.Sprintf("wan: no listener drops what arrives on %s%s", wan, open)
	case idx == 0:
		return fmt.Sprintf("wan: %s does not exist (yet): %s will drop what arrives on it once it appears (socket filter)%s", wan, strings.Join(drop, ", "), open)
	}
	verb := "drop"
	if len(drop) == 1 {
		verb = "drops"
	}
	return fmt.Sprintf("wan: %s %s what arrives on %s (socket filter)%s", strings.Join(drop, ", "), verb, wan, open)
}

// isClosed reports whether ch is closed (a part's Ready, say).
func isClosed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}
