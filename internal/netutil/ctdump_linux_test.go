package netutil

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"egressd/internal/testnet"
)

// TestConntrackTableMarked: a dump by mark returns the entries, IPv4 and
// IPv6, whose mark has the bits asked (the mark's other bits as they
// are), with their tuples; Delete removes one, and a second Delete of it
// is ErrNoConntrack; SetMark changes the bits of the mark under its mask.
func TestConntrackTableMarked(t *testing.T) {
	testnet.RequireRoot(t)
	ns := testnet.New(t, "ctd")
	ns.MustRun("ip", "link", "set", "lo", "up")
	rules := filepath.Join(t.TempDir(), "mark.nft")
	os.WriteFile(rules, []byte(`table inet netutil_mark_test {
	chain out {
		type filter hook output priority 0; policy accept;
		udp dport 9999 ct mark set 0x00401005
		udp dport 9998 ct mark set 0x00000001
	}
}
`), 0o644)
	ns.MustRun("nft", "-f", rules)
	send := func(addr string) netip.AddrPort {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		c, err := ns.DialContext(ctx, "udp", addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if _, err := c.Write([]byte("x")); err != nil {
			t.Fatal(err)
		}
		return c.LocalAddr().(*net.UDPAddr).AddrPort()
	}
	src4 := send("127.0.0.1:9999")
	src6 := send("[::1]:9999")
	send("127.0.0.1:9998") // marked, but not with the bit asked

	ct, err := OpenConntrackTable("/var/run/netns/" + ns.Name)
	if err != nil {
		t.Fatal(err)
	}
	defer ct.Close()
	var es []ConntrackEntry
	err = ct.Marked(0x00400000, 0x00400000, func(e ConntrackEntry) { es = append(es, e) })
	if err != nil {
		t.Fatal(err)
	}
	if len(es) != 2 {
		t.Fatalf("%d entries, want 2: %+v", len(es), es)
	}
	var e4 ConntrackEntry
	for _, e := range es {
		want := ConntrackTuple{Src: src4, Dst: netip.MustParseAddrPort("127.0.0.1:9999")}
		fam := uint8(unix.AF_INET)
		if e.Family == unix.AF_INET6 {
			want, fam = ConntrackTuple{Src: src6, Dst: netip.MustParseAddrPort("[::1]:9999")}, unix.AF_INET6
		} else {
			e4 = e
		}
		if e.Family != fam || e.Proto != unix.IPPROTO_UDP || e.Orig != want || e.Reply.Src != want.Dst || e.Mark != 0x00401005 || e.ID == 0 {
			t.Errorf("entry %+v, want family %d udp %+v mark 0x00401005", e, fam, want)
		}
	}
	if err := ct.Delete(e4); err != nil {
		t.Fatal(err)
	}
	if err := ct.Delete(e4); !errors.Is(err, ErrNoConntrack) {
		t.Errorf("second delete: %v, want ErrNoConntrack", err)
	}
	es = nil
	err = ct.Marked(0x00400000, 0x00400000, func(e ConntrackEntry) { es = append(es, e) })
	if err != nil {
		t.Fatal(err)
	}
	if len(es) != 1 || es[0].Family != unix.AF_INET6 {
		t.Fatalf("after the delete: %+v, want the IPv6 entry alone", es)
	}
	// SetMark changes the bits under its mask, and only those.
	if err := ct.SetMark(es[0], 0x00402000, 0x007ff000); err != nil {
		t.Fatal(err)
	}
	if err := ct.SetMark(e4, 0x00402000, 0x007ff000); !errors.Is(err, ErrNoConntrack) {
		t.Errorf("mark of a deleted entry: %v, want ErrNoConntrack", err)
	}
	if err := ct.SetMark(es[0], 0x00402001, 0x007ff000); err == nil {
		t.Error("no error for a value outside the mask")
	}
	es = nil
	if err := ct.Marked(0x00400000, 0x00400000, func(e ConntrackEntry) { es = append(es, e) }); err != nil {
		t.Fatal(err)
	}
	if len(es) != 1 || es[0].Mark != 0x00402005 {
		t.Errorf("after SetMark: %+v, want the IPv6 entry with mark 0x00402005", es)
	}
}

// TestMarkedOnce: the dump's filter passes the entries with the mark's
// bits asked, each id once (a dump during a resize of the kernel's table
// can give one twice).
func TestMarkedOnce(t *testing.T) {
	var got []uint32
	pass := markedOnce(0x00400000, 0x00400000, func(e ConntrackEntry) { got = append(got, e.ID) })
	for _, e := range []ConntrackEntry{
		{ID: 1, Mark: 0x00401000}, {ID: 2, Mark: 0x00400000}, {ID: 1, Mark: 0x00401000},
		{ID: 3, Mark: 0x00001000}, {ID: 2, Mark: 0x00400000}, {ID: 4, Mark: 0x80400000},
	} {
		pass(e)
	}
	if want := []uint32{1, 2, 4}; !slices.Equal(got, want) {
		t.Errorf("passed %v, want %v", got, want)
	}
}

// BenchmarkMarked dumps a table of 20,000 marked entries (UDP datagrams
// to as many ports in a namespace): B/op is what one look at them costs.
func BenchmarkMarked(b *testing.B) {
	testnet.RequireRoot(b)
	ns := testnet.New(b, "ctb")
	ns.MustRun("ip", "link", "set", "lo", "up")
	rules := filepath.Join(b.TempDir(), "mark.nft")
	os.WriteFile(rules, []byte(`table inet netutil_mark_bench {
	chain out {
		type filter hook output priority 0; policy accept;
		udp dport 20000-59999 ct mark set 0x00401005
	}
}
`), 0o644)
	ns.MustRun("nft", "-f", rules)
	const n = 20000
	pc, err := ns.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer pc.Close()
	for i := range n {
		if _, err := pc.WriteTo([]byte("x"), &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 20000 + i}); err != nil {
			b.Fatal(err)
		}
	}
	ct, err := OpenConntrackTable("/var/run/netns/" + ns.Name)
	if err != nil {
		b.Fatal(err)
	}
	defer ct.Close()
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		got := 0
		if err := ct.Marked(0x00400000, 0x00400000, func(ConntrackEntry) { got++ }); err != nil {
			b.Fatal(err)
		}
		if got < n*9/10 {
			b.Fatalf("%d entries, want about %d", got, n)
		}
	}
}
