// Package proxy is egressd's TCP egress point. nftables redirects every TCP
// connection from the LAN to its transparent listener; the proxy reads the
// original destination (SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST), peeks at
// the first bytes to find the destination's name (the TLS ClientHello's SNI,
// read from a recorded copy by internal/tlshello, the parser capture reads
// hellos with too, crypto/tls confirming hellos of unusual shape; or the
// HTTP/1.x Host),
// asks the
// policy (policy.Store) and then either splices the connection to the
// original destination or answers with a deny (a TLS alert, an HTTP 403, or
// a close). On plain HTTP/1.x the client-to-origin direction is not
// spliced but copied through a request-stream parser (httpwire.ReqStream, shared with capture) that
// finds and decides every later request on the connection too (Host,
// absolute target, path), refusing ambiguous framing (request smuggling);
// a denied later request gets the 403 after the origin's earlier responses
// and the connection closes. The origin-to-client direction stays spliced.
// Cleartext that is neither TLS nor HTTP/1.x (HTTP/2 with prior knowledge,
// another protocol, a client silent at first) is decided by address and
// the names dnsfilter gave out, with no path: a host that only host/path
// rules allow is refused there (path-unseen), as it is in a CONNECT tunnel
// that does not start with TLS. It also serves an explicit HTTP/CONNECT proxy built on goproxy
// for clients configured with HTTP(S)_PROXY and, when inspection is on and a
// CA exists in the state directory, decrypts connections to hosts that have
// host/path rules so that each request is decided on host and path. An
// inspected connection's cleartext (after the TLS, which the proxy
// terminates itself) goes through the request-stream parser before
// goproxy's net/http reads it, so that a head net/http would read
// otherwise (a Host line that disagrees with an absolute-form target,
// which net/http drops) is refused as on the transparent path.
//
// In the flow it sits after nftables and beside dnsfilter: it reads the
// addresses dnsfilter handed out through the small [DNSFacts] interface
// declared here (so that an allowed SNI cannot open a path to an arbitrary
// address), and it records one audit.Event and one canonical slog line per
// connection, plus one per later request of a plain-HTTP connection and
// one per request of an inspected connection (audit.KindRequest). It imports policy and audit, never another
// component.
package proxy
