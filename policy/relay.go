package policy

// iCloud Private Relay (THREATS.md B3, B4). An Apple device with Private
// Relay on sends its traffic through an ingress relay that Apple runs:
// QUIC to mask.icloud.com on UDP 443, or HTTP/2 CONNECT to
// mask-h2.icloud.com on TCP 443 when QUIC fails. Past that hop egressd
// sees one TLS connection to Apple, so a rule that lets the ingress
// through (Apple's 17.0.0.0/8, which Apple's device-management
// requirements ask for, "*.icloud.com", or "*") would be a tunnel around
// every other rule. Apple's guidance for networks that must not carry it
// ("Prepare your network or web server for iCloud Private Relay") is to
// answer the two names negatively in DNS: the device then turns Private
// Relay off for that network and connects directly.
//
// So the two names are decided by rules that name them exactly, and by no
// other: not by a wildcard or an in-label glob, not by "*", not by a CIDR
// that holds the relay's address. Where no such rule allows the flow or
// the query, the decision is a deny with ReasonPrivateRelay (or the reason
// an exact rule gives: its port, its clients, its expiry). The DNS
// forwarder answers such queries NXDOMAIN in every mode, and the proxies
// and capture see the deny through Decide like any other.

// The relay's ingress names, in normal form.
const (
	PrivateRelayQUIC = "mask.icloud.com"    // QUIC, UDP 443
	PrivateRelayH2   = "mask-h2.icloud.com" // HTTP/2 CONNECT over TLS, TCP 443: the fallback
)

// IsPrivateRelay reports whether name, in normal form (NormalizeName), is
// one of Private Relay's ingress names.
func IsPrivateRelay(name string) bool {
	return name == PrivateRelayQUIC || name == PrivateRelayH2
}
