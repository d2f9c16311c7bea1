package e2e

import (
	"bytes"
	"net"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// TestH2CPathRule: HTTP/2 with prior knowledge to notion.so, which only
// the seed's host/path rule vendor-docs (notion.so/nirovision/*) allows,
// shows no HTTP/1 path to check: enforce mode refuses it (path-unseen)
// instead of splicing it by the DNS-learned name, and capture in audit
// mode reports the same would-be refusal (THREATS.md C6).
func TestH2CPathRule(t *testing.T) {
	for _, mode := range []string{"enforce", "audit"} {
		t.Run(mode, func(t *testing.T) {
			tp := newTopo(t)
			d := newDaemon(t, tp, mode)
			d.start()
			tp.dig(t, notionName, "A")
			c, err := tp.dialTCP(t.Context(), net.JoinHostPort(notionIP, "443"))
			if err != nil {
				t.Fatal(err)
			}
			port := c.LocalAddr().(*net.TCPAddr).Port
			c.SetDeadline(time.Now().Add(5 * time.Second))
			var b bytes.Buffer
			b.WriteString(http2.ClientPreface)
			fr := http2.NewFramer(&b, nil)
			fr.WriteSettings()
			var hb bytes.Buffer
			enc := hpack.NewEncoder(&hb)
			for _, f := range [][2]string{{":method", "GET"}, {":scheme", "http"}, {":authority", notionName}, {":path", "/someone-else/page"}} {
				enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
			}
			fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: hb.Bytes(), EndStream: true, EndHeaders: true})
			c.Write(b.Bytes())
			buf := make([]byte, 512)
			c.Read(buf) // the origin speaks TLS: whatever comes back, the verdict is the point
			c.Close()
			source := "proxy"
			if mode == "audit" {
				source = "capture"
			}
			ev := d.waitEvent(t, source+"'s record of the h2c connection", func(e flowEvent) bool {
				return e.Kind == "flow" && e.Source == source && e.ClientPort == port && e.Dest == notionIP
			})
			if ev.Verdict != "deny" || ev.Reason != "path-unseen" || ev.Name != notionName || ev.Enforced != (mode == "enforce") {
				t.Errorf("%s mode: %v; want a deny of %s, path-unseen", mode, ev, notionName)
			}
		})
	}
}
