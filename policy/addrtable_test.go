package policy

import (
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"
)

// TestAddrTableMatchesNaive compares the flattened range tables with plain
// prefix containment on random nested and overlapping prefixes, v4 and v6.
func TestAddrTableMatchesNaive(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 8))
	for round := 0; round < 50; round++ {
		var tab addrTable
		type entry struct {
			pf   netip.Prefix
			rule int32
		}
		var entries []entry
		n := 40
		if round%5 == 0 {
			n = 700 // large enough for the /16 index
		}
		for i := 0; i < n; i++ {
			var a netip.Addr
			var bits int
			if r.IntN(2) == 0 {
				a = netip.AddrFrom4([4]byte{byte(r.IntN(4)), byte(r.IntN(4)), byte(r.IntN(256)), byte(r.IntN(256))})
				bits = r.IntN(33)
			} else {
				var b [16]byte
				b[0], b[1], b[15] = 0x20, byte(r.IntN(3)), byte(r.IntN(256))
				a = netip.AddrFrom16(b)
				bits = r.IntN(129)
			}
			pf, _ := a.Prefix(bits)
			e := entry{pf, int32(r.IntN(20))}
			entries = append(entries, e)
			tab.add(e.pf, e.rule)
		}
		tab.build()
		probe := func(a netip.Addr) {
			if !a.IsValid() {
				return
			}
			var want []int32
			for _, e := range entries {
				if e.pf.Contains(a) {
					want = append(want, e.rule)
				}
			}
			slices.Sort(want)
			want = slices.Compact(want)
			first, all := tab.lookup(a)
			got := slices.Clone(all)
			if (first < 0) != (len(got) == 0) || (first >= 0 && first != got[0]) {
				t.Fatalf("round %d: lookup(%s): first %d, all %v", round, a, first, got)
			}
			if !slices.Equal(got, want) {
				t.Fatalf("round %d: lookup(%s) = %v, want %v", round, a, got, want)
			}
		}
		for _, e := range entries {
			probe(e.pf.Addr())
			probe(netip.AddrFrom16(lastAddrBytes(e.pf)).Unmap())
			if e.pf.Addr().Is4() {
				probe(netip.AddrFrom16(lastAddrBytes(e.pf)).Unmap().Next())
			}
		}
		for i := 0; i < 200; i++ {
			probe(netip.AddrFrom4([4]byte{byte(r.IntN(5)), byte(r.IntN(5)), byte(r.IntN(256)), byte(r.IntN(256))}))
		}
		probe(netip.MustParseAddr("255.255.255.255"))
		probe(netip.MustParseAddr("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"))
		probe(netip.MustParseAddr("::"))
	}
}

func lastAddrBytes(p netip.Prefix) [16]byte {
	u := lastAddr(p)
	var b [16]byte
	if p.Addr().Is4() {
		b[10], b[11] = 0xff, 0xff
		b[12], b[13], b[14], b[15] = byte(u.lo>>24), byte(u.lo>>16), byte(u.lo>>8), byte(u.lo)
		return b
	}
	for i := 0; i < 8; i++ {
		b[i] = byte(u.hi >> (56 - 8*i))
		b[8+i] = byte(u.lo >> (56 - 8*i))
	}
	return b
}

// TestOpensGuarded: a CIDR target opens a guarded range only from inside.
func TestOpensGuarded(t *testing.T) {
	for _, c := range []struct {
		p, g string
		want bool
	}{
		{"127.0.0.1/32", "127.0.0.0/8", true},
		{"127.0.0.0/8", "127.0.0.0/8", true},
		{"0.0.0.0/1", "127.0.0.0/8", false},
		{"0.0.0.0/0", "127.0.0.0/8", false},
		{"96.0.0.0/3", "100.64.0.0/10", false},
		{"::/1", "2001::/32", false},
		{"2001:0:a9fe:a9fe::/64", "2001::/32", true},
		{"10.0.0.0/8", "127.0.0.0/8", false}, // no shared address
		{"::ffff:127.0.0.1/128", "127.0.0.0/8", false},
	} {
		if got := OpensGuarded(netip.MustParsePrefix(c.p), netip.MustParsePrefix(c.g)); got != c.want {
			t.Errorf("OpensGuarded(%s, %s) = %v", c.p, c.g, got)
		}
	}
}
