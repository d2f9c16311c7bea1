package capture

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"github.com/gopacket/gopacket/pcapgo"
)

// packetReader is what pcapgo's readers have in common.
type packetReader interface {
	ZeroCopyReadPacketData() ([]byte, gopacket.CaptureInfo, error)
	LinkType() layers.LinkType
}

// countingReader counts bytes read, for the progress callback.
type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

// ReadFile runs the capture pipeline over a pcap or pcapng file (the
// format is detected) and emits one event per flow, then ends every flow
// still open at the end of the file. progress, when not nil, is called now
// and then with the bytes read so far and the file size. It needs no
// privileges. It stops early, with ctx's error, when ctx is done.
func (c *Capture) ReadFile(ctx context.Context, path string, progress func(done, total int64)) (Stats, error) {
	f, err := os.Open(path)
	if err != nil {
		return c.Stats(), fmt.Errorf("capture: %w", err)
	}
	defer f.Close()
	var total int64
	if fi, err := f.Stat(); err == nil {
		total = fi.Size()
	}
	cr := &countingReader{r: f}
	br := bufio.NewReaderSize(cr, 1<<20)
	magic, err := br.Peek(4)
	if err != nil {
		return c.Stats(), fmt.Errorf("capture: %s: not a capture file: %w", path, err)
	}
	var pr packetReader
	if magic[0] == 0x0a && magic[1] == 0x0d && magic[2] == 0x0d && magic[3] == 0x0a {
		r, err := pcapgo.NewNgReader(br, pcapgo.DefaultNgReaderOptions)
		if err != nil {
			return c.Stats(), fmt.Errorf("capture: %s: %w", path, err)
		}
		pr = r
	} else {
		r, err := pcapgo.NewReader(br)
		if err != nil {
			return c.Stats(), fmt.Errorf("capture: %s: %w", path, err)
		}
		pr = r
	}
	p := c.proc
	// The audit answers what the policy would do now, as the report and
	// policy check say of expired rules, however old the capture: rules
	// expire at the time of the audit, not of the packets.
	p.decideAt = time.Now()
	defer func() { p.decideAt = time.Time{} }()
	link := pr.LinkType()
	for i := 0; ; i++ {
		if i&0xfff == 0 {
			if err := ctx.Err(); err != nil {
				p.flush("end-of-capture")
				return c.Stats(), err
			}
			if progress != nil {
				progress(cr.n-int64(br.Buffered()), total)
			}
		}
		data, ci, err := pr.ZeroCopyReadPacketData()
		if err != nil {
			p.flush("end-of-capture")
			if progress != nil {
				progress(total, total)
			}
			if errors.Is(err, io.EOF) {
				return c.Stats(), nil
			}
			if errors.Is(err, io.ErrUnexpectedEOF) {
				// A truncated file: what was read is still reported.
				return c.Stats(), fmt.Errorf("capture: %s: truncated: %w", path, err)
			}
			return c.Stats(), fmt.Errorf("capture: %s: %w", path, err)
		}
		// An NgReader may switch interfaces (and link types) per packet.
		if ci.InterfaceIndex >= 0 {
			if ng, ok := pr.(*pcapgo.NgReader); ok {
				if intf, err := ng.Interface(ci.InterfaceIndex); err == nil {
					link = intf.LinkType
				}
			}
		}
		p.packetLen(data, ci.Length, ci.Timestamp, link)
	}
}
