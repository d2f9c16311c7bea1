package dnsfilter

import (
	"encoding/binary"
	"net/netip"
	"testing"

	"golang.org/x/sys/unix"
)

// TestParseAnswerFrom: the control data a reader gets is read back to the
// address the query was sent to whatever its shape, and anything odd
// (none, cut short, a length past the end or below the header's, another
// message, a multicast, broadcast or unspecified address) leaves the
// source to the kernel, without a panic. What put writes reads back the
// same.
func TestParseAnswerFrom(t *testing.T) {
	v4 := func(spec, dst [4]byte) []byte {
		b := make([]byte, oobCap)
		n := answerFrom{addr: netip.AddrFrom4(spec)}.put(b)
		copy(b[cmsgHdrLen+8:], dst[:])
		return b[:n]
	}
	ll := netip.MustParseAddr("fe80::1")
	for _, tc := range []struct {
		name string
		oob  []byte
		want answerFrom
	}{
		{"none", nil, answerFrom{}},
		{"ipv4", v4([4]byte{192, 0, 2, 2}, [4]byte{192, 0, 2, 2}), answerFrom{addr: netip.MustParseAddr("192.0.2.2")}},
		{"ipv4 broadcast answered from spec_dst", v4([4]byte{192, 0, 2, 1}, [4]byte{192, 0, 2, 255}), answerFrom{addr: netip.MustParseAddr("192.0.2.1")}},
		{"ipv4 spec_dst unspecified", v4([4]byte{}, [4]byte{192, 0, 2, 2}), answerFrom{}},
		{"ipv4 spec_dst broadcast", v4([4]byte{255, 255, 255, 255}, [4]byte{}), answerFrom{}},
		{"ipv4 multicast", v4([4]byte{224, 0, 0, 251}, [4]byte{}), answerFrom{}},
		{"ula", putFrom(answerFrom{addr: netip.MustParseAddr("fd00:a2::2"), ifindex: 7}), answerFrom{addr: netip.MustParseAddr("fd00:a2::2")}},
		{"link-local keeps its interface", putFrom(answerFrom{addr: ll, ifindex: 7}), answerFrom{addr: ll, ifindex: 7}},
		{"ipv6 multicast", putFrom(answerFrom{addr: netip.MustParseAddr("ff02::fb")}), answerFrom{}},
		{"v4-mapped", putFrom(answerFrom{addr: netip.MustParseAddr("::ffff:192.0.2.1")}), answerFrom{}},
		{"cut short", putFrom(answerFrom{addr: ll})[:cmsgHdrLen+10], answerFrom{}},
		{"header only", putFrom(answerFrom{addr: ll})[:cmsgHdrLen-1], answerFrom{}},
		{"length past the end", setLen(putFrom(answerFrom{addr: ll}), 200), answerFrom{}},
		{"length below the header", setLen(putFrom(answerFrom{addr: ll}), 3), answerFrom{}},
		{"huge length", setLen(putFrom(answerFrom{addr: ll}), -1), answerFrom{}},
		{"another message", setType(putFrom(answerFrom{addr: ll}), unix.IPV6_HOPLIMIT), answerFrom{}},
		{"data too short for its type", setLen(putFrom(answerFrom{addr: ll}), cmsgHdrLen+4), answerFrom{}},
		{"garbage", []byte("0123456789abcdef0123456789abcdef0123456789abcdef"), answerFrom{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := parseAnswerFrom(tc.oob); got != tc.want {
				t.Errorf("parseAnswerFrom(%x) = %+v, want %+v", tc.oob, got, tc.want)
			}
		})
	}
	if n := (answerFrom{}).put(make([]byte, oobCap)); n != 0 {
		t.Errorf("zero answerFrom puts %d bytes, want 0", n)
	}
}

func putFrom(f answerFrom) []byte {
	b := make([]byte, oobCap)
	return b[:f.put(b)]
}

func setLen(b []byte, l int) []byte {
	if unix.SizeofPtr == 8 {
		binary.NativeEndian.PutUint64(b, uint64(int64(l)))
	} else {
		binary.NativeEndian.PutUint32(b, uint32(int32(l)))
	}
	return b
}

func setType(b []byte, typ int) []byte {
	binary.NativeEndian.PutUint32(b[unix.SizeofPtr+4:], uint32(typ))
	return b
}

// FuzzParseAnswerFrom: no control data makes the parser panic, and what
// it returns is the zero answerFrom or a unicast address (an interface
// only with a link-local one).
func FuzzParseAnswerFrom(f *testing.F) {
	f.Add(putFrom(answerFrom{addr: netip.MustParseAddr("192.0.2.2")}))
	f.Add(putFrom(answerFrom{addr: netip.MustParseAddr("fe80::1"), ifindex: 3}))
	f.Add(append(putFrom(answerFrom{addr: netip.MustParseAddr("fd00::1")}), putFrom(answerFrom{addr: netip.MustParseAddr("192.0.2.2")})...))
	f.Fuzz(func(t *testing.T, oob []byte) {
		got := parseAnswerFrom(oob)
		if !got.addr.IsValid() {
			if got != (answerFrom{}) {
				t.Fatalf("%+v", got)
			}
			return
		}
		if got.addr.IsMulticast() || got.addr.IsUnspecified() || got.ifindex != 0 && !got.addr.IsLinkLocalUnicast() {
			t.Fatalf("parseAnswerFrom(%x) = %+v", oob, got)
		}
		b := make([]byte, oobCap)
		if back := parseAnswerFrom(b[:got.put(b)]); back != got {
			t.Fatalf("put then parse %+v: %+v", got, back)
		}
	})
}

// BenchmarkAnswerFrom is what a wildcard listener's reader adds to each
// query in user space: read the destination from the control data, write
// it into the answer's.
func BenchmarkAnswerFrom(b *testing.B) {
	for _, a := range []string{"192.0.2.2", "fe80::2"} {
		b.Run(a, func(b *testing.B) {
			in := putFrom(answerFrom{addr: netip.MustParseAddr(a), ifindex: 3})
			out := make([]byte, oobCap)
			b.ReportAllocs()
			for b.Loop() {
				if parseAnswerFrom(in).put(out) == 0 {
					b.Fatal("nothing put")
				}
			}
		})
	}
}
