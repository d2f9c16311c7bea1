// Package dnsfilter is egressd's filtering DNS forwarder: the resolver LAN
// clients use (nftables redirects UDP and TCP port 53 to it). It resolves
// only what the policy lets each client resolve ("DNS follows the names",
// policy.Engine.DecideName) and never sends a denied name upstream in
// enforce mode, because the query itself is the exfiltration channel
// (THREATS.md E1). The canaries of clients that would take their traffic
// elsewhere (Firefox's DoH, iCloud Private Relay's ingress) are answered
// NXDOMAIN here in every mode (THREATS.md B3).
//
// Where it sits in the flow: a query arrives on a UDP or TCP listener, goes
// through the chain in [Server.handle] (sanity, rate limit, hardening, policy,
// cache, forward), and is answered; every query ends in one canonical slog
// line and one audit.Event (Kind dns, Source dnsfilter). Answers to allowed
// queries, and in audit mode to the others too (with no rule), feed the
// learned-address [Table] (client, name asked, address, expiry), which the proxy (SNI versus destination) and capture (naming
// raw-IP flows; judging forwarded ones as the firewall's learned sets, fed
// from the same answers, would) read through small interfaces of their own. Before an
// allowed answer is written, its addresses go to the firewall (nftables
// sets, through the [Firewall] interface of Deps) and the answer waits,
// briefly, until they are there. cmd/ wires them. The package imports
// policy/ and audit/ only, and internal/netutil for the socket filter that
// keeps the WAN side out (Config.DropUDPFrom, sockfilter.go).
//
// Hot path: UDP queries whose answer is cached are answered from the packed
// wire form of the cached answer without unpacking the query into a
// dns.Msg (see fastpath.go), by a reader that takes queries in batches
// (recvmmsg; with Config.UDPRawReads it waits in recvmmsg itself, off the
// netpoller: rawudp_linux.go); misses are sent
// upstream by the listener's reader and answered by the upstream socket's
// reader, in batches (missasync.go, udpmux.go); everything else takes the
// general path on github.com/miekg/dns (v1, kept behind this package).
package dnsfilter
