package netutil

import (
	"encoding/binary"
	"errors"
	"net/netip"
	"testing"

	"golang.org/x/sys/unix"
)

// nlMsg wraps body in a netlink header of type typ and sequence seq.
func nlMsg(typ uint16, seq uint32, body []byte) []byte {
	b := make([]byte, unix.SizeofNlMsghdr, unix.SizeofNlMsghdr+len(body))
	binary.NativeEndian.PutUint32(b[0:4], uint32(unix.SizeofNlMsghdr+len(body)))
	binary.NativeEndian.PutUint16(b[4:6], typ)
	binary.NativeEndian.PutUint32(b[8:12], seq)
	b = append(b, body...)
	for len(b)%4 != 0 {
		b = append(b, 0)
	}
	return b
}

// ctAnswer is a conntrack message as the kernel sends it: nfgenmsg, then
// CTA_TUPLE_ORIG and CTA_TUPLE_REPLY (the reply tuple first would not
// matter: the parser looks for ORIG by type).
func ctAnswer(seq uint32, src, dst netip.AddrPort) []byte {
	family, s, d := byte(unix.AF_INET), uint16(ctaIPv4Src), uint16(ctaIPv4Dst)
	if src.Addr().Is6() {
		family, s, d = unix.AF_INET6, ctaIPv6Src, ctaIPv6Dst
	}
	body := []byte{family, 0, 0, 0}
	tuple := func(typ uint16, a, b netip.AddrPort) {
		t := beginAttr(&body, typ|unix.NLA_F_NESTED)
		ip := beginAttr(&body, ctaTupleIP|unix.NLA_F_NESTED)
		putAttr(&body, s, a.Addr().AsSlice())
		putAttr(&body, d, b.Addr().AsSlice())
		endAttr(body, ip)
		pr := beginAttr(&body, ctaTupleProto|unix.NLA_F_NESTED)
		putAttr(&body, ctaProtoNum, []byte{unix.IPPROTO_TCP})
		putAttr(&body, ctaProtoSrcPort, binary.BigEndian.AppendUint16(nil, a.Port()))
		putAttr(&body, ctaProtoDstPort, binary.BigEndian.AppendUint16(nil, b.Port()))
		endAttr(body, pr)
		endAttr(body, t)
	}
	tuple(ctaTupleReply, dst, netip.AddrPortFrom(src.Addr(), 6430))
	tuple(ctaTupleOrig, src, dst)
	return nlMsg(unix.NFNL_SUBSYS_CTNETLINK<<8|ipctnlMsgCtNew, seq, body)
}

func nlErr(seq uint32, errno unix.Errno) []byte {
	return nlMsg(unix.NLMSG_ERROR, seq, binary.NativeEndian.AppendUint32(nil, uint32(-int32(errno))))
}

func TestParseCtAnswer(t *testing.T) {
	src4, dst4 := netip.MustParseAddrPort("198.18.1.2:40123"), netip.MustParseAddrPort("198.18.2.11:443")
	src6, dst6 := netip.MustParseAddrPort("[2001:db8:1::2]:40123"), netip.MustParseAddrPort("[2001:db8:2::11]:443")
	cat := func(bs ...[]byte) (out []byte) {
		for _, b := range bs {
			out = append(out, b...)
		}
		return
	}
	for _, c := range []struct {
		name string
		in   []byte
		src  netip.AddrPort
		done bool
		err  error // nil: none; errAny: some
	}{
		{"ipv4", ctAnswer(7, src4, dst4), src4, true, nil},
		{"ipv6", ctAnswer(7, src6, dst6), src6, true, nil},
		{"stale-answer-then-ours", cat(ctAnswer(6, src6, dst6), ctAnswer(7, src4, dst4)), src4, true, nil},
		{"ack-then-answer", cat(nlErr(7, 0), ctAnswer(7, src4, dst4)), src4, true, nil},
		{"only-stale", ctAnswer(6, src4, dst4), netip.AddrPort{}, false, nil},
		{"enoent", nlErr(7, unix.ENOENT), netip.AddrPort{}, true, ErrNoConntrack},
		{"eperm", nlErr(7, unix.EPERM), netip.AddrPort{}, true, unix.EPERM},
		{"truncated", ctAnswer(7, src4, dst4)[:40], netip.AddrPort{}, true, errAny},
		{"no-orig", nlMsg(unix.NFNL_SUBSYS_CTNETLINK<<8|ipctnlMsgCtNew, 7, []byte{2, 0, 0, 0}), netip.AddrPort{}, true, errAny},
		{"empty", nil, netip.AddrPort{}, false, nil},
	} {
		src, done, err := parseCtAnswer(c.in, 7)
		switch {
		case src != c.src || done != c.done:
			t.Errorf("%s: got %s done=%v err=%v, want %s done=%v", c.name, src, done, err, c.src, c.done)
		case c.err == nil && err != nil, c.err != nil && err == nil:
			t.Errorf("%s: err %v, want %v", c.name, err, c.err)
		case c.err != nil && c.err != errAny && !errors.Is(err, c.err):
			t.Errorf("%s: err %v, want %v", c.name, err, c.err)
		}
	}
}

var errAny = errors.New("any error")

// FuzzParseCtAnswer: whatever a netlink datagram holds, the parser returns
// without panicking, and a source only with a valid address.
func FuzzParseCtAnswer(f *testing.F) {
	// A well-formed IPv4 answer.
	f.Add(ctAnswer(1, netip.MustParseAddrPort("198.18.1.2:40123"), netip.MustParseAddrPort("198.18.2.11:443")))
	// A well-formed IPv6 answer.
	f.Add(ctAnswer(1, netip.MustParseAddrPort("[2001:db8:1::2]:1"), netip.MustParseAddrPort("[2001:db8:2::11]:443")))
	// ENOENT: no entry.
	f.Add(nlErr(1, unix.ENOENT))
	// An answer cut inside its attributes.
	f.Add(ctAnswer(1, netip.MustParseAddrPort("198.18.1.2:40123"), netip.MustParseAddrPort("198.18.2.11:443"))[:37])
	// A header claiming more bytes than there are.
	f.Add([]byte{0xff, 0xff, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		src, done, err := parseCtAnswer(b, 1)
		if src.IsValid() && (err != nil || !done) {
			t.Fatalf("source %s with done=%v err=%v", src, done, err)
		}
	})
}

// TestParseDump: a dump datagram's entries of the asked sequence are
// read with both tuples; NLMSG_DONE ends it, an error message is an
// error, and a malformed datagram ends it with an error.
func TestParseDump(t *testing.T) {
	src4, dst4 := netip.MustParseAddrPort("198.18.1.2:40123"), netip.MustParseAddrPort("198.18.2.11:443")
	src6, dst6 := netip.MustParseAddrPort("[2001:db8:1::2]:40123"), netip.MustParseAddrPort("[2001:db8:2::11]:443")
	var got []ConntrackEntry
	in := append(append(ctAnswer(7, src4, dst4), ctAnswer(6, src6, dst6)...), ctAnswer(7, src6, dst6)...)
	done, err := parseDump(in, 7, func(e ConntrackEntry) { got = append(got, e) })
	if done || err != nil || len(got) != 2 {
		t.Fatalf("done=%v err=%v entries %+v", done, err, got)
	}
	if got[0].Family != unix.AF_INET || got[0].Proto != unix.IPPROTO_TCP || got[0].Orig != (ConntrackTuple{src4, dst4}) ||
		got[0].Reply != (ConntrackTuple{dst4, netip.AddrPortFrom(src4.Addr(), 6430)}) {
		t.Errorf("IPv4 entry %+v", got[0])
	}
	if got[1].Family != unix.AF_INET6 || got[1].Orig != (ConntrackTuple{src6, dst6}) {
		t.Errorf("IPv6 entry %+v", got[1])
	}
	if done, err := parseDump(nlMsg(unix.NLMSG_DONE, 7, []byte{0, 0, 0, 0}), 7, func(ConntrackEntry) {}); !done || err != nil {
		t.Errorf("NLMSG_DONE: done=%v err=%v", done, err)
	}
	if done, err := parseDump(nlErr(7, unix.EPERM), 7, func(ConntrackEntry) {}); !done || !errors.Is(err, unix.EPERM) {
		t.Errorf("EPERM: done=%v err=%v", done, err)
	}
	if done, err := parseDump(ctAnswer(7, src4, dst4)[:40], 7, func(ConntrackEntry) {}); !done || err == nil {
		t.Errorf("truncated: done=%v err=%v", done, err)
	}
}

// FuzzParseDump: whatever a dump datagram holds, the parser returns
// without panicking, and every entry it gives has valid addresses.
func FuzzParseDump(f *testing.F) {
	f.Add(ctAnswer(1, netip.MustParseAddrPort("198.18.1.2:40123"), netip.MustParseAddrPort("198.18.2.11:443")))
	f.Add(ctAnswer(1, netip.MustParseAddrPort("[2001:db8:1::2]:1"), netip.MustParseAddrPort("[2001:db8:2::11]:443")))
	f.Add(nlMsg(unix.NLMSG_DONE, 1, []byte{0, 0, 0, 0}))
	f.Add(ctAnswer(1, netip.MustParseAddrPort("198.18.1.2:40123"), netip.MustParseAddrPort("198.18.2.11:443"))[:37])
	f.Fuzz(func(t *testing.T, b []byte) {
		parseDump(b, 1, func(e ConntrackEntry) {
			if !e.Orig.Src.Addr().IsValid() || !e.Reply.Src.Addr().IsValid() || len(e.rawOrig) == 0 {
				t.Fatalf("entry %+v", e)
			}
		})
		parseAck(b, 1)
	})
}
