package dnsfilter

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"time"
)

// DenyAnswer says how a denied query is answered in enforce mode.
type DenyAnswer string

// The deny answers.
const (
	// DenyRefused answers REFUSED (the default): the client does not retry
	// elsewhere with the same resolver and nothing is cached downstream.
	DenyRefused DenyAnswer = "REFUSED"
	// DenyNXDomain answers NXDOMAIN with a synthesised SOA in the authority
	// section, so downstream caches keep the denial for DenyTTL (RFC 2308).
	DenyNXDomain DenyAnswer = "NXDOMAIN"
	// DenyNull answers A queries with 0.0.0.0 and AAAA queries with ::
	// (other types get an empty NOERROR with the SOA).
	DenyNull DenyAnswer = "null"
)

// Config is the forwarder's configuration. Every field's zero value means
// the documented default, so Config{} is a working forwarder on port 53
// that forwards to the resolvers of /etc/resolv.conf. A Config is read by
// New and must not be changed afterwards.
type Config struct {
	// Listen are the addresses served on both UDP and TCP. Empty means
	// ":53" (every local address). A port 0 picks one free port that UDP
	// and TCP then share (tests); see Server.Addrs. For UDP, a wildcard
	// ("" or "::") opens an IPv4 socket and an IPv6-only one (IPv4 clients
	// are then read and answered in batches), and "0.0.0.0" IPv4 only.
	Listen []string

	// Upstreams are the resolvers queried, "ip" or "ip:port" (port 53 by
	// default), tried in order with failover. Empty means the nameservers
	// of ResolvConf.
	Upstreams []string
	// ResolvConf is read when Upstreams is empty. Empty means
	// "/etc/resolv.conf".
	ResolvConf string

	// UpstreamTimeout bounds one attempt at one upstream. Zero means 1.5s.
	UpstreamTimeout time.Duration
	// QueryTimeout bounds the whole resolution of a query, failover
	// included; when it passes the client gets SERVFAIL. Zero means 4s.
	QueryTimeout time.Duration
	// DownAfter is the number of consecutive failures (timeouts, network
	// errors) after which an upstream is considered down and skipped while
	// others are healthy. Zero means 3.
	DownAfter int
	// DownFor is how long a down upstream is skipped before a query probes
	// it again (doubling on each failed probe, up to 16 times). Zero means
	// 5s.
	DownFor time.Duration
	// MaxInflight caps the queries waiting for an upstream at once; beyond
	// it new misses get SERVFAIL at once (THREATS.md G2). Zero means 4096.
	MaxInflight int

	// Deny is the enforce-mode answer to denied names. Empty means
	// DenyRefused.
	Deny DenyAnswer
	// DenyTTL is the TTL of synthesised denials (SOA, null addresses).
	// Zero means 60s.
	DenyTTL time.Duration

	// KeepECH keeps the "ech" parameter of HTTPS/SVCB answers. False (the
	// default) strips it, so clients send a readable SNI that the proxy
	// can check (THREATS.md B2).
	KeepECH bool
	// AllowPrivateAnswers turns off the rebinding filter. False (the
	// default) drops private, loopback, link-local and other special
	// addresses from answers to names outside PrivateSuffixes (THREATS.md
	// E3).
	AllowPrivateAnswers bool
	// PrivateSuffixes are names whose answers may hold private addresses
	// (the site's own names). Nil means "local", "lan", "internal",
	// "home.arpa", "localhost" and the reverse zones "in-addr.arpa" and
	// "ip6.arpa"; an empty non-nil slice means none.
	PrivateSuffixes []string

	// CacheSize bounds the number of cached answers. Zero means 10000;
	// negative disables the cache.
	CacheSize int
	// MaxTTL caps the time an answer is cached. Zero means 1h.
	MaxTTL time.Duration
	// MaxNegativeTTL caps the time a negative answer (NXDOMAIN, NODATA, with
	// an SOA) is cached (RFC 2308). Zero means 15m.
	MaxNegativeTTL time.Duration

	// LearnTimeout bounds the wait for Deps.Firewall before an allowed
	// answer is written. When it passes the answer is sent anyway (the
	// firewall goes on writing the addresses; the client's first packets
	// may meet a closed set) and the miss is counted in
	// egress_dnsfilter_firewall_learn_total{result="timeout"}. Zero means
	// 250ms.
	LearnTimeout time.Duration

	// TableSize bounds the learned-address table (client, name, address
	// entries). Zero means 65536.
	TableSize int

	// ClientRate is the sustained queries per second allowed from one
	// client: a LAN device, all its addresses together, where
	// Deps.Devices names one for the address, else the address; queries
	// beyond it are dropped (UDP) or REFUSED (TCP).
	// Zero means 500; negative disables the limit.
	ClientRate float64
	// ClientBurst is the token-bucket depth of ClientRate. Zero means
	// 4 × ClientRate (at least 100).
	ClientBurst int

	// TunnelThreshold is the number of distinct names one client may send
	// upstream under one wildcard rule's zone in TunnelWindow before the
	// forwarder raises an alarm (THREATS.md E2: a canonical Warn line, an
	// audit event of Kind alarm, egress_dnsfilter_tunnel_alarms_total);
	// the queries are answered all the same. The same threshold sets the
	// zone-wide alarm's (twice it, all clients together: dns-tunnel-zone)
	// and the long window's (ten times it in sixty windows:
	// dns-tunnel-slow; twenty times it, all clients together:
	// dns-tunnel-zone-slow). Zero means 500; negative disables the alarms; at
	// most 5000 (the sketch's range).
	TunnelThreshold int
	// TunnelWindow is the fixed window TunnelThreshold counts in; the
	// long window is sixty of it. Zero means one minute.
	TunnelWindow time.Duration

	// UDPSize is the EDNS0 buffer size advertised to clients and upstreams
	// (DNS flag day 2020). Zero means 1232.
	UDPSize uint16
	// TCPIdleTimeout closes idle client TCP connections. Zero means 8s.
	TCPIdleTimeout time.Duration
	// TCPMaxQueries is the number of queries served on one client TCP
	// connection. Zero means 128.
	TCPMaxQueries int
	// TCPMaxConns bounds the client TCP connections open at once, over
	// every listen address; TCPMaxConnsPerClient those of one client (a
	// LAN device, as for ClientRate, or an address). A connection over either is closed as soon as it is
	// accepted (and counted, and logged at most once a second). Zero
	// means 256 and 16; negative disables the limit.
	TCPMaxConns          int
	TCPMaxConnsPerClient int
	// UDPReaders is the number of UDP sockets (SO_REUSEPORT) and reader
	// goroutines per listen address. Zero means one per processor
	// (GOMAXPROCS). On Linux an
	// IPv4 socket's reader takes and answers up to 16 queries per system
	// call (recvmmsg, sendmmsg) when they queue up.
	UDPReaders int
	// UDPRawReads takes the IPv4 listener sockets off Go's netpoller (on
	// Linux): their readers wait in recvmmsg themselves, on sockets the
	// netpoller does not watch. At tens of thousands of queries a second
	// that trims the latency tail (README, "DNS forwarder"), but a reader
	// blocked in that system call holds a Go processor until sysmon takes
	// it back, and each take sets sysmon polling busily again: in a
	// process that also proxies, as egressd run does, the proxy pays for
	// it (README, "The forwarder's readers in egressd run"). Off by
	// default: for a process that serves DNS alone. At most GOMAXPROCS-1
	// readers leave the netpoller (rawReaders).
	UDPRawReads bool

	// DropUDPFrom and DropTCPFrom are the index of an interface whose
	// packets the listening sockets drop, UDP and TCP: a classic BPF
	// socket filter on each of them (netutil.DropFromInterface), so a
	// client that reaches the forwarder over that interface gets neither
	// an answer nor a TCP handshake, whatever address it asked. egressd
	// run gives the WAN interface's (THREATS.md: never an open resolver
	// on the WAN side). The kernel runs the filter before it queues a
	// packet: the readers and their batches are unchanged. Zero: no
	// filter. Server.SetDropFrom changes them while the server runs.
	DropUDPFrom, DropTCPFrom int

	noBatch bool // tests: one datagram per system call on every socket
}

// Defaults used for zero fields.
const (
	defaultUpstreamTimeout = 1500 * time.Millisecond
	defaultQueryTimeout    = 4 * time.Second
	defaultDownAfter       = 3
	defaultDownFor         = 5 * time.Second
	defaultMaxInflight     = 4096
	defaultDenyTTL         = 60 * time.Second
	defaultCacheSize       = 10000
	defaultMaxTTL          = time.Hour
	defaultMaxNegativeTTL  = 15 * time.Minute
	defaultTableSize       = 65536
	defaultLearnTimeout    = 250 * time.Millisecond
	defaultClientRate      = 500
	defaultTunnelThreshold = 500
	defaultTunnelWindow    = time.Minute
	defaultUDPSize         = 1232
	defaultTCPIdle         = 8 * time.Second
	defaultTCPMaxQueries   = 128
	defaultTCPMaxConns     = 256
	defaultTCPMaxPerClient = 16
)

var defaultPrivateSuffixes = []string{"local", "lan", "internal", "home.arpa", "localhost", "in-addr.arpa", "ip6.arpa"}

// Validate returns every problem of c at once.
func (c Config) Validate() error {
	var errs []error
	for _, l := range c.Listen {
		if _, _, err := net.SplitHostPort(l); err != nil {
			errs = append(errs, fmt.Errorf("dnsfilter: listen address %q: %w", l, err))
		}
	}
	for _, u := range c.Upstreams {
		if _, err := parseUpstream(u); err != nil {
			errs = append(errs, err)
		}
	}
	switch c.Deny {
	case "", DenyRefused, DenyNXDomain, DenyNull:
	default:
		errs = append(errs, fmt.Errorf("dnsfilter: deny answer %q: want REFUSED, NXDOMAIN or null", c.Deny))
	}
	for name, d := range map[string]time.Duration{
		"upstream timeout": c.UpstreamTimeout, "query timeout": c.QueryTimeout, "down for": c.DownFor,
		"deny ttl": c.DenyTTL, "max ttl": c.MaxTTL, "max negative ttl": c.MaxNegativeTTL, "tcp idle timeout": c.TCPIdleTimeout,
		"learn timeout": c.LearnTimeout, "tunnel window": c.TunnelWindow,
	} {
		if d < 0 {
			errs = append(errs, fmt.Errorf("dnsfilter: %s %v is negative", name, d))
		}
	}
	if c.UpstreamTimeout > 0 && c.QueryTimeout > 0 && c.UpstreamTimeout > c.QueryTimeout {
		errs = append(errs, fmt.Errorf("dnsfilter: upstream timeout %v exceeds query timeout %v", c.UpstreamTimeout, c.QueryTimeout))
	}
	if c.UDPSize != 0 && c.UDPSize < 512 {
		errs = append(errs, fmt.Errorf("dnsfilter: udp size %d is below 512", c.UDPSize))
	}
	if c.DownAfter < 0 || c.MaxInflight < 0 || c.TableSize < 0 || c.ClientBurst < 0 || c.TCPMaxQueries < 0 || c.UDPReaders < 0 {
		errs = append(errs, errors.New("dnsfilter: counts must not be negative (except CacheSize, ClientRate, TCPMaxConns and TCPMaxConnsPerClient, where negative disables)"))
	}
	if c.TunnelThreshold > maxTunnelThreshold {
		errs = append(errs, fmt.Errorf("dnsfilter: tunnel threshold %d is above %d", c.TunnelThreshold, maxTunnelThreshold))
	}
	if c.DropUDPFrom < 0 || c.DropTCPFrom < 0 {
		errs = append(errs, fmt.Errorf("dnsfilter: interface index %d, %d: negative", c.DropUDPFrom, c.DropTCPFrom))
	}
	return errors.Join(errs...)
}

// withDefaults returns c with every zero field set to its default.
func (c Config) withDefaults() Config {
	if len(c.Listen) == 0 {
		c.Listen = []string{":53"}
	}
	if c.ResolvConf == "" {
		c.ResolvConf = "/etc/resolv.conf"
	}
	def := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	def(&c.UpstreamTimeout, defaultUpstreamTimeout)
	def(&c.QueryTimeout, defaultQueryTimeout)
	def(&c.DownFor, defaultDownFor)
	def(&c.DenyTTL, defaultDenyTTL)
	def(&c.MaxTTL, defaultMaxTTL)
	def(&c.MaxNegativeTTL, defaultMaxNegativeTTL)
	def(&c.TCPIdleTimeout, defaultTCPIdle)
	def(&c.LearnTimeout, defaultLearnTimeout)
	if c.UpstreamTimeout > c.QueryTimeout {
		c.UpstreamTimeout = c.QueryTimeout
	}
	if c.DownAfter == 0 {
		c.DownAfter = defaultDownAfter
	}
	if c.MaxInflight == 0 {
		c.MaxInflight = defaultMaxInflight
	}
	if c.Deny == "" {
		c.Deny = DenyRefused
	}
	if c.PrivateSuffixes == nil {
		c.PrivateSuffixes = defaultPrivateSuffixes
	}
	if c.CacheSize == 0 {
		c.CacheSize = defaultCacheSize
	}
	if c.TableSize == 0 {
		c.TableSize = defaultTableSize
	}
	if c.ClientRate == 0 {
		c.ClientRate = defaultClientRate
	}
	if c.ClientBurst == 0 {
		c.ClientBurst = max(100, int(4*c.ClientRate))
	}
	if c.TunnelThreshold == 0 {
		c.TunnelThreshold = defaultTunnelThreshold
	}
	if c.TunnelWindow == 0 {
		c.TunnelWindow = defaultTunnelWindow
	}
	if c.UDPSize == 0 {
		c.UDPSize = defaultUDPSize
	}
	if c.TCPMaxQueries == 0 {
		c.TCPMaxQueries = defaultTCPMaxQueries
	}
	if c.TCPMaxConns == 0 {
		c.TCPMaxConns = defaultTCPMaxConns
	}
	if c.TCPMaxConnsPerClient == 0 {
		c.TCPMaxConnsPerClient = defaultTCPMaxPerClient
	}
	return c
}

// parseUpstream turns "ip" or "ip:port" into an address.
func parseUpstream(s string) (netip.AddrPort, error) {
	if ap, err := netip.ParseAddrPort(s); err == nil {
		return ap, nil
	}
	if a, err := netip.ParseAddr(strings.TrimSuffix(strings.TrimPrefix(s, "["), "]")); err == nil {
		return netip.AddrPortFrom(a, 53), nil
	}
	return netip.AddrPort{}, fmt.Errorf("dnsfilter: upstream %q: want an IP address with an optional port", s)
}

// readResolvConf returns the nameservers of a resolv.conf file.
func readResolvConf(path string) ([]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("dnsfilter: upstreams: %w", err)
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) >= 2 && fields[0] == "nameserver" {
			a, err := netip.ParseAddr(fields[1])
			if err != nil {
				continue // e.g. a zone index we cannot dial
			}
			out = append(out, netip.AddrPortFrom(a, 53).String())
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("dnsfilter: upstreams: %s: %w", path, err)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("dnsfilter: upstreams: no nameserver in %s", path)
	}
	return out, nil
}
