package capture

import (
	"context"
	"errors"
	"fmt"
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

// Open opens the AF_PACKET socket on Config.Interface. Run calls it when it
// was not called before; calling it first lets a caller open the socket in
// another network namespace (a socket belongs to the namespace of the
// thread that made it) or fail early. It needs CAP_NET_RAW.
func (c *Capture) Open() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return errors.New("capture: closed")
	}
	if c.handle != nil {
		return nil
	}
	if c.cfg.Interface == "" {
		return errors.New("capture: no interface configured")
	}
	if c.cfg.OwnAddrs == nil {
		own, err := netutil.HostAddrs()
		if err != nil {
			c.log.Warn("capture: cannot list the gateway's own addresses: flows to them are recorded as egress", audit.LogError, err.Error())
		}
		c.proc.setOwn(own)
	}
	const frame = 1 << 16
	const block = frame * 32
	blocks := c.cfg.RingMB << 20 / block
	if blocks < 1 {
		blocks = 1
	}
	h, err := afpacket.NewTPacket(
		afpacket.OptInterface(c.cfg.Interface),
		afpacket.OptFrameSize(frame),
		afpacket.OptBlockSize(block),
		afpacket.OptNumBlocks(blocks),
		afpacket.OptPollTimeout(0), // never wait in poll(2): Run waits on a timer
		afpacket.TPacketVersion3,
	)
	if err != nil {
		return fmt.Errorf("capture: open %s: %w", c.cfg.Interface, err)
	}
	if !c.cfg.FullFrames {
		if err := h.SetBPF(snapFilter); err != nil {
			h.Close()
			return fmt.Errorf("capture: snap filter on %s: %w", c.cfg.Interface, err)
		}
	}
	c.handle = tpacket{h}
	return nil
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
//     IPv6 with extension headers; non-IP; frames with in-band VLAN tags):
//     whole.
var snapFilter = mustAssemble([]bpf.Instruction{
	/* 0 */ bpf.LoadAbsolute{Off: 12, Size: 2}, // EtherType
	/* 1 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: 0x0800, SkipFalse: 11}, // IPv4, else 13
	/* 2 */ bpf.LoadAbsolute{Off: 23, Size: 1}, // IPv4 protocol
	/* 3 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: 6, SkipFalse: 20}, // TCP, else full (24)
	/* 4 */ bpf.LoadAbsolute{Off: 20, Size: 2}, // flags and fragment offset
	/* 5 */ bpf.JumpIf{Cond: bpf.JumpBitsSet, Val: 0x3fff, SkipTrue: 18}, // a fragment: full
	/* 6 */ bpf.LoadMemShift{Off: 14}, // X = IPv4 header length
	/* 7 */ bpf.LoadIndirect{Off: 14, Size: 2}, // TCP source port
	/* 8 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: 53, SkipTrue: 15}, // DNS: full
	/* 9 */ bpf.LoadIndirect{Off: 16, Size: 2}, // TCP destination port
	/* 10 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: 53, SkipTrue: 13}, // DNS: full
	/* 11 */ bpf.LoadExtension{Num: bpf.ExtType},
	/* 12 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: 4, SkipTrue: 9, SkipFalse: 10}, // PACKET_OUTGOING: 22, else 23
	/* 13 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: 0x86dd, SkipFalse: 10}, // IPv6, else full (24)
	/* 14 */ bpf.LoadAbsolute{Off: 20, Size: 1}, // IPv6 next header
	/* 15 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: 6, SkipFalse: 8}, // TCP, else full (24)
	/* 16 */ bpf.LoadAbsolute{Off: 54, Size: 2}, // TCP source port
	/* 17 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: 53, SkipTrue: 6}, // DNS: full
	/* 18 */ bpf.LoadAbsolute{Off: 56, Size: 2}, // TCP destination port
	/* 19 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: 53, SkipTrue: 4}, // DNS: full
	/* 20 */ bpf.LoadExtension{Num: bpf.ExtType},
	/* 21 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: 4, SkipFalse: 1}, // PACKET_OUTGOING: 22, else 23
	/* 22 */ bpf.RetConstant{Val: snapHeaders},
	/* 23 */ bpf.RetConstant{Val: snapClient},
	/* 24 */ bpf.RetConstant{Val: snapFull},
})

func mustAssemble(prog []bpf.Instruction) []bpf.RawInstruction {
	raw, err := bpf.Assemble(prog)
	if err != nil {
		panic(err)
	}
	return raw
}

// Run captures on Config.Interface until ctx is done, then ends every open
// flow (emitting their events) and returns nil. Errors opening or reading
// the socket are returned.
func (c *Capture) Run(ctx context.Context) error {
	if err := c.Open(); err != nil {
		c.proc.dropPending() // no packet goroutine: cuts go on as reported
		return err
	}
	c.mu.Lock()
	if c.running {
		c.mu.Unlock()
		return errors.New("capture: already running")
	}
	c.running = true
	h := c.handle
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		c.running = false
		h.Close()
		c.handle = nil
		c.mu.Unlock()
	}()
	p := c.proc
	p.openReport = c.cfg.ReportOpenAfter
	defer func() { p.openReport = 0 }()
	c.log.Info("capture started", "interface", c.cfg.Interface)
	nextStats := time.Now()
	wait := minRingWait
	timer := time.NewTimer(wait)
	defer timer.Stop()
	for {
		if ctx.Err() != nil || c.isClosed() {
			c.updateDrops(h)
			p.applyPending(time.Time{})
			p.flush("shutdown")
			p.dropPending()
			return nil
		}
		data, ci, err := h.ZeroCopyReadPacketData()
		now := time.Now()
		switch {
		case err == nil:
			p.packetLen(data, ci.Length, ci.Timestamp, layers.LinkTypeEthernet)
			wait = minRingWait
		case errors.Is(err, afpacket.ErrTimeout), errors.Is(err, afpacket.ErrPoll):
			// No packet: let packet time advance so idle flows end.
			if now.After(p.now) {
				p.now = now
			}
			p.applyPending(now.Add(-ringLag))
			if p.now.After(p.nextSweep) {
				p.sweep()
				p.nextSweep = p.now.Add(sweepInterval)
			}
			timer.Reset(wait)
			select {
			case <-ctx.Done():
			case <-timer.C:
			}
			wait = min(2*wait, maxRingWait)
		default:
			p.flush("shutdown")
			p.dropPending()
			return fmt.Errorf("capture: read %s: %w", c.cfg.Interface, err)
		}
		if now.After(nextStats) {
			c.updateDrops(h)
			nextStats = now.Add(time.Second)
		}
	}
}

func (c *Capture) isClosed() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closed
}

func (c *Capture) updateDrops(h packetSource) {
	if d, err := h.KernelDrops(); err == nil {
		c.kernelDrops.Store(d)
	}
}
