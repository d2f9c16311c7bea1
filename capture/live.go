package capture

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/afpacket"
	"github.com/gopacket/gopacket/layers"
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

// pollTimeout bounds how long Run waits for a packet before it checks its
// context and ends idle flows.
const pollTimeout = 100 * time.Millisecond

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
		afpacket.OptPollTimeout(pollTimeout),
		afpacket.TPacketVersion3,
	)
	if err != nil {
		return fmt.Errorf("capture: open %s: %w", c.cfg.Interface, err)
	}
	c.handle = tpacket{h}
	return nil
}

// Run captures on Config.Interface until ctx is done, then ends every open
// flow (emitting their events) and returns nil. Errors opening or reading
// the socket are returned.
func (c *Capture) Run(ctx context.Context) error {
	if err := c.Open(); err != nil {
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
	for {
		if ctx.Err() != nil || c.isClosed() {
			c.updateDrops(h)
			p.flush("shutdown")
			return nil
		}
		data, ci, err := h.ZeroCopyReadPacketData()
		now := time.Now()
		switch {
		case err == nil:
			p.packet(data, ci.Timestamp, layers.LinkTypeEthernet)
		case errors.Is(err, afpacket.ErrTimeout), errors.Is(err, afpacket.ErrPoll):
			// No packet: let packet time advance so idle flows end.
			if now.After(p.now) {
				p.now = now
			}
			if p.now.After(p.nextSweep) {
				p.sweep()
				p.nextSweep = p.now.Add(sweepInterval)
			}
		default:
			p.flush("shutdown")
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
