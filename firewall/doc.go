// Package firewall renders an egressd policy into an nftables ruleset and
// installs it, through netlink (github.com/google/nftables), in egressd's own
// table "inet egressd". It never touches another table.
//
// Where it sits in the flow: LAN packets meet this ruleset first. In enforce
// mode it redirects TCP from the LAN to proxy/'s transparent listener and DNS
// to dnsfilter/'s forwarder, lets other forwarded traffic (UDP, ICMP and
// ICMPv6 echo requests of rules that list icmp, and TCP on ports that are
// not redirected) out only to the addresses the policy's
// rules allow (their CIDRs, and the addresses dnsfilter learned for their
// names, fed through [Firewall.LearnAll] into sets with timeouts before
// dnsfilter sends the answer, so a client's first packet finds them open,
// and seeded, when a ruleset goes in, with the answers dnsfilter gave out
// before (Deps.Given, seed.go), so a client that keeps one is not cut off;
// the sets are named after rules, not names, so an answer decided under
// another policy than the installed one (across a reload, or a refused
// one) is learned only if the installed rule of its name covers it
// ([Address].Engine), and a reload that takes names or clients from a
// rule starts its sets afresh;
// [Firewall.Wants] says which rules it needs them for; a rule that opens
// every address, or a prefix broader than one of the special ranges the
// proxy guards, opens all of its addresses but those ranges,
// such as cloud metadata, CGNAT and the IPv6 forms of IPv4 addresses,
// and so do a rule's learned sets: an address of such a range that got
// into one opens only where a CIDR rule names it, as through the proxy),
// rejects QUIC (UDP 443) and DoT/DoQ (853) unless a rule allows them so
// that clients fall back to TCP where the proxy sees the SNI, and drops new
// connections arriving from the WAN side. Config.LANs may name several
// LAN interfaces (VLANs kept apart, say): each is treated as the one is
// (a set of their names, iifname @lans, in every rule that matches the
// LAN), so traffic from one LAN interface to another is LAN traffic, let
// through only where a rule allows it (the keyword private, say). Nothing
// from another interface (a LAN segment, a VLAN, a VPN that Config.LANs
// does not name) goes out to the WAN side either; traffic from such an
// interface to a LAN is not egress and is left alone (the other way it is
// LAN traffic, judged by the rules). IPv6 is treated like IPv4: the table
// is of the inet family, so every rule sees both.
//
// Before any of that, and before conntrack, the enforce ruleset drops
// what arrives on a LAN interface from a source the kernel's FIB would not
// route back out of that interface (chain antispoof, priority raw: fib
// saddr . iif oif missing, BCP 38 ingress filtering): a forged source off
// the LAN is no client of the forwarder or the proxy, their replies are
// not reflected at it out of the WAN, and nothing from it is forwarded. A
// subnet the gateway routes via a LAN interface (behind a LAN-side
// router) passes, and so do link-local sources, DHCP's 0.0.0.0 broadcasts
// and IPv6 duplicate address detection from :: (the kernel's own
// exceptions). Audit mode does not check sources (it installs nothing
// that drops, below).
//
// In enforce mode "established" is not enough to pass the forward chain:
// every connection an allow rule lets out gets bit [CTMarkEnforced] of its
// conntrack mark (the mark's other bits are left as they are), and only
// replies and related traffic of marked connections are accepted as such.
// A connection that went out before enforcement began (in audit mode,
// whose masquerade or WAN guard keeps conntrack tracking it, or before
// egressd ran) has no mark: its packets from the LAN are judged by the
// allow rules like new ones, and its replies are dropped, so switching to
// enforce cuts what the policy does not allow instead of letting it run on.
// For the same reason no rule opens port 53 in forward: every new
// connection to it from the LAN is the forwarder's, so an accept there
// could only carry on a DNS tunnel begun before enforcement.
//
// # The conntrack mark
//
// egressd owns two parts of the mark, and writes them with a masked set
// (ct mark set ct mark & ~owned | value), so every other bit stays the
// operator's:
//
//   - [CTMarkEnforced] (0x00400000): let out by the enforce ruleset;
//   - [CTMarkTag] (0x003ff000): which policy rule let it out, a 10-bit tag
//     derived from the rule's name and the content its accept rules depend
//     on (clients, targets, forwarded ports), unique within a ruleset of up
//     to 1023 such rules; 0 for traffic between other interfaces (not
//     egress) and for connections marked before tags existed.
//
// That is the default layout ([DefaultCTMarkBits], 0x007ff000).
// Config.CTMarkBits (egressd's --ct-mark-bits) places the two parts
// elsewhere, for a gateway whose own rules use those bits (multi-WAN
// policy routing, wg-quick): one run of contiguous bits, its highest the
// enforced bit, the others the tag, of 2^(n-1)-1 tags for n bits. The
// ruleset, the reload's look at the connections (dump, cut, re-mark) and
// the tags all follow it. A policy with more rules that forward than
// tags goes in with rules sharing tags (said at start by egressd run,
// [Config.CheckTags], and in the install or replace line): the look still cuts what the
// policy no longer allows, but decides again the flows of every rule
// whose tag a changed rule shares, and so cuts some an unchanged rule
// would have kept. The operator's rules must not write these bits. A
// change of the bits while connections are out leaves their marks at
// the old place, unread: like connections from before enforcement, they
// are judged anew by the rules from the LAN, and their replies dropped.
//
// A reload that narrows the policy reaches the connections already out
// through the tag (sweep.go): after every install or replace in enforce
// mode (a rule's expiry included) the firewall dumps the conntrack entries
// with CTMarkEnforced over ctnetlink (internal/netutil), keeps those whose
// rule is in the new ruleset unchanged (however long ago their learned
// address expired from its set), decides the others again as the new
// forward chain would decide their first packet (addresses and port after
// destination NAT, the rules' CIDRs and live learned addresses; a rule
// that kept its name and only widened still counts for its old flows),
// and deletes the entries of those it denies; a connection kept because
// another rule than its own admits it gets that rule's tag (a ctnetlink
// update of the mark's owned bits, CTA_MARK under CTA_MARK_MASK), once
// the cuts are made (a look gives up after 10 s, and its time goes to the
// cuts first). A tag is
// read against the rulesets it can come from: that of the last look that
// saw every connection, and every one installed after it (a look skipped,
// because a later ruleset went in first, or failed leaves the older tags
// in play); where a removed rule and a new one share it, the connection
// is decided again, so a reused tag never keeps what the policy no longer
// allows. The entries are decided as the dump is read (only those to cut
// or re-mark are held), each id once: a dump that runs while the kernel
// resizes its table can give an entry twice (counted once) or miss one
// (left alone; the next look reads its tag against the rulesets from this
// one on, with the risk of a start: a new rule that drew its tag keeps
// it). A cut connection's next
// packet from the LAN is a new connection to the new ruleset, and dropped; its
// replies meet the WAN guard (without Config.WAN there is none, and a
// server that speaks next opens the connection anew from its side, as
// "between other interfaces": the same gap as for connections from before
// enforcement). Connections redirected to the proxy are not
// marked (they end on the gateway) and are the proxy's business. One log
// line per install or reload ("firewall replace", flows_kept and
// flows_cut) and egress_firewall_reload_flows_total{result} count them;
// each cut is a decision of its own: a canonical line (client, client
// port, destination, port, protocol, the rule it ran under as
// prev_rule_id, the new decision's reason, close "policy-revoked") and an
// event to Deps.Sink (source "firewall", a drop enforced, timed at the
// cut), which egressd run hands to capture: capture records the cut on
// its own record of the flow (the flow's start, name and bytes), so the
// report counts the flow once, as dropped, and passes the firewall's
// event on only for a flow it does not follow.
// A client matched by MAC, where the rule's client set changed, is asked
// its MAC (Deps.MACs, the LAN's neighbour table: conntrack holds none).
// What the re-decision cannot know: the MAC of a client behind a router
// (the forward chain matches the router's, the frame's source address),
// and the names of an address learned before a restart that the DNS
// forwarder's table did not carry over; such flows are cut. egressd run keeps that table in its
// state directory (written every 30 s while it changes and at a clean
// stop, read before Install), so after a restart the learned sets are
// seeded with the answers given out before it, with their times, and
// flows to them, new ones included, go on; what is lost is what the file
// did not hold: the answers of the last 30 s before a kill -9, and all of
// them without a usable state directory. At a start the
// previous policy is unknown: a tag the new ruleset uses is taken for its
// rule's, so a flow of a rule removed while egressd was down is kept in
// the rare case (about one in a thousand per new rule) that a new rule
// drew the same tag. After 16 enforce rulesets in a row whose looks all
// failed, the oldest one's tags are forgotten the same way.
//
// # The fast path
//
// With Config.FastPath (enforce mode; fast.go) the proxy decides a new
// TCP connection from its queued packets and the kernel forwards the
// rest. Chain fastpath (filter, prerouting, priority -150) queues the
// LAN's initial SYNs to the fast ports (Config.FastPathPorts, 443 when
// none) among the redirected ones (NFQUEUE through
// nft_compat, queue Config.FastPathQueue, no bypass: no reader, no
// connection). Userspace answers with a packet mark of [FastMarks] under
// the owned bits: Pending keeps the SYN from the redirect (nat
// prerouting) and gives the connection the conntrack mark "pending";
// forward's first rules, before anything that accepts or drops, pass a
// pending connection's replies and its LAN packets that provably carry
// no payload (IPv4 without options, IPv6 without extension headers, the
// lengths checked exactly), and queue the rest; a packet released with
// Allowed (NF_REPEAT) marks the connection "fast-allowed", and one with
// Denied "denied", dropped from then on. The values are tags of the
// owned run: fast-allowed is the enforced bit with the last tag, which
// no rule draws; pending and denied are the last two tags without the
// enforced bit; the packet marks Pending, Allowed and Denied the three
// before them, without it, so no rule's mark, and no conntrack mark
// copied into the packet mark, is a verdict. It needs 3 tag bits. A
// reload keeps the fast-allowed connections while every rule that covers
// TCP (and the NAT64 prefixes) is unchanged, and cuts them all
// otherwise: they share one tag, so the look cannot tell whose rule
// changed. Pending and denied connections lack the enforced bit and are
// not looked at (a pending one is decided by userspace under the policy
// it has then). Rules draw their tags from one fewer with the fast path,
// so a restart that turns it on or off moves them: the start reads the
// earlier run's marks with its setting (Deps.PreviousFastPath; read both
// ways when not known), and a mark that one ruleset reads as
// fast-allowed and another as a rule's is decided again, never kept by
// either reading. [Firewall.DropFastPath] turns the fast path off while
// running (its queue's reader is gone): the ruleset goes in again
// without it and the marks are read as at a reload, the rulesets with
// it among those they can come from, so the fast-allowed connections
// are decided again (to a fast port, which forward leaves to the proxy:
// cut) and the rules' connections keep their rules under the tags they
// have without it.
//
// [Render] turns a policy and a [Config] into a [Ruleset] without touching
// the kernel (egressd firewall print shows it); [Firewall.Install],
// [Firewall.Replace] and [Firewall.Remove] apply it in one netlink batch each
// (delete and recreate the table in a single transaction), which needs
// CAP_NET_ADMIN. A reload never flushes conntrack, so established connections
// (including redirected ones, whose NAT binding lives in conntrack) survive,
// but for the forwarded ones the new policy no longer allows (above).
//
// # Modes and failure
//
// Enforce fails closed. The ruleset lives in the kernel, not in the process:
// if egressd is killed, TCP and DNS from the LAN are still redirected to the
// gateway's own ports, where nothing listens any more, so new connections are
// refused and queries get "port unreachable"; UDP outside the sets and
// everything else forwarded from the LAN is still dropped. Nothing new gets
// out until egressd is back. (Learned addresses age out of their sets on
// their own timeouts.)
//
// Audit fails open, and this package guarantees it by installing nothing
// that can block: no redirect, no drop, no reject. In audit mode capture/
// observes the LAN interfaces passively (AF_PACKET sees a copy of every
// packet) and the kernel forwards as it did before egressd; dnsfilter and the
// proxy are only used by clients that are pointed at them. A redirect would
// make the site depend on egressd's listeners being alive (a kill -9 would
// then cut every TCP connection and every DNS query), so audit mode has none;
// the audit table is empty unless the operator asked for one of two things
// that do not depend on egressd running:
//
//   - masquerade (Config.Masquerade), which is what lets the LAN out at all
//     when egressd's box is the router: it stays in the kernel if egressd
//     dies, so it keeps the site connected rather than cutting it off;
//   - the WAN inbound guard (Config.GuardWAN), dropping new connections that
//     arrive from the WAN interface. It is off by default in audit mode,
//     because a drop in our table cannot be overridden by an accept in the
//     operator's own tables: if the site relies on an inbound service (a
//     port forward, a VPN endpoint, remote management), a default guard
//     would cut it off during a rollout whose promise is that nothing
//     breaks. Outbound flows and their replies are never affected by it. In
//     enforce mode the guard is always on when Config.WAN is set (the seed
//     policy needs no inbound ports).
//
// A clean stop ([Firewall.Close]) removes the whole table, masquerade
// included: a gateway that must keep routing while egressd is stopped
// should have its NAT in the system's own nftables configuration and leave
// Config.Masquerade off. In enforce mode a removal also lifts enforcement
// until egressd is back; [Firewall.Detach] instead leaves the ruleset in the
// kernel, as a kill -9 would, so that a restart stays fail-closed (the next
// Install replaces the table in one transaction).
package firewall
