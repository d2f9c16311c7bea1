package capture

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/afpacket"
	"github.com/gopacket/gopacket/layers"
	"golang.org/x/net/bpf"

	"egressd/audit"
	"egressd/internal/netutil"
)

// tpacket is the live AF_PACKET ring (no cgo).
type tpacket struct{ h *afpacket.TPacket }

func (t tpacket) ZeroCopyReadPacketData() ([]byte, gopacket.CaptureInfo, error) {
	return t.h.ZeroCopyReadPacketData()
}

func (t tpacket) KernelDrops() (uint64, error) {
	_, v3, err := t.h.SocketStats()
	if err != nil {
		return 0, err
	}
	return uint64(v3.Drops()), nil
}

func (t tpacket) Close() { t.h.Close() }

// Run looks at the ring without waiting in the kernel: the socket's poll
// timeout is zero, and after a look that finds no packet Run waits on a Go
// timer, which leaves its processor to the other goroutines. A wait in
// poll(2) held the processor until Go's sysmon took it back, and each such
// take set sysmon polling every 20 µs again: in `egressd run`, beside the
// proxy, that cost about 30 µs of CPU per proxied connection and ten
// times the sysmon wakeups (README, "Capture"). The kernel hands packets
// over a block at a time, when the block is full or the block timeout
// (afpacket's default, 64 ms) after its first packet, so looking more
// often gains little: the wait is minRingWait after a look that found
// packets and doubles up to maxRingWait, which also bounds how long Run
// takes to see its context end and to end idle flows.
const (
	minRingWait = 8 * time.Millisecond
	maxRingWait = 100 * time.Millisecond
)

// Open opens an AF_PACKET socket on each of Config.Interfaces. Run calls
// it when it was not called before; calling it first lets a caller open
// the sockets in another network namespace (a socket belongs to the
// namespace of the thread that made it) or fail early. It needs
// CAP_NET_RAW. An interface whose socket does not open (one that does not
// exist yet, say: ErrNoInterface) is left out and named in the error, and
// capture runs on the others (Listening and NotListening say which);
// Follow opens it later. Run fails at once when none opens, unless every
// one left out does not exist: then it waits for Follow.
func (c *Capture) Open() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return errors.New("capture: closed")
	}
	if c.opened || len(c.sources) > 0 {
		return nil
	}
	if len(c.cfg.Interfaces) == 0 {
		return errors.New("capture: no interface configured")
	}
	c.opened = true
	if c.routes == nil {
		// In the namespace of the sockets, as they are (see above).
		r, err := netutil.OpenRouteAsker()
		if err != nil {
			c.log.Warn("capture: cannot ask the routing table: forged LAN sources are not recorded as such", audit.LogError, err.Error())
		}
		c.routes = r
	}
	if c.cfg.OwnAddrs == nil && !c.ownSet {
		own, err := netutil.HostAddrs()
		if err != nil {
			c.log.Warn("capture: cannot list the gateway's own addresses: flows to them are recorded as egress", audit.LogError, err.Error())
		}
		c.proc.setOwn(own)
	}
	var errs []error
	c.ifaces = make([]ifaceState, len(c.cfg.Interfaces))
	c.sources = make([]source, len(c.cfg.Interfaces))
	for i, name := range c.cfg.Interfaces {
		s, st := c.openSource(i, name)
		c.sources[i] = s
		c.ifaces[i] = st
		if st.why != nil {
			errs = append(errs, st.why)
		}
	}
	return errors.Join(errs...)
}

// openSource opens the socket of slot on the interface name, and returns
// it with what capture knows of the interface then: the index the socket
// is bound to (or why there is none) and its link state. The index is
// looked up before the socket is bound: an interface re-made in between
// has a socket on the new one and the old index, which Follow then
// replaces (the other way round, a socket on the old one with the new
// index would stay deaf).
func (c *Capture) openSource(slot int, name string) (source, ifaceState) {
	s := source{name: name, slot: slot}
	ifi, err := net.InterfaceByName(name)
	if err != nil {
		return s, ifaceState{why: noInterface(name)}
	}
	open := c.openRing
	if c.openRingHook != nil {
		open = c.openRingHook
	}
	h, err := open(name)
	if err != nil {
		return s, ifaceState{why: err}
	}
	s.h, s.ifindex = h, ifi.Index
	s.mac, s.hasMAC = macOf(ifi)
	return s, ifaceState{ifindex: ifi.Index, link: linkOf(ifi.Flags), opened: time.Now(), mac: s.mac, hasMAC: s.hasMAC}
}

// macOf is an interface's MAC address, if it has one of 6 bytes.
func macOf(ifi *net.Interface) (mac [6]byte, ok bool) {
	if len(ifi.HardwareAddr) == 6 {
		return [6]byte(ifi.HardwareAddr), true
	}
	return mac, false
}

// setMAC records the new MAC address of slot's interface, if its socket
// is still bound to idx, for Run to take between two packets (a swap
// that keeps the socket), and reports whether it did. A client's frame
// toward a routed address sent to another address is skipped
// (unforwarded): with the old one, every frame after the change would
// be.
func (c *Capture) setMAC(slot, idx int, mac [6]byte, has bool) bool {
	c.mu.Lock()
	if c.closed || !c.opened || c.ifaces[slot].ifindex != idx {
		c.mu.Unlock()
		return false
	}
	c.ifaces[slot].mac, c.ifaces[slot].hasMAC = mac, has
	c.swaps = append(c.swaps, swap{slot: slot, src: source{slot: slot, mac: mac, hasMAC: has}, mac: true})
	c.swapped.Store(true)
	c.mu.Unlock()
	select {
	case c.wake <- struct{}{}:
	default:
	}
	return true
}

// linkOf is the link state (ifaceState.link) of an interface's flags.
// IFF_RUNNING is the kernel's operational state: up with a carrier.
func linkOf(f net.Flags) string {
	switch {
	case f&net.FlagUp == 0:
		return linkDown
	case f&net.FlagRunning == 0:
		return linkNoCarrier
	}
	return ""
}

// Follow looks at each of Config.Interfaces: on one that appeared since
// (it did not exist, or another with the same name has a new index: a
// VLAN re-made, a USB NIC plugged in again) it opens a socket, and closes
// the one bound to the old index; for one that went away it closes the
// socket (an AF_PACKET socket stays bound to the index it was given,
// deaf once the interface is gone). It opens another socket on an
// interface whose socket Run closed because it failed to read, once its
// wait is over (Changes says when). Run takes the new sockets between
// two packets. An interface set down or up, or that lost or regained its
// carrier, keeps its socket (the kernel hooks it in again when the
// interface comes up): Follow notes the change (LinkDown). It logs one
// line for each change (capture: listening on X, capture: X went away,
// capture: X is down, capture: X has no carrier, capture: X is up
// again; a flapping link's fewer: sayLink) and
// reports whether there was one, or a socket Run closed since. The caller calls it on link changes (netlink), on Changes and
// now and then besides; a socket is opened in the network namespace of
// the caller's thread. It does nothing before Open.
func (c *Capture) Follow() bool {
	c.followMu.Lock()
	defer c.followMu.Unlock()
	c.mu.Lock()
	if c.closed || !c.opened {
		c.mu.Unlock()
		return false
	}
	was := slices.Clone(c.ifaces)
	changed := c.failed
	c.failed = false
	c.mu.Unlock()
	now := time.Now()
	for i, name := range c.cfg.Interfaces {
		idx, link := 0, ""
		var mac [6]byte
		hasMAC := false
		if ifi, err := net.InterfaceByName(name); err == nil {
			idx, link = ifi.Index, linkOf(ifi.Flags)
			mac, hasMAC = macOf(ifi)
		}
		if idx != 0 && idx == was[i].ifindex {
			if (mac != was[i].mac || hasMAC != was[i].hasMAC) && c.setMAC(i, idx, mac, hasMAC) {
				c.log.Info("capture: "+name+" has a new MAC address", "interface", name,
					"mac", net.HardwareAddr(mac[:]).String(), "was", net.HardwareAddr(was[i].mac[:]).String())
				changed = true
			}
			if link != was[i].link {
				if !c.setLink(i, idx, link) {
					continue // its socket was replaced meanwhile
				}
				changed = true
			}
			c.sayLink(i, name, idx, was[i].link, link, now)
			continue
		}
		if idx == 0 && errors.Is(was[i].why, ErrNoInterface) {
			continue
		}
		var rf readFailed
		failed := was[i].ifindex == 0 && errors.As(was[i].why, &rf)
		if idx != 0 && failed && now.Before(was[i].retryAt) {
			continue // opened again once its wait is over
		}
		var st ifaceState
		var src source
		if idx == 0 {
			src = source{name: name, slot: i}
			st.why = noInterface(name)
		} else {
			src, st = c.openSource(i, name)
		}
		failed = failed && idx != 0
		if failed {
			st.fails = was[i].fails
			if st.why != nil {
				// Opening failed too: wait longer before the next try.
				st.fails++
				wait := reopenWait(st.fails)
				st.why, st.retryAt = readFailed{name: name, err: st.why}, now.Add(wait)
				time.AfterFunc(wait, c.poke)
			}
		}
		if !failed && st.ifindex == was[i].ifindex && fmt.Sprint(st.why) == fmt.Sprint(was[i].why) {
			if src.h != nil {
				src.h.Close()
			}
			continue
		}
		c.mu.Lock()
		if c.closed || !c.opened { // closed, or Run ended, meanwhile
			c.mu.Unlock()
			if src.h != nil {
				src.h.Close()
			}
			return changed
		}
		c.ifaces[i] = st
		if was[i].ifindex != 0 || src.h != nil {
			c.swaps = append(c.swaps, swap{slot: i, src: src})
			c.swapped.Store(true)
		}
		c.mu.Unlock()
		select {
		case c.wake <- struct{}{}:
		default:
		}
		changed = true
		switch {
		case st.ifindex != 0:
			c.log.Info("capture: listening on "+name, "interface", name, "ifindex", st.ifindex, "was", was[i].ifindex)
		case was[i].ifindex != 0 && errors.Is(st.why, ErrNoInterface):
			c.log.Warn("capture: "+name+" went away", "interface", name, "was", was[i].ifindex)
		default:
			c.log.Warn("capture: not listening on "+name, "interface", name, audit.LogError, st.why.Error())
		}
	}
	return changed
}

// linkSaid is what Follow logged of one interface's link state.
type linkSaid struct {
	ifindex int       // the interface said is of; another: not said yet
	said    string    // the link state the last line told (ifaceState.link)
	from    time.Time // the start of the window lines counts in
	lines   int       // lines in it
	seen    int       // changes seen since the last line
	due     bool      // a poke is set for the window's end
}

// linkLines bounds the lines Follow logs of one interface's link state
// in a window (Capture.linkWindow, linkWindow: a minute): a line per
// change up to it, then none until the window ends, when one line says
// the state then and the changes seen since the last line. Before, each
// change was a line: a flapping carrier filled the log (and journald's
// rate limit then dropped the flows' lines with them).
const (
	linkLines  = 8
	linkWindow = time.Minute
)

// sayLink logs the link state of slot's interface, bound to idx, now
// link (was: at Follow's last look), when it changed since the last line
// and linkLines allows; else Changes asks for Follow once the window
// ends. Follow's goroutine (followMu) only.
func (c *Capture) sayLink(slot int, name string, idx int, was, link string, now time.Time) {
	if len(c.linkSaid) != len(c.cfg.Interfaces) {
		c.linkSaid = make([]linkSaid, len(c.cfg.Interfaces))
	}
	ls := &c.linkSaid[slot]
	if ls.ifindex != idx {
		ls.ifindex, ls.said, ls.seen = idx, was, 0 // a new socket: its state at opening stands
	}
	if link != was {
		ls.seen++
	}
	if now.Sub(ls.from) >= c.linkWindow {
		ls.from, ls.lines, ls.due = now, 0, false
	}
	if link == ls.said && ls.seen == 0 {
		return
	}
	if ls.lines >= linkLines {
		if !ls.due {
			ls.due = true
			time.AfterFunc(ls.from.Add(c.linkWindow).Sub(now), c.poke)
		}
		return
	}
	attrs := []any{"interface", name}
	if ls.seen > 1 || link == ls.said {
		attrs = append(attrs, "changes", ls.seen)
	}
	switch link {
	case linkDown:
		c.log.Warn("capture: "+name+" is down", attrs...)
	case linkNoCarrier:
		c.log.Warn("capture: "+name+" has no carrier", attrs...)
	default:
		if ls.said != link {
			attrs = append(attrs, "was", ls.said)
		}
		c.log.Info("capture: "+name+" is up again", attrs...)
	}
	ls.said, ls.seen = link, 0
	ls.lines++
}

// setLink records the link state of slot's interface, if its socket is
// still bound to idx, and reports whether it did.
func (c *Capture) setLink(slot, idx int, link string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed || !c.opened || c.ifaces[slot].ifindex != idx {
		return false
	}
	c.ifaces[slot].link = link
	return true
}

// How long capture waits before it opens again a socket that failed to
// read: minReopenWait after the first failure, doubling with each
// failure in a row up to maxReopenWait. A socket that read for
// maxReopenWait before it failed starts over.
const (
	minReopenWait = time.Second
	maxReopenWait = time.Minute
)

func reopenWait(fails int) time.Duration {
	d := minReopenWait
	for i := 1; i < fails && d < maxReopenWait; i++ {
		d *= 2
	}
	return min(d, maxReopenWait)
}

// sockFailed is Run's part when s failed to read with err: capture
// closes it (Run drops it from the sockets it reads) and goes on with the
// others; Follow opens another after reopenWait. It counts the failure
// and logs it, once.
func (c *Capture) sockFailed(s source, err error) {
	c.proc.stats.socketErrors.Add(1)
	now := time.Now()
	c.mu.Lock()
	wait := minReopenWait
	if s.slot < len(c.ifaces) && c.ifaces[s.slot].ifindex == s.ifindex {
		// Not when Follow replaced it meanwhile: the new one stands.
		st := &c.ifaces[s.slot]
		if now.Sub(st.opened) >= maxReopenWait {
			st.fails = 0
		}
		st.fails++
		wait = reopenWait(st.fails)
		st.ifindex, st.link, st.why, st.retryAt = 0, "", readFailed{name: s.name, err: err}, now.Add(wait)
		c.failed = true
	}
	c.mu.Unlock()
	c.log.Warn("capture: reading "+s.name+" failed; its socket is closed and opened again in "+wait.String(),
		"interface", s.name, audit.LogError, err.Error())
	c.poke()
	time.AfterFunc(wait, c.poke)
}

// takeSwaps puts the sockets Follow opened or closed into srcs, the open
// ones Run reads, in slot order; heads go with their sockets. A socket
// whose packet is held in heads is replaced only once that packet went
// (its bytes are in the old socket's ring); the swap waits.
func (c *Capture) takeSwaps(srcs []source, heads []head) ([]source, []head) {
	c.mu.Lock()
	defer c.mu.Unlock()
	var keep []swap
	for _, sw := range c.swaps {
		j := slices.IndexFunc(srcs, func(s source) bool { return s.slot == sw.slot })
		if sw.mac {
			if j >= 0 {
				srcs[j].mac, srcs[j].hasMAC = sw.src.mac, sw.src.hasMAC
			}
			continue
		}
		if j >= 0 && heads[j].ok {
			keep = append(keep, sw)
			continue
		}
		if j >= 0 {
			c.retire(srcs[j])
			srcs, heads = slices.Delete(srcs, j, j+1), slices.Delete(heads, j, j+1)
		}
		if sw.src.h == nil {
			continue
		}
		k, _ := slices.BinarySearchFunc(srcs, sw.slot, func(s source, slot int) int { return s.slot - slot })
		srcs, heads = slices.Insert(srcs, k, sw.src), slices.Insert(heads, k, head{})
	}
	c.swaps = keep
	c.swapped.Store(len(keep) > 0)
	c.sources = c.sources[:0]
	for _, s := range srcs {
		c.sources = append(c.sources, s)
	}
	return srcs, heads
}

// retireLocked is retire, taking c.mu.
func (c *Capture) retireLocked(s source) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.retire(s)
}

// retire closes a socket Run read, keeping its kernel drops in the sum.
func (c *Capture) retire(s source) {
	if d, err := s.h.KernelDrops(); err == nil {
		c.retiredDrops += d
	}
	s.h.Close()
}

// dropSwapsLocked closes the sockets Follow opened that Run did not take.
func (c *Capture) dropSwapsLocked() {
	for _, sw := range c.swaps {
		if sw.src.h != nil {
			sw.src.h.Close()
		}
	}
	c.swaps = nil
	c.swapped.Store(false)
}

// openRing opens the AF_PACKET ring on one interface, with the snap
// filter.
func (c *Capture) openRing(name string) (packetSource, error) {
	const frame = 1 << 16
	const block = frame * 32
	blocks := c.cfg.RingMB << 20 / block
	if blocks < 1 {
		blocks = 1
	}
	h, err := afpacket.NewTPacket(
		afpacket.OptInterface(name),
		afpacket.OptFrameSize(frame),
		afpacket.OptBlockSize(block),
		afpacket.OptNumBlocks(blocks),
		afpacket.OptPollTimeout(0), // never wait in poll(2): Run waits on a timer
		afpacket.TPacketVersion3,
	)
	if err != nil {
		return nil, fmt.Errorf("capture: open %s: %w", name, err)
	}
	if !c.cfg.FullFrames {
		if err := h.SetBPF(snapFilter); err != nil {
			h.Close()
			return nil, fmt.Errorf("capture: snap filter on %s: %w", name, err)
		}
	}
	return tpacket{h}, nil
}

// Snap lengths of the capture filter. Capture reads payload only to name
// flows: the client's first bytes (TLS ClientHello, HTTP request head),
// DNS, QUIC Initials. Everything else is counted, not read, so the kernel
// copies only what is needed into the ring and the ring holds many more
// packets (bulk TCP on a LAN interface comes in 20 to 64 KB GRO/GSO
// packets; cut to 256 bytes, a 64 MiB ring holds seconds of traffic at
// 10 Gb/s instead of tens of milliseconds). Flow and packet bytes are
// counted from the length on the wire (proc.packetLen), so reports do not
// change.
const (
	snapHeaders = 256                  // Ethernet, VLAN, IPv6 and TCP headers with options fit
	snapClient  = 16<<10 + snapHeaders // a ClientHello or request head of up to 16 KiB per packet
	snapFull    = 1 << 18              // the whole frame
	// snapMinLen: a frame shorter than this is copied whole without
	// reading its headers, so every load below is inside the frame (the
	// farthest, an IPv4 TCP port behind a 60-byte header: bytes 74-77).
	// A classic BPF load past the end of a frame ends the program with 0:
	// the frame would be dropped unseen, neither read nor counted (a
	// truncated or garbage frame, which capture counts as malformed).
	snapMinLen = 14 + 60 + 4
)

// snapFilter is the classic BPF program of the live socket. Its return
// value is how many bytes of the frame the kernel copies:
//   - TCP sent out of the LAN interface (to the clients: pkt_type
//     PACKET_OUTGOING), except DNS: headers only. Capture never reads a
//     server's TCP payload but DNS over TCP.
//   - TCP arriving from the clients, except DNS: the first 16 KiB of
//     payload of each packet. A ClientHello or HTTP head is read from the
//     first packets of a stream; one larger than 16 KiB in a single GRO
//     packet is cut, and capture then gives up naming that flow (it is
//     decided by address; the proxy reads up to 64 KiB). On a followed
//     plain-HTTP connection the bytes cut off a body are skipped; where
//     they could hold a later head, capture stops following it.
//   - Everything else (UDP, so DNS and QUIC; IP fragments; DNS over TCP;
//     IPv6 with extension headers; non-IP; frames with in-band VLAN tags;
//     frames shorter than snapMinLen): whole.
var snapFilter = mustAssemble([]bpf.Instruction{
	/* 0 */ bpf.LoadExtension{Num: bpf.ExtLen},
	/* 1 */ bpf.JumpIf{Cond: bpf.JumpLessThan, Val: snapMinLen, SkipTrue: 24}, // short: full (26)
	/* 2 */ bpf.LoadAbsolute{Off: 12, Size: 2}, // EtherType
	/* 3 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: 0x0800, SkipFalse: 11}, // IPv4, else 15
	/* 4 */ bpf.LoadAbsolute{Off: 23, Size: 1}, // IPv4 protocol
	/* 5 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: 6, SkipFalse: 20}, // TCP, else full (26)
	/* 6 */ bpf.LoadAbsolute{Off: 20, Size: 2}, // flags and fragment offset
	/* 7 */ bpf.JumpIf{Cond: bpf.JumpBitsSet, Val: 0x3fff, SkipTrue: 18}, // a fragment: full
	/* 8 */ bpf.LoadMemShift{Off: 14}, // X = IPv4 header length
	/* 9 */ bpf.LoadIndirect{Off: 14, Size: 2}, // TCP source port
	/* 10 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: 53, SkipTrue: 15}, // DNS: full
	/* 11 */ bpf.LoadIndirect{Off: 16, Size: 2}, // TCP destination port
	/* 12 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: 53, SkipTrue: 13}, // DNS: full
	/* 13 */ bpf.LoadExtension{Num: bpf.ExtType},
	/* 14 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: 4, SkipTrue: 9, SkipFalse: 10}, // PACKET_OUTGOING: 24, else 25
	/* 15 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: 0x86dd, SkipFalse: 10}, // IPv6, else full (26)
	/* 16 */ bpf.LoadAbsolute{Off: 20, Size: 1}, // IPv6 next header
	/* 17 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: 6, SkipFalse: 8}, // TCP, else full (26)
	/* 18 */ bpf.LoadAbsolute{Off: 54, Size: 2}, // TCP source port
	/* 19 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: 53, SkipTrue: 6}, // DNS: full
	/* 20 */ bpf.LoadAbsolute{Off: 56, Size: 2}, // TCP destination port
	/* 21 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: 53, SkipTrue: 4}, // DNS: full
	/* 22 */ bpf.LoadExtension{Num: bpf.ExtType},
	/* 23 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: 4, SkipFalse: 1}, // PACKET_OUTGOING: 24, else 25
	/* 24 */ bpf.RetConstant{Val: snapHeaders},
	/* 25 */ bpf.RetConstant{Val: snapClient},
	/* 26 */ bpf.RetConstant{Val: snapFull},
})

func mustAssemble(prog []bpf.Instruction) []bpf.RawInstruction {
	raw, err := bpf.Assemble(prog)
	if err != nil {
		panic(err)
	}
	return raw
}

// Run captures on the sockets Open opened, and those Follow opens, until
// ctx is done, then ends every open flow (emitting their events) and
// returns nil. It reads the sockets in turn, a packet from each, in one
// goroutine: the flow table is one. With no socket open (every interface
// does not exist yet, or went away, or its socket failed) it waits for
// Follow. A socket that fails to read is closed and Follow opens another
// (sockFailed); Run reads the others meanwhile. Errors opening the
// sockets (but for interfaces that do not exist) are returned.
func (c *Capture) Run(ctx context.Context) error {
	err := c.Open()
	c.mu.Lock()
	var srcs []source
	for i, s := range c.sources {
		if s.h != nil {
			s.slot = i
			srcs = append(srcs, s)
		}
	}
	if c.closed || len(srcs) == 0 && !c.waitable(err) {
		c.mu.Unlock()
		c.proc.dropPending() // no packet goroutine: cuts go on as reported
		if err == nil {
			err = errors.New("capture: closed")
		}
		return err
	}
	if c.running {
		c.mu.Unlock()
		return errors.New("capture: already running")
	}
	c.running = true
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		c.running = false
		for _, s := range srcs {
			s.h.Close()
		}
		c.sources = nil
		c.closeRoutesLocked()
		c.opened, c.ifaces = false, nil // a later Run opens them again
		c.dropSwapsLocked()
		c.mu.Unlock()
	}()
	p := c.proc
	p.openReport = c.cfg.ReportOpenAfter
	defer func() { p.openReport = 0 }()
	names := make([]string, len(srcs))
	for i, s := range srcs {
		names[i] = s.name
	}
	c.log.Info("capture started", "interface", strings.Join(names, ","))
	p.setSources(srcs)
	nextStats := time.Now()
	wait := minRingWait
	timer := time.NewTimer(wait)
	defer timer.Stop()
	heads := make([]head, len(srcs))
	sinceStats := 0 // packets taken since Run last read the clock
	for {
		if ctx.Err() != nil || c.isClosed() {
			c.updateDrops(srcs)
			p.applyPending(time.Time{})
			p.flush("shutdown")
			p.dropPending()
			return nil
		}
		p.answerOpen()
		if c.swapped.Load() {
			srcs, heads = c.takeSwaps(srcs, heads)
			p.setSources(srcs)
			c.updateDrops(srcs)
		}
		failed := false
		for i := 0; i < len(srcs); i++ {
			if heads[i].ok {
				continue
			}
			data, ci, err := srcs[i].h.ZeroCopyReadPacketData()
			switch {
			case err == nil:
				heads[i] = head{data: data, ci: ci, ok: true}
			case errors.Is(err, afpacket.ErrTimeout), errors.Is(err, afpacket.ErrPoll):
				// ErrPoll: the socket has an error pending, ENETDOWN
				// from when the interface was set down (it stays
				// pending, unread; the kernel hooks the socket in
				// again when the interface is up, and afpacket polls
				// only when the ring has no packet), or went away
				// (Follow replaces the socket).
			default:
				// This socket only: closed, and opened again by
				// Follow; the others are read on.
				c.sockFailed(srcs[i], err)
				c.retireLocked(srcs[i])
				srcs, heads = slices.Delete(srcs, i, i+1), slices.Delete(heads, i, i+1)
				i--
				failed = true
			}
		}
		if failed {
			c.mu.Lock()
			c.sources = append(c.sources[:0], srcs...)
			c.mu.Unlock()
			p.setSources(srcs)
			continue
		}
		// The clock is read where it is needed: to order the heads of
		// several sockets, when no packet goes in, and every
		// statsEvery packets for the drop counter (a packet's own time
		// is its kernel stamp: ci.Timestamp).
		var now time.Time
		if len(heads) > 1 {
			now = time.Now()
		}
		if i, hold := p.nextHead(heads, now); i >= 0 {
			p.src = srcs[i].slot + 1
			p.livePacket(heads[i].data, heads[i].ci)
			heads[i] = head{}
			wait = minRingWait
			if sinceStats++; sinceStats >= statsEvery && now.IsZero() {
				now = time.Now()
			}
		} else {
			if now.IsZero() {
				now = time.Now()
			}
			// No packet, or none that may go before what another
			// socket has not handed over yet: let packet time advance
			// so idle flows end, but only to ringLag before the clock.
			// A ring that looks empty may still hold, in a block the
			// kernel has not handed over (up to its timeout), packets
			// it stamped before the look; packet time never goes back,
			// so one stamped before it would start or go on in its flow
			// at that later time. A packet held for another socket is
			// younger than mergeLag (ringLag): it comes after the
			// horizon too.
			horizon := now.Add(-ringLag)
			if horizon.After(p.now) {
				p.now = horizon
			}
			p.applyPending(now.Add(-ringLag))
			if p.now.After(p.nextSweep) {
				p.sweep()
				p.nextSweep = p.now.Add(sweepInterval)
			}
			d := wait
			switch {
			case len(srcs) == 0:
				// Nothing to read until Follow opens a socket
				// (wake): only idle flows to end, and Revoke's queue.
				d = min(sweepInterval, ringLag)
			case hold > 0:
				d = min(d, max(mergeLag-hold, time.Millisecond))
			}
			timer.Reset(d)
			select {
			case <-ctx.Done():
			case <-timer.C:
			case <-c.wake: // Follow opened or closed a socket
				timer.Stop() // Go 1.23 timers: no stale tick after Stop
			}
			wait = min(2*wait, maxRingWait)
		}
		if !now.IsZero() {
			sinceStats = 0
			if now.After(nextStats) {
				c.updateDrops(srcs)
				nextStats = now.Add(time.Second)
			}
		}
	}
}

// statsEvery is how many packets in a row Run takes before it reads the
// clock to see whether the kernel's drop counter is due (every second):
// at a million packets a second, a tenth of a millisecond late.
const statsEvery = 128

// livePacket runs one frame of a live socket through the pipeline. A
// frame the kernel found tagged for a VLAN (802.1Q or 802.1ad, VLAN ID
// not 0), whose tag it took off into the socket's auxdata, is no traffic
// of the socket's interface: the kernel hands it to the interface's VLAN
// device of that ID (eth1.10 on eth1), whose own socket sees it again
// untagged when --lan names the device, and drops it where there is none
// (a trunk given to --lan whole, a VLAN the gateway does not serve); a
// frame a VLAN device sends goes out of the interface under its tag the
// same way. Such a frame is counted (Stats.OtherVLAN) and skipped, so no
// flow is recorded that the gateway never forwarded, nor one counted
// twice. A priority tag (VLAN ID 0, 802.1p) is the interface's own: the
// kernel takes it off and goes on, and so does capture (otherVLAN: but
// not where it holds a VLAN's tag).
func (p *proc) livePacket(data []byte, ci gopacket.CaptureInfo) {
	if otherVLAN(data, ci.AncillaryData) {
		p.stats.packets.Add(1)
		p.stats.otherVLAN.Add(1)
		return
	}
	p.packetLen(data, ci.Length, ci.Timestamp, layers.LinkTypeEthernet)
}

// otherVLAN reports whether a live socket's Ethernet frame is tagged for
// a VLAN ID not 0: in its auxdata (the outer tag, which the kernel takes
// off a frame it receives) or, where that is a priority tag (VLAN ID 0),
// in-line behind it. The kernel takes a priority tag off and judges the
// frame by the tag it holds, if any (net/core/dev.c,
// __netif_receive_skb_core: check_vlan_id); the socket sees that inner
// tag in-line. An in-line tag with no auxdata is left to the decoder, as
// before: a VLAN device made with reorder_hdr off hands its own frames to
// its sockets with their tag in-line.
func otherVLAN(data []byte, anc []any) bool {
	priority := false
	for _, a := range anc {
		if v, ok := a.(afpacket.AncillaryVLAN); ok {
			if v.VLAN != 0 {
				return true
			}
			priority = true
		}
	}
	if !priority {
		return false
	}
	// At most a few tags: every one read is 4 bytes of the frame.
	for off := 12; off+4 <= len(data) && off < 12+4*8; off += 4 {
		switch binary.BigEndian.Uint16(data[off:]) {
		case uint16(layers.EthernetTypeDot1Q), uint16(layers.EthernetTypeQinQ):
			if binary.BigEndian.Uint16(data[off+2:])&0xfff != 0 {
				return true
			}
		default:
			return false
		}
	}
	return false
}

// waitable reports whether Run, with no socket open, waits for Follow:
// Open failed only for interfaces that do not exist (yet).
func (c *Capture) waitable(openErr error) bool {
	if !c.opened {
		return false
	}
	for _, st := range c.ifaces {
		if st.ifindex == 0 && !errors.Is(st.why, ErrNoInterface) {
			return false
		}
	}
	return true
}

// head is the next packet of one socket, read but not yet taken by the
// pipeline (its bytes stay valid until the socket is read again).
type head struct {
	data []byte
	ci   gopacket.CaptureInfo
	ok   bool
}

// mergeLag is how long a packet of one socket waits for the others when
// they have handed over nothing: the kernel hands a socket's packets over
// a block at a time, when the block is full or, at the latest, about two
// block timeouts (afpacket's default, 64 ms) after its first packet, so
// a packet another socket took before this one is handed over within
// that time. It is the wait of Revoke's queue (reload.go) for the same
// reason: an operation queued before a held packet is applied before it.
const mergeLag = ringLag

// nextHead picks the socket whose packet goes into the pipeline next:
// with several sockets, packets go in in the order of their time stamps,
// so that of the two copies of a packet forwarded from one LAN interface
// to another, the one that came in (from its client, with the client's
// MAC address) goes first and its flow is counted on that interface. The
// earliest head goes when every socket has one, or when it is mergeLag
// old (the others have nothing before it), or stamped after now (the
// clock was set back). At equal times a frame the
// gateway did not send goes first. It returns -1 when none may go yet,
// and then how old the earliest head is (0: there is none).
func (p *proc) nextHead(heads []head, now time.Time) (int, time.Duration) {
	best, all := -1, true
	for i := range heads {
		if !heads[i].ok {
			all = false
			continue
		}
		if best < 0 || p.before(&heads[i], &heads[best]) {
			best = i
		}
	}
	if best < 0 {
		return -1, 0
	}
	if all || len(heads) == 1 {
		return best, 0
	}
	age := now.Sub(heads[best].ci.Timestamp)
	if age >= mergeLag || age < 0 {
		// A stamp after now: the wall clock was set back since the
		// kernel took it. Waiting for the clock to catch up would hold
		// this socket's ring as long as the step; the order of the
		// packets around the step is lost anyway.
		return best, 0
	}
	return -1, max(age, time.Nanosecond)
}

// before orders two heads by time stamp, a frame from a client before
// one the gateway sent at the same time.
func (p *proc) before(a, b *head) bool {
	if c := a.ci.Timestamp.Compare(b.ci.Timestamp); c != 0 {
		return c < 0
	}
	return !p.fromGateway(a.data) && p.fromGateway(b.data)
}

// fromGateway reports whether a frame's source MAC address is one of the
// capture interfaces'.
func (p *proc) fromGateway(frame []byte) bool {
	return len(frame) >= 12 && p.gatewayMAC(frame[6:12])
}

// isClosed reports whether Close was called. Run asks between two
// packets: an atomic, not mu (which Follow and the metrics take).
func (c *Capture) isClosed() bool {
	return c.isShut.Load()
}

// updateDrops sums the kernel's drops on the sockets, and those of the
// sockets closed before.
func (c *Capture) updateDrops(srcs []source) {
	c.mu.Lock()
	sum := c.retiredDrops
	c.mu.Unlock()
	for _, s := range srcs {
		d, err := s.h.KernelDrops()
		if err != nil {
			return
		}
		sum += d
	}
	c.kernelDrops.Store(sum)
}
