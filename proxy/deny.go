package proxy

import (
	"bytes"
	"fmt"
	"html"
	"net"
	"net/http"
	"path/filepath"
	"strconv"
	"strings"

	"egressd/audit"
)

// tlsAlertAccessDenied is a fatal access_denied(49) alert in a TLS 1.2
// record, which every TLS client version accepts before a ServerHello.
var tlsAlertAccessDenied = []byte{0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x31}

// denyPage renders the 403 body. The host and path a client sent are cut
// as the event log cuts them (audit.Clip: a name to 255 bytes, a path to
// 2 KiB), so that the page neither echoes 64 KiB back nor shows another
// value than the log; the template (html/template) escapes them, and so
// does the plain page used when the operator's template fails. The policy
// is named (policyName), not given as the file's path on the gateway: any
// LAN client may read the page.
func (p *Proxy) denyPage(info DenyInfo) []byte {
	info.Host = audit.Clip(info.Host, audit.MaxNameBytes)
	info.Path = audit.Clip(info.Path, audit.MaxPathBytes)
	if info.Policy == "" {
		if eng := p.deps.Policy.Load(); eng != nil && eng.Policy() != nil {
			info.Policy = policyName(eng.Policy().File)
		}
	}
	var b bytes.Buffer
	if err := p.deny.Execute(&b, info); err != nil {
		b.Reset()
		fmt.Fprintf(&b, "Blocked by egressd: %s (%s)\n", html.EscapeString(info.Host), html.EscapeString(info.Reason))
	}
	return b.Bytes()
}

// policyName is what the deny page calls the policy: a profile's name
// (profile:NAME), else the file's base name without .yaml or .yml.
func policyName(file string) string {
	if name, ok := strings.CutPrefix(file, "profile:"); ok {
		return name
	}
	name := filepath.Base(file)
	for _, ext := range []string{".yaml", ".yml"} {
		if n, ok := strings.CutSuffix(name, ext); ok && n != "" {
			return n
		}
	}
	return name
}

// writeHTTPDeny writes a complete 403 response with the deny page.
func (p *Proxy) writeHTTPDeny(c net.Conn, info DenyInfo) {
	c.Write(p.httpDeny(info))
}

// httpDeny is the complete 403 response with the deny page.
func (p *Proxy) httpDeny(info DenyInfo) []byte {
	body := p.denyPage(info)
	var b bytes.Buffer
	b.WriteString("HTTP/1.1 403 Forbidden\r\nContent-Type: text/html; charset=utf-8\r\nCache-Control: no-store\r\nConnection: close\r\nX-Egressd-Reason: ")
	b.WriteString(info.Reason)
	b.WriteString("\r\nContent-Length: ")
	b.WriteString(strconv.Itoa(len(body)))
	b.WriteString("\r\n\r\n")
	b.Write(body)
	return b.Bytes()
}

// denyResponse builds the 403 as an *http.Response for goproxy.
func (p *Proxy) denyResponse(req *http.Request, info DenyInfo) *http.Response {
	body := p.denyPage(info)
	resp := &http.Response{
		StatusCode:    http.StatusForbidden,
		Status:        "403 Forbidden",
		Proto:         "HTTP/1.1",
		ProtoMajor:    1,
		ProtoMinor:    1,
		Header:        http.Header{},
		Body:          nopCloser{bytes.NewReader(body)},
		ContentLength: int64(len(body)),
		Request:       req,
		Close:         true,
	}
	resp.Header.Set("Content-Type", "text/html; charset=utf-8")
	resp.Header.Set("Cache-Control", "no-store")
	resp.Header.Set("X-Egressd-Reason", info.Reason)
	return resp
}

type nopCloser struct{ *bytes.Reader }

func (nopCloser) Close() error { return nil }
