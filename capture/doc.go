// Package capture is egressd's passive flow auditor. It sees every packet a
// LAN client sends (live from the LAN interfaces through an AF_PACKET ring
// each, or offline from a pcap or pcapng file), decodes it with gopacket without
// per-packet allocations, tracks 5-tuple flows, finds the best name for each
// flow (TLS SNI over reassembled TCP and the SNI of decrypted QUIC Initial
// packets, read by internal/tlshello, the proxy's ClientHello parser; the
// HTTP Host header; names learned from DNS answers on the wire and from
// egressd's own DNS forwarder), classifies the flow with the policy and
// emits one audit.Event per flow into the ledger. A plain-HTTP connection
// it follows past its first request with the proxy's request follower
// (httpwire.ReqStream), as the transparent proxy does, and emits a request
// event (audit.KindRequest) for each later request, decided on its own
// Host and path, in audit mode and offline (follow.go). A rule that
// names clients by MAC is matched as the part that decides the flow in
// enforce mode sees the client: the flows the proxy or the DNS forwarder
// decide by the LAN's neighbour table (Deps.MACs, as they ask it: a client
// behind a router has no MAC there), the flows nftables forwards by the
// frame's source address; offline, by the frames.
// A flow started from outside the LAN toward a LAN host (its first
// packet sent out of a LAN interface by the gateway: from the WAN side)
// is no client's egress: it is recorded denied as ReasonInbound in audit
// mode, counted only in enforce mode (proc.go, inbound). Packets of other
// IP protocols than TCP and UDP (ICMP echo, GRE, ESP, tunnels) are flows
// per client, destination and protocol, denied as ReasonProtocol
// (other.go), but those an ICMP or ICMPv6 echo request starts: the policy
// decides them with the protocol icmp, as the firewall does.
// LAN packets enforce mode's gateway hardening drops before any rule (a
// source the LAN interface does not route back to, a loopback
// destination, Router Advertisements and redirects to the gateway) are
// recorded in their flows in both modes, denied with reasons of their own
// (guard.go); a live socket's source is checked with a cached route
// lookup in the sockets' namespace.
//
// It sits beside the proxy and the DNS forwarder: policy decides, capture
// observes, audit counts. In audit mode it is how egressd sees everything
// without touching traffic; in enforce mode it records what was dropped.
// Capture never changes what is forwarded: when it is overloaded it drops
// observations, never packets.
package capture
