package httpwire

import (
	"strings"
	"testing"
)

// TestRequestLineStart: a token of at most MaxMethodLen characters, a
// space, then "/" or "http://" (in any case) starts a request line; a
// prefix of one asks for more bytes; anything else is not one.
func TestRequestLineStart(t *testing.T) {
	for _, c := range []struct {
		in        string
		yes, more bool
	}{
		{"", false, true},
		{"PROPFIND", false, true},
		{"PROPFIND ", false, true},
		{"PROPFIND /", true, false},
		{"M-SEARCH * HTTP/1.1", false, false},
		{"FOO http://a.test/", true, false},
		{"foo HTTP://a", true, false},
		{"FOO htt", false, true},
		{"FOO https://a", false, false},
		{"FOO x", false, false},
		{" /x", false, false},
		{"GE(T /", false, false},
		{strings.Repeat("A", MaxMethodLen) + " /", true, false},
		{strings.Repeat("A", MaxMethodLen+1), false, false},
		{"\x16\x03\x01", false, false},
	} {
		if yes, more := RequestLineStart([]byte(c.in)); yes != c.yes || more != c.more {
			t.Errorf("%q: yes %v more %v, want %v %v", c.in, yes, more, c.yes, c.more)
		}
	}
}

// TestIsTChar: the visible ASCII characters but RFC 9110's delimiters.
func TestIsTChar(t *testing.T) {
	for c := 0; c < 256; c++ {
		want := c > ' ' && c < 0x7f && !strings.ContainsRune("()<>@,;:\\\"/[]?={}", rune(c))
		if got := IsTChar(byte(c)); got != want {
			t.Errorf("IsTChar(%#x) = %v", c, got)
		}
	}
}

// TestSplitAuthority: host[:port] and [v6][:port] split; userinfo, spaces,
// bare IPv6, a bracketed non-IPv6 and bad ports do not.
func TestSplitAuthority(t *testing.T) {
	for _, c := range []struct {
		in, host, port string
		ok             bool
	}{
		{"a.test", "a.test", "", true},
		{"a.test:8080", "a.test", "8080", true},
		{"a.test.", "a.test.", "", true},
		{"192.0.2.1:80", "192.0.2.1", "80", true},
		{"[2001:db8::1]", "2001:db8::1", "", true},
		{"[2001:db8::1]:443", "2001:db8::1", "443", true},
		{"", "", "", false},
		{":80", "", "", false},
		{"a.test:", "", "", false},
		{"a.test:0", "", "", false},
		{"a.test:65536", "", "", false},
		{"a.test:080", "", "", false},
		{"a.test:+80", "", "", false},
		{"user@a.test", "", "", false},
		{"a.test/x", "", "", false},
		{"a.test,b.test", "", "", false},
		{"a test", "", "", false},
		{"a.t\u00e9st", "", "", false},
		{"2001:db8::1", "", "", false},
		{"[192.0.2.1]", "", "", false},
		{"[2001:db8::1", "", "", false},
		{"[2001:db8::1]x", "", "", false},
		{"[2001:db8::1]:0", "", "", false},
	} {
		host, port, ok := SplitAuthority(c.in)
		if host != c.host || port != c.port || ok != c.ok {
			t.Errorf("%q: %q %q %v, want %q %q %v", c.in, host, port, ok, c.host, c.port, c.ok)
		}
	}
}

// TestValidPort: 1 to 65535 in decimal, without a sign or a leading zero.
func TestValidPort(t *testing.T) {
	for p, want := range map[string]bool{
		"1": true, "80": true, "65535": true,
		"": false, "0": false, "00": false, "080": false, "65536": false, "99999": false,
		"123456": false, "+80": false, "-1": false, "8a": false, " 80": false,
	} {
		if got := ValidPort(p); got != want {
			t.Errorf("ValidPort(%q) = %v", p, got)
		}
	}
}
