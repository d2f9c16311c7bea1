package firewall

import (
	"fmt"
	"slices"
	"strconv"
	"strings"
)

// String prints the ruleset the way `nft list table inet egressd` prints an
// installed one (counters and learned elements aside).
func (rs *Ruleset) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "table inet %s {\n", TableName)
	first := true
	sep := func() {
		if !first {
			b.WriteString("\n")
		}
		first = false
	}
	for _, s := range rs.Sets {
		sep()
		fmt.Fprintf(&b, "\tset %s {\n", s.Name)
		switch s.Kind {
		case SetMACs:
			b.WriteString("\t\ttype ether_addr\n")
		case SetIfnames:
			b.WriteString("\t\ttype ifname\n")
		default:
			fmt.Fprintf(&b, "\t\ttype %s_addr\n", s.Family)
		}
		switch s.Kind {
		case SetPrefixes:
			b.WriteString("\t\tflags interval\n")
		case SetLearned:
			b.WriteString("\t\tflags timeout\n")
		}
		fmt.Fprintf(&b, "\t\tcomment %q\n", s.comment())
		var elems []string
		for _, r := range mergePrefixes(s.Prefixes) {
			elems = append(elems, rangeString(r))
		}
		for _, m := range s.MACs {
			elems = append(elems, m.String())
		}
		for _, n := range nftOrder(s.Names) {
			elems = append(elems, strconv.Quote(n))
		}
		if len(elems) > 0 {
			fmt.Fprintf(&b, "\t\telements = { %s }\n", strings.Join(elems, ", "))
		}
		b.WriteString("\t}\n")
	}
	for _, c := range rs.Chains {
		sep()
		fmt.Fprintf(&b, "\tchain %s {\n", c.Name)
		fmt.Fprintf(&b, "\t\ttype %s hook %s priority %s; policy accept;\n", c.Type, c.Hook, priorityName(c.Priority))
		for _, r := range c.Rules {
			fmt.Fprintf(&b, "\t\t%s\n", r.String())
		}
		b.WriteString("\t}\n")
	}
	b.WriteString("}\n")
	return b.String()
}

// nftOrder returns interface names in the order nft lists them in a set:
// by their key (the name padded with NULs to IFNAMSIZ) read as a
// little-endian number, so the last bytes weigh most.
func nftOrder(names []string) []string {
	out := slices.Clone(names)
	slices.SortFunc(out, func(a, b string) int {
		ka, kb := ifname(a), ifname(b)
		for i := len(ka) - 1; i >= 0; i-- {
			if ka[i] != kb[i] {
				return int(ka[i]) - int(kb[i])
			}
		}
		return 0
	})
	return out
}

func priorityName(p int) string {
	switch p {
	case -100:
		return "dstnat"
	case 0:
		return "filter"
	case 100:
		return "srcnat"
	case -300:
		return "raw"
	case -150:
		return "mangle"
	}
	return strconv.Itoa(p)
}

// rangeString prints a merged range as a prefix when it is one, else as
// lo-hi.
func rangeString(r addrRange) string {
	for bits := 0; bits <= r.lo.BitLen(); bits++ {
		p, err := r.lo.Prefix(bits)
		if err == nil && p.Addr() == r.lo && lastAddr(p) == r.hi {
			if bits == r.lo.BitLen() {
				return r.lo.String()
			}
			return p.String()
		}
	}
	return r.lo.String() + "-" + r.hi.String()
}

// String prints the rule in nft syntax.
func (r Rule) String() string {
	var w []string
	if r.IIf != "" {
		w = append(w, fmt.Sprintf("iifname %q", r.IIf))
	}
	if r.IIfSet != "" {
		w = append(w, "iifname @"+r.IIfSet)
	}
	if r.OIf != "" {
		w = append(w, fmt.Sprintf("oifname %q", r.OIf))
	}
	if r.CTState != 0 {
		var st []string
		if r.CTState&CTEstablished != 0 {
			st = append(st, "established")
		}
		if r.CTState&CTRelated != 0 {
			st = append(st, "related")
		}
		if r.CTState&CTNew != 0 {
			st = append(st, "new")
		}
		w = append(w, "ct state "+strings.Join(st, ","))
	}
	if r.CTMark != 0 {
		w = append(w, fmt.Sprintf("ct mark & 0x%08x == 0x%08x", r.CTMark, r.CTMark))
	}
	if r.CTMarkAnd != 0 {
		w = append(w, fmt.Sprintf("ct mark & 0x%08x == 0x%08x", r.CTMarkAnd, r.CTMarkEq))
	}
	if r.CTReply {
		w = append(w, "ct direction reply")
	}
	if r.CTOriginal {
		w = append(w, "ct direction original")
	}
	if r.MarkAnd != 0 {
		w = append(w, fmt.Sprintf("meta mark & 0x%08x == 0x%08x", r.MarkAnd, r.MarkEq))
	}
	ip := "ip"
	if r.Family == IPv6 {
		ip = "ip6"
	}
	if r.Family != FamilyAny && r.SrcSet == "" && r.DstSet == "" && r.DstNotSet == "" && !r.ICMPv6 && !r.ICMP && r.EmptyTCP == 0 {
		w = append(w, "meta nfproto "+r.Family.String())
	}
	if r.SrcSet != "" {
		w = append(w, ip+" saddr @"+r.SrcSet)
	}
	if r.SrcMACSet != "" {
		w = append(w, "ether saddr @"+r.SrcMACSet)
	}
	if r.DstSet != "" {
		w = append(w, ip+" daddr @"+r.DstSet)
	}
	if r.DstNotSet != "" {
		w = append(w, ip+" daddr != @"+r.DstNotSet)
	}
	if r.FibLocal {
		w = append(w, "fib daddr type local")
	}
	if r.FibSrcMissing {
		w = append(w, "fib saddr . iif oif missing")
	}
	if r.ICMPv6 || r.ICMP {
		icmp := "icmp"
		if r.ICMPv6 {
			icmp = "icmpv6"
		}
		w = append(w, fmt.Sprintf("%s type %d-%d", icmp, r.ICMPTypes[0], r.ICMPTypes[1]))
	}
	if r.Echo {
		if r.Family == IPv6 {
			w = append(w, "icmpv6 type echo-request")
		} else {
			w = append(w, "icmp type echo-request")
		}
	}
	// nft leaves out a meta l4proto that a later tcp match implies.
	if r.Proto != 0 && !(r.EmptyTCP != 0 && r.Family == IPv4) && !(r.SYN && r.Ports.Lo == 0) {
		switch {
		case r.Ports.Lo == 0:
			w = append(w, "meta l4proto "+r.Proto.String())
		case r.Ports.Lo == r.Ports.Hi:
			w = append(w, fmt.Sprintf("%s dport %d", r.Proto, r.Ports.Lo))
		default:
			w = append(w, fmt.Sprintf("%s dport %d-%d", r.Proto, r.Ports.Lo, r.Ports.Hi))
		}
	}
	if r.SYN {
		w = append(w, "tcp flags syn / syn,ack")
	}
	if r.EmptyTCP != 0 {
		if r.Family == IPv6 {
			w = append(w, fmt.Sprintf("ip6 nexthdr tcp ip6 length %d", 4*int(r.EmptyTCP)))
		} else {
			w = append(w, fmt.Sprintf("ip version 4 ip hdrlength 5 ip length %d", 20+4*int(r.EmptyTCP)))
		}
		w = append(w, fmt.Sprintf("tcp doff %d", r.EmptyTCP))
	}
	if r.Counter {
		w = append(w, "counter")
	}
	if r.SetCTMarkMask != 0 {
		// As nft lists it: (mark & (^mask | value)) | value, which is
		// (mark & ^mask) | value.
		if keep := ^r.SetCTMarkMask | r.SetCTMark; keep == 0xffffffff {
			w = append(w, fmt.Sprintf("ct mark set ct mark | 0x%08x", r.SetCTMark))
		} else {
			w = append(w, fmt.Sprintf("ct mark set ct mark & 0x%08x | 0x%08x", keep, r.SetCTMark))
		}
	}
	switch r.Verdict.Kind {
	case Accept:
		w = append(w, "accept")
	case Drop:
		w = append(w, "drop")
	case Return:
		w = append(w, "return")
	case Reject:
		w = append(w, "reject")
	case RejectTCPReset:
		w = append(w, "reject with tcp reset")
	case Redirect:
		w = append(w, fmt.Sprintf("redirect to :%d", r.Verdict.Port))
	case Masquerade:
		w = append(w, "masquerade")
	case Queue:
		w = append(w, fmt.Sprintf("xt target NFQUEUE queue %d", r.Verdict.Queue))
	}
	if r.Comment != "" {
		w = append(w, fmt.Sprintf("comment %q", r.Comment))
	}
	return strings.Join(w, " ")
}
