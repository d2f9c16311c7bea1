package httpwire

import (
	"errors"
	"runtime"
	"strings"
	"testing"
)

func TestParseHead(t *testing.T) {
	for _, c := range []struct {
		name, in   string
		err        error
		host, path string
	}{
		{"origin", "GET /a?b HTTP/1.1\r\nHost: Example.com:8080\r\n\r\n", nil, "Example.com", "/a?b"},
		{"absolute", "GET http://example.com/x HTTP/1.1\r\nHost: example.com\r\n\r\n", nil, "example.com", "/x"},
		{"absolute-no-host", "GET http://example.com HTTP/1.0\r\n\r\n", nil, "example.com", "/"},
		{"absolute-disagrees", "GET http://evil.test/ HTTP/1.1\r\nHost: allowed.test\r\n\r\n", ErrHostMismatch, "", ""},
		{"absolute-port-disagrees", "GET http://a.test:81/ HTTP/1.1\r\nHost: a.test:80\r\n\r\n", ErrHostMismatch, "", ""},
		{"two-hosts", "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", ErrHeadMalformed, "", ""},
		{"userinfo-host", "GET / HTTP/1.1\r\nHost: allowed.test@evil.test\r\n\r\n", ErrHeadMalformed, "", ""},
		{"space-host", "GET / HTTP/1.1\r\nHost: a b\r\n\r\n", ErrHeadMalformed, "", ""},
		{"obs-fold", "GET / HTTP/1.1\r\nHost: a\r\n b\r\n\r\n", ErrHeadMalformed, "", ""},
		{"bare-lf", "GET / HTTP/1.1\nHost: a\n\n", ErrHeadMalformed, "", ""},
		{"cl-and-te", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", ErrHeadFraming, "", ""},
		{"two-cl", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", ErrHeadFraming, "", ""},
		{"http2-version", "GET / HTTP/2.0\r\nHost: a\r\n\r\n", ErrHeadMalformed, "", ""},
		{"connect-form", "CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n", ErrHeadMalformed, "", ""},
		{"other-scheme", "GET https://a.test/ HTTP/1.1\r\n\r\n", ErrHeadMalformed, "", ""},
		{"ipv6-host", "GET / HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n\r\n", nil, "2001:db8::1", "/"},
		{"ipv6-unbracketed", "GET / HTTP/1.1\r\nHost: 2001:db8::1\r\n\r\n", ErrHeadMalformed, "", ""},
		{"bad-port", "GET / HTTP/1.1\r\nHost: a:007\r\n\r\n", ErrHeadMalformed, "", ""},
		// Smokescreen's hostport cases (THREATS.md D2).
		{"bracketed-name", "GET / HTTP/1.1\r\nHost: [a.test]\r\n\r\n", ErrHeadMalformed, "", ""},
		{"double-bracketed-name", "GET / HTTP/1.1\r\nHost: [[a.test]]:1337\r\n\r\n", ErrHeadMalformed, "", ""},
		{"negative-port", "GET / HTTP/1.1\r\nHost: a.test:-12\r\n\r\n", ErrHeadMalformed, "", ""},
		{"port-out-of-range", "GET / HTTP/1.1\r\nHost: a.test:91337\r\n\r\n", ErrHeadMalformed, "", ""},
		{"named-port", "GET / HTTP/1.1\r\nHost: a.test:https\r\n\r\n", ErrHeadMalformed, "", ""},
		{"empty-port", "GET / HTTP/1.1\r\nHost: a.test:\r\n\r\n", ErrHeadMalformed, "", ""},
		{"bracketed-absolute", "GET http://[a.test]/ HTTP/1.1\r\n\r\n", ErrHeadMalformed, "", ""},
		// Transfer-Encoding variants (C6).
		{"te-trailing-comma", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked,\r\n\r\n", ErrHeadFraming, "", ""},
		{"te-list", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity, chunked\r\n\r\n", ErrHeadFraming, "", ""},
		{"te-twice", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", ErrHeadFraming, "", ""},
		{"te-http10", "POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", ErrHeadFraming, "", ""},
		{"cl-list", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 3\r\n\r\n", ErrHeadFraming, "", ""},
		{"cl-sign", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\n", ErrHeadFraming, "", ""},
		{"space-before-colon-te", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n", ErrHeadMalformed, "", ""},
		{"incomplete", "GET / HTTP/1.1\r\nHost: a\r\n", ErrHeadIncomplete, "", ""},
		{"options-star", "OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", nil, "a", "*"},
		// A '#' is kept: the path after it is what some origins read
		// (policy.PlainPath refuses it).
		{"fragment", "GET /a/#/../b HTTP/1.1\r\nHost: a\r\n\r\n", nil, "a", "/a/#/../b"},
		{"absolute-fragment", "GET http://a#/../b HTTP/1.1\r\nHost: a\r\n\r\n", nil, "a", "/#/../b"},
		{"non-ascii-host", "0 / HTTP/1.0\r\nHost:\x89\r\n\r\n", ErrHeadMalformed, "", ""}, // found by FuzzParseHead
		{"ctl-in-value", "GET / HTTP/1.1\r\nHost: a\x00b\r\n\r\n", ErrHeadMalformed, "", ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			h, err := ParseHead([]byte(c.in))
			if !errors.Is(err, c.err) {
				t.Fatalf("err %v, want %v", err, c.err)
			}
			if err == nil && (h.Host != c.host || h.Path != c.path) {
				t.Errorf("host %q path %q", h.Host, h.Path)
			}
		})
	}
}

// TestParseHeadTLS: inside TLS an absolute-form target may be https://
// as well as http://, and disagrees with Host as ParseHead's does.
func TestParseHeadTLS(t *testing.T) {
	for _, c := range []struct {
		name, in string
		err      error
		host     string
	}{
		{"https", "GET https://a.test/x HTTP/1.1\r\nHost: a.test\r\n\r\n", nil, "a.test"},
		{"http", "GET http://a.test/x HTTP/1.1\r\nHost: a.test\r\n\r\n", nil, "a.test"},
		{"https-disagrees", "GET https://a.test/ HTTP/1.1\r\nHost: evil.test\r\n\r\n", ErrHostMismatch, ""},
		{"https-port-disagrees", "GET https://a.test:443/ HTTP/1.1\r\nHost: a.test:1\r\n\r\n", ErrHostMismatch, ""},
		{"other-scheme", "GET ftp://a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n", ErrHeadMalformed, ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			h, err := ParseHeadTLS([]byte(c.in))
			if !errors.Is(err, c.err) || err == nil && h.Host != c.host {
				t.Errorf("host %q err %v, want %q %v", h.Host, err, c.host, c.err)
			}
		})
	}
	if _, err := ParseHead([]byte("GET https://a.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n")); !errors.Is(err, ErrHeadMalformed) {
		t.Errorf("ParseHead of an https:// target: %v, want %v", err, ErrHeadMalformed)
	}
}

// FuzzParseHead: the head parser never panics, and an accepted head names
// one host that has no userinfo, spaces or second authority.
func FuzzParseHead(f *testing.F) {
	// Origin form with a Host header.
	f.Add([]byte("GET /a HTTP/1.1\r\nHost: a.test\r\n\r\n"))
	// Absolute form that disagrees with Host (THREATS A1).
	f.Add([]byte("GET http://evil.test/ HTTP/1.1\r\nHost: allowed.test\r\n\r\n"))
	// Userinfo smuggling in Host (THREATS C6).
	f.Add([]byte("GET / HTTP/1.1\r\nHost: allowed.test@evil.test\r\n\r\n"))
	// CL + TE.
	f.Add([]byte("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"))
	// Bracketed IPv6 host with a port.
	f.Add([]byte("GET / HTTP/1.1\r\nHost: [2001:db8::1]:8080\r\n\r\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := ParseHead(b)
		if err != nil {
			return
		}
		if h.Len > len(b) || h.Len < 4 {
			t.Fatalf("head length %d of %d", h.Len, len(b))
		}
		for _, c := range []byte(h.Host) {
			if c == '@' || c == ' ' || c == '/' || c < 0x21 || c > 0x7e {
				t.Fatalf("accepted host %q", h.Host)
			}
		}
	})
}

// TestHeadKeepsNoHeaders: the strings a parsed head returns are copies of
// their own, so keeping them does not keep the head's header lines. Heads
// of 60 KB (a short path, long headers) kept as Heads held all of it.
func TestHeadKeepsNoHeaders(t *testing.T) {
	head := []byte("GET /p?q=1 HTTP/1.1\r\nHost: www.example.com:8080\r\n" + strings.Repeat("X-Pad: "+strings.Repeat("a", 53)+"\r\n", 1000) + "\r\n")
	const n = 200
	kept := make([]Head, 0, n)
	runtime.GC()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for range n {
		h, err := ParseHead(head)
		if err != nil {
			t.Fatal(err)
		}
		kept = append(kept, h)
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	grown := int64(after.HeapInuse) - int64(before.HeapInuse)
	t.Logf("%d heads of %d bytes kept: the heap grew %d KiB", n, len(head), grown>>10)
	if limit := int64(n * 1024); grown > limit {
		t.Errorf("keeping %d parsed heads of %d bytes grew the heap %d KiB, over %d KiB", n, len(head), grown>>10, limit>>10)
	}
	h := kept[0]
	if h.Method != "GET" || h.Target != "/p?q=1" || h.Host != "www.example.com" || h.Port != "8080" || h.Path != "/p?q=1" {
		t.Errorf("head %+v", h)
	}
}
