// Package policy is the leaf of egressd: it parses and validates the YAML
// policy, compiles it into a matcher, and answers one question for every other
// component: given a flow (client, destination address, port, protocol and,
// where known, the destination name and HTTP path), which rule allows it, or
// none.
//
// The flow through egressd is: proxy/, dnsfilter/ and capture/ observe
// traffic, ask an [Engine] (usually through a [Store], which swaps engines
// atomically on reload) for a [Decision], act on it in enforce mode, and
// record it with audit/. This package imports no other package of egressd.
//
// Matching semantics, as vendor pages mean them:
//
//   - names compare case-insensitively, without a trailing dot, in their
//     ASCII (punycode) form; names seen on the wire must already be ASCII
//     letters, digits, '-', '_' and '.', anything else never matches;
//   - "*.example.com" matches subdomains at any depth, never the apex;
//   - a '*' inside a label ("api-*.example.com") stays within that label;
//   - "host/path-glob" matches a request's host and path; when the path is
//     unknown (HTTPS without inspection) it applies at host level; on
//     cleartext that shows no HTTP/1 path (Input.NoPath: h2c with prior
//     knowledge, other protocols) it does not match;
//   - CIDRs and IPs match the destination address (IPv4-mapped IPv6 is
//     matched as IPv4); "private" is RFC 1918 plus ULA; "*" is anything;
//   - iCloud Private Relay's ingress names, mask.icloud.com and
//     mask-h2.icloud.com, match only a target that names them exactly:
//     no wildcard, "*" or CIDR allows a flow or a query named for them
//     (ReasonPrivateRelay, relay.go);
//   - ports are TCP or UDP ports ("any" is both) or "icmp", ICMP and
//     ICMPv6 echo request, which a flow asks for as Proto ICMP, port 0;
//   - the first matching rule in file order is credited.
package policy
