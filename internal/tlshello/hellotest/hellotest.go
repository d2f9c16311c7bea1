// Package hellotest crafts TLS ClientHellos for the tests of
// internal/tlshello, the proxy and capture: a Go client's real hello,
// hand-built hellos with chosen extensions, and re-recorded ones. Only
// tests import it.
package hellotest

import (
	"crypto/tls"
	"encoding/binary"
	"io"
	"net"
	"testing"
	"time"
)

// GoHello returns the ClientHello record a Go client sends for serverName
// (cfg nil: a default configuration).
func GoHello(t testing.TB, serverName string, cfg *tls.Config) []byte {
	t.Helper()
	c1, c2 := net.Pipe()
	defer c1.Close()
	defer c2.Close()
	if cfg == nil {
		cfg = &tls.Config{}
	}
	cfg.ServerName = serverName
	go tls.Client(c1, cfg).Handshake()
	c2.SetReadDeadline(time.Now().Add(5 * time.Second))
	var hdr [5]byte
	if _, err := io.ReadFull(c2, hdr[:]); err != nil {
		t.Fatal(err)
	}
	body := make([]byte, int(hdr[3])<<8|int(hdr[4]))
	if _, err := io.ReadFull(c2, body); err != nil {
		t.Fatal(err)
	}
	return append(hdr[:], body...)
}

// Ext is one extension: type, length, body.
func Ext(typ uint16, body []byte) []byte {
	b := binary.BigEndian.AppendUint16(nil, typ)
	b = binary.BigEndian.AppendUint16(b, uint16(len(body)))
	return append(b, body...)
}

// SNIExt is one server_name extension with a host_name entry per name.
func SNIExt(names ...string) []byte {
	var list []byte
	for _, n := range names {
		list = append(list, 0)
		list = binary.BigEndian.AppendUint16(list, uint16(len(n)))
		list = append(list, n...)
	}
	return Ext(0x0000, append(binary.BigEndian.AppendUint16(nil, uint16(len(list))), list...))
}

// ECHOuterExt is a well-formed outer encrypted_client_hello extension
// (type outer, HKDF-SHA256, AES-128-GCM, config id, enc, payload).
func ECHOuterExt() []byte {
	b := []byte{0x00, 0x00, 0x01, 0x00, 0x01, 0x2a}
	b = binary.BigEndian.AppendUint16(b, 32)
	b = append(b, make([]byte, 32)...)
	b = binary.BigEndian.AppendUint16(b, 144)
	b = append(b, make([]byte, 144)...)
	return Ext(0xfe0d, b)
}

// Build builds a TLS 1.3 ClientHello record with the given extra
// extensions first (then supported_versions, groups, key_share, sigalgs).
func Build(extra ...[]byte) []byte {
	var body []byte
	body = append(body, 0x03, 0x03)
	body = append(body, make([]byte, 32)...) // random
	body = append(body, 32)
	body = append(body, make([]byte, 32)...) // session id
	body = append(body, 0x00, 0x04, 0x13, 0x01, 0xc0, 0x2f)
	body = append(body, 0x01, 0x00)
	var exts []byte
	for _, e := range extra {
		exts = append(exts, e...)
	}
	exts = append(exts, Ext(0x002b, []byte{0x02, 0x03, 0x04})...)
	exts = append(exts, Ext(0x000a, []byte{0x00, 0x02, 0x00, 0x1d})...)
	ks := []byte{0x00, 0x24, 0x00, 0x1d, 0x00, 0x20}
	ks = append(ks, make([]byte, 32)...)
	exts = append(exts, Ext(0x0033, ks)...)
	exts = append(exts, Ext(0x000d, []byte{0x00, 0x04, 0x04, 0x03, 0x08, 0x04})...)
	body = binary.BigEndian.AppendUint16(body, uint16(len(exts)))
	body = append(body, exts...)
	hs := []byte{0x01, byte(len(body) >> 16), byte(len(body) >> 8), byte(len(body))}
	hs = append(hs, body...)
	rec := []byte{0x16, 0x03, 0x01}
	rec = binary.BigEndian.AppendUint16(rec, uint16(len(hs)))
	return append(rec, hs...)
}

// Refragment re-records the TLS records of b into records of at most n
// payload bytes each; bytes after the last whole record stay as they are.
func Refragment(b []byte, n int) []byte {
	var out []byte
	for len(b) >= 5 {
		l := int(binary.BigEndian.Uint16(b[3:5]))
		if len(b) < 5+l {
			break
		}
		typ, ver, payload := b[0], b[1:3], b[5:5+l]
		for len(payload) > 0 {
			k := min(n, len(payload))
			out = append(out, typ, ver[0], ver[1], 0, 0)
			binary.BigEndian.PutUint16(out[len(out)-2:], uint16(k))
			out = append(out, payload[:k]...)
			payload = payload[k:]
		}
		b = b[5+l:]
	}
	return append(out, b...)
}
