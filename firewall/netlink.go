package firewall

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	"golang.org/x/sys/unix"

	"egressd/internal/nfq"
	"egressd/policy"
)

// natRangeProtoSpecified is NF_NAT_RANGE_PROTO_SPECIFIED: the redirect
// carries a port.
const natRangeProtoSpecified = 0x2

func table() *nftables.Table {
	return &nftables.Table{Name: TableName, Family: nftables.TableFamilyINet}
}

// seed is a learned address to put back into a set when the table is
// recreated.
type seed struct {
	addr    netip.Addr
	timeout time.Duration
}

// queueReplace queues, on conn, the messages of one transaction that
// replaces egressd's table with rs: add the table (a no-op if it exists, so
// that the delete cannot fail), delete it with everything in it, and
// create it again. The kernel applies the batch atomically: packets see the
// old ruleset or the new one, never none. seeds fills learned sets.
func queueReplace(conn *nftables.Conn, rs *Ruleset, seeds map[string][]seed) error {
	t := table()
	conn.AddTable(t)
	conn.DelTable(t)
	conn.AddTable(t)
	sets := map[string]*nftables.Set{}
	for _, s := range rs.Sets {
		ns, elems, err := nfSet(t, s, seeds[s.Name])
		if err != nil {
			return err
		}
		if err := conn.AddSet(ns, elems); err != nil {
			return fmt.Errorf("firewall: set %s: %w", s.Name, err)
		}
		sets[s.Name] = ns
	}
	accept := nftables.ChainPolicyAccept
	for _, c := range rs.Chains {
		prio := nftables.ChainPriority(c.Priority)
		ch := conn.AddChain(&nftables.Chain{
			Name: c.Name, Table: t, Type: nftables.ChainType(c.Type),
			Hooknum: hook(c.Hook), Priority: &prio, Policy: &accept,
		})
		for _, r := range c.Rules {
			exprs, err := ruleExprs(r, sets)
			if err != nil {
				return fmt.Errorf("firewall: chain %s: rule %q: %w", c.Name, r.String(), err)
			}
			nr := &nftables.Rule{Table: t, Chain: ch, Exprs: exprs}
			if r.Comment != "" {
				nr.UserData = userdata.AppendString(nil, userdata.TypeComment, r.Comment)
			}
			conn.AddRule(nr)
		}
	}
	return nil
}

// queueRemove queues the deletion of egressd's table, which succeeds whether
// or not it exists.
func queueRemove(conn *nftables.Conn) {
	t := table()
	conn.AddTable(t)
	conn.DelTable(t)
}

func hook(h string) *nftables.ChainHook {
	switch h {
	case "prerouting":
		return nftables.ChainHookPrerouting
	case "input":
		return nftables.ChainHookInput
	case "forward":
		return nftables.ChainHookForward
	case "output":
		return nftables.ChainHookOutput
	}
	return nftables.ChainHookPostrouting
}

// nfSet builds the netlink form of a set and its initial elements.
func nfSet(t *nftables.Table, s Set, seeds []seed) (*nftables.Set, []nftables.SetElement, error) {
	ns := &nftables.Set{Table: t, Name: s.Name, Comment: s.comment()}
	var elems []nftables.SetElement
	switch s.Kind {
	case SetIfnames:
		// Host byte order, as nft marks a set of names: nft then lists
		// them as names.
		ns.KeyType, ns.KeyByteOrder = nftables.TypeIFName, binaryutil.NativeEndian
		for _, n := range s.Names {
			if err := checkIfName(n); err != nil || n == "" {
				return nil, nil, fmt.Errorf("firewall: set %s: interface name %q", s.Name, n)
			}
			elems = append(elems, nftables.SetElement{Key: ifname(n)})
		}
		return ns, elems, nil
	case SetMACs:
		ns.KeyType = nftables.TypeEtherAddr
		for _, m := range s.MACs {
			if len(m) != 6 {
				return nil, nil, fmt.Errorf("firewall: set %s: MAC address %s is not 6 bytes", s.Name, m)
			}
			elems = append(elems, nftables.SetElement{Key: []byte(m)})
		}
		return ns, elems, nil
	case SetPrefixes:
		ns.Interval = true
		for _, r := range mergePrefixes(s.Prefixes) {
			elems = append(elems, nftables.SetElement{Key: r.lo.AsSlice()})
			// The element after the range ends it, unless the range runs to
			// the family's last address.
			if next := r.hi.Next(); next.IsValid() {
				elems = append(elems, nftables.SetElement{Key: next.AsSlice(), IntervalEnd: true})
			}
		}
	case SetLearned:
		ns.HasTimeout = true
		for _, sd := range seeds {
			elems = append(elems, nftables.SetElement{Key: sd.addr.AsSlice(), Timeout: sd.timeout})
		}
	}
	ns.KeyType = nftables.TypeIPAddr
	if s.Family == IPv6 {
		ns.KeyType = nftables.TypeIP6Addr
	}
	for _, e := range elems {
		if len(e.Key) != int(ns.KeyType.Bytes) {
			return nil, nil, fmt.Errorf("firewall: set %s: element of the wrong address family", s.Name)
		}
	}
	return ns, elems, nil
}

// ifname is an interface name as meta iifname compares it: NUL-padded to
// IFNAMSIZ.
func ifname(n string) []byte {
	b := make([]byte, unix.IFNAMSIZ)
	copy(b, n)
	return b
}

// ruleExprs compiles a Rule into nftables expressions, all through
// register 1, in the order nft itself emits them.
func ruleExprs(r Rule, sets map[string]*nftables.Set) ([]expr.Any, error) {
	var e []expr.Any
	if r.IIf != "" {
		e = append(e, &expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ifname(r.IIf)})
	}
	if r.IIfSet != "" {
		s, ok := sets[r.IIfSet]
		if !ok {
			return nil, fmt.Errorf("unknown set %s", r.IIfSet)
		}
		e = append(e, &expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
			&expr.Lookup{SourceRegister: 1, SetName: s.Name, SetID: s.ID})
	}
	if r.OIf != "" {
		e = append(e, &expr.Meta{Key: expr.MetaKeyOIFNAME, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ifname(r.OIf)})
	}
	if r.CTState != 0 {
		e = append(e, &expr.Ct{Register: 1, Key: expr.CtKeySTATE},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
				Mask: binaryutil.NativeEndian.PutUint32(uint32(r.CTState)), Xor: make([]byte, 4)},
			&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: make([]byte, 4)})
	}
	if r.CTMark != 0 {
		m := binaryutil.NativeEndian.PutUint32(r.CTMark)
		e = append(e, &expr.Ct{Register: 1, Key: expr.CtKeyMARK},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: m, Xor: make([]byte, 4)},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: m})
	}
	if r.CTMarkAnd != 0 {
		e = append(e, &expr.Ct{Register: 1, Key: expr.CtKeyMARK},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: binaryutil.NativeEndian.PutUint32(r.CTMarkAnd), Xor: make([]byte, 4)},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(r.CTMarkEq)})
	}
	if r.CTReply || r.CTOriginal {
		dir := byte(0) // IP_CT_DIR_ORIGINAL
		if r.CTReply {
			dir = 1
		}
		e = append(e, &expr.Ct{Register: 1, Key: expr.CtKeyDIRECTION},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{dir}})
	}
	if r.MarkAnd != 0 {
		e = append(e, &expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: binaryutil.NativeEndian.PutUint32(r.MarkAnd), Xor: make([]byte, 4)},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(r.MarkEq)})
	}
	fam := r.Family
	if fam == FamilyAny && (r.SrcSet != "" || r.DstSet != "" || r.DstNotSet != "") {
		return nil, fmt.Errorf("an address set without a family")
	}
	if fam != FamilyAny {
		nf := byte(unix.NFPROTO_IPV4)
		if fam == IPv6 {
			nf = unix.NFPROTO_IPV6
		}
		e = append(e, &expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{nf}})
	}
	addr := func(set string, src, invert bool) error {
		s, ok := sets[set]
		if !ok {
			return fmt.Errorf("unknown set %s", set)
		}
		off, n := uint32(16), uint32(4) // IPv4 daddr
		switch {
		case fam == IPv4 && src:
			off = 12
		case fam == IPv6 && src:
			off, n = 8, 16
		case fam == IPv6:
			off, n = 24, 16
		}
		e = append(e, &expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: n},
			&expr.Lookup{SourceRegister: 1, SetName: s.Name, SetID: s.ID, Invert: invert})
		return nil
	}
	if r.SrcSet != "" {
		if err := addr(r.SrcSet, true, false); err != nil {
			return nil, err
		}
	}
	if r.SrcMACSet != "" {
		s, ok := sets[r.SrcMACSet]
		if !ok {
			return nil, fmt.Errorf("unknown set %s", r.SrcMACSet)
		}
		e = append(e, &expr.Meta{Key: expr.MetaKeyIIFTYPE, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint16(unix.ARPHRD_ETHER)},
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseLLHeader, Offset: 6, Len: 6},
			&expr.Lookup{SourceRegister: 1, SetName: s.Name, SetID: s.ID})
	}
	if r.DstSet != "" {
		if err := addr(r.DstSet, false, false); err != nil {
			return nil, err
		}
	}
	if r.DstNotSet != "" {
		if err := addr(r.DstNotSet, false, true); err != nil {
			return nil, err
		}
	}
	if r.FibLocal {
		e = append(e, &expr.Fib{Register: 1, FlagDADDR: true, ResultADDRTYPE: true},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(unix.RTN_LOCAL)})
	}
	if r.FibSrcMissing {
		// "present" stores a boolean in the register's first byte and
		// zeroes the rest; nft compares all four bytes (with one, it
		// lists "oif missing/8").
		e = append(e, &expr.Fib{Register: 1, FlagSADDR: true, FlagIIF: true, FlagPRESENT: true, ResultOIF: true},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: make([]byte, 4)})
	}
	if r.ICMPv6 || r.ICMP {
		proto := byte(unix.IPPROTO_ICMPV6)
		if r.ICMP {
			proto = unix.IPPROTO_ICMP
		}
		e = append(e, &expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto}},
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 0, Len: 1},
			&expr.Range{Op: expr.CmpOpEq, Register: 1, FromData: []byte{r.ICMPTypes[0]}, ToData: []byte{r.ICMPTypes[1]}})
	}
	if r.Echo {
		proto, typ := byte(unix.IPPROTO_ICMP), byte(8) // echo-request
		switch fam {
		case IPv6:
			proto, typ = unix.IPPROTO_ICMPV6, 128
		case FamilyAny:
			return nil, fmt.Errorf("an echo request without a family")
		}
		e = append(e, &expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto}},
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 0, Len: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{typ}})
	}
	if r.Proto != 0 {
		e = append(e, &expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{byte(r.Proto)}})
		if r.Ports.Lo != 0 {
			e = append(e, &expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2})
			if r.Ports.Lo == r.Ports.Hi {
				e = append(e, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: be16(r.Ports.Lo)})
			} else {
				e = append(e, &expr.Range{Op: expr.CmpOpEq, Register: 1, FromData: be16(r.Ports.Lo), ToData: be16(r.Ports.Hi)})
			}
		}
	}
	if r.SYN {
		if r.Proto != policy.TCP {
			return nil, fmt.Errorf("a SYN match for a rule that does not match TCP")
		}
		e = append(e, &expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 13, Len: 1},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 1, Mask: []byte{tcpSYN | tcpACK}, Xor: []byte{0}},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{tcpSYN}})
	}
	if r.EmptyTCP != 0 {
		x, err := emptyTCPExprs(r)
		if err != nil {
			return nil, err
		}
		e = append(e, x...)
	}
	if r.Counter {
		e = append(e, &expr.Counter{})
	}
	if r.SetCTMarkMask != 0 {
		if r.SetCTMark&^r.SetCTMarkMask != 0 {
			return nil, fmt.Errorf("conntrack mark 0x%08x outside its mask 0x%08x", r.SetCTMark, r.SetCTMarkMask)
		}
		// ct mark = (ct mark & ^mask) ^ value: the bits under the mask
		// set to value, the others kept.
		e = append(e, &expr.Ct{Register: 1, Key: expr.CtKeyMARK},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
				Mask: binaryutil.NativeEndian.PutUint32(^r.SetCTMarkMask), Xor: binaryutil.NativeEndian.PutUint32(r.SetCTMark)},
			&expr.Ct{Register: 1, Key: expr.CtKeyMARK, SourceRegister: true})
	}
	switch r.Verdict.Kind {
	case Accept:
		e = append(e, &expr.Verdict{Kind: expr.VerdictAccept})
	case Drop:
		e = append(e, &expr.Verdict{Kind: expr.VerdictDrop})
	case Return:
		e = append(e, &expr.Verdict{Kind: expr.VerdictReturn})
	case Reject:
		e = append(e, &expr.Reject{Type: unix.NFT_REJECT_ICMPX_UNREACH, Code: unix.NFT_REJECT_ICMPX_PORT_UNREACH})
	case RejectTCPReset:
		if r.Proto != policy.TCP {
			return nil, fmt.Errorf("a TCP reset for a rule that does not match TCP")
		}
		e = append(e, &expr.Reject{Type: unix.NFT_REJECT_TCP_RST})
	case Redirect:
		if r.Proto == 0 || r.Verdict.Port == 0 {
			return nil, fmt.Errorf("a redirect needs a protocol and a port")
		}
		e = append(e, &expr.Immediate{Register: 1, Data: be16(r.Verdict.Port)},
			&expr.Redir{RegisterProtoMin: 1, Flags: natRangeProtoSpecified})
	case Masquerade:
		e = append(e, &expr.Masq{})
	case Queue:
		e = append(e, nfq.Target(r.Verdict.Queue))
	default:
		return nil, fmt.Errorf("no verdict")
	}
	return e, nil
}

func be16(v uint16) []byte {
	return binary.BigEndian.AppendUint16(nil, v)
}
