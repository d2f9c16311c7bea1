package proxy

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"html/template"
	"log/slog"
	"net"
	"net/netip"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"egressd/audit"
	"egressd/policy"
)

// Config is the proxy's part of egressd's configuration. The zero value of
// every field is a working default, documented on the field.
type Config struct {
	// TransparentAddr is where the transparent listener listens (the target
	// of the nftables REDIRECT), e.g. "[::]:15001". Empty: no transparent
	// listener is opened by Run (Serve can still be given one).
	TransparentAddr string
	// ExplicitAddr is where the explicit HTTP/CONNECT proxy listens, e.g.
	// "192.168.1.1:3128". Empty: off (ServeExplicit can still be given a
	// listener).
	ExplicitAddr string
	// ExplicitMore are further addresses the explicit proxy listens on,
	// each as ExplicitAddr (egressd run: the addresses of its LAN
	// interfaces after the first). Used only with ExplicitAddr.
	ExplicitMore []string
	// DropTransparentFrom and DropExplicitFrom are the index of an
	// interface whose packets the transparent and the explicit listener
	// drop: a classic BPF socket filter on the listening socket
	// (netutil.DropFromInterface) drops the SYNs, so a client over that
	// interface gets no handshake, whatever address it connects to; the
	// connections accepted inherit it. egressd run gives the WAN
	// interface's (never an open proxy on the WAN side). Zero: no filter.
	// Proxy.SetDropFrom changes them while the proxy runs.
	DropTransparentFrom, DropExplicitFrom int

	// HelloTimeout bounds the whole TLS ClientHello or HTTP request head,
	// from accept to the last byte (slowloris). Zero: 10 s.
	HelloTimeout time.Duration
	// FirstByteWait is how long the transparent proxy waits for the
	// client's first byte before it treats the connection as a protocol
	// where the server speaks first and decides on the address. Zero: 1 s.
	FirstByteWait time.Duration
	// HelloMaxBytes caps the bytes read to find a ClientHello or an HTTP
	// head. Zero: 64 KiB. A ClientHello is capped at 64 KiB of records
	// whatever it says (tlshello.MaxBytes, capture's cap too).
	HelloMaxBytes int
	// DialTimeout bounds the connect to the destination. Zero: 10 s.
	DialTimeout time.Duration
	// KeepAlive is the TCP keepalive period on both sides of a tunnel
	// (on the destination's side it is set 5 to 10 s into the tunnel's
	// life: most connections end before they could need it). Zero: 30 s;
	// negative: keepalive off. Established tunnels have no idle timeout
	// (a device's VPN over 443 lives for days): keepalive is what finds
	// dead peers.
	KeepAlive time.Duration
	// HalfCloseTimeout bounds how long a tunnel stays open once one side
	// has closed its half and the other sends nothing: the bytes still
	// flowing keep it open, silence ends it (reason "half-close-timeout").
	// Without it a client that closes toward an origin that never answers
	// and never closes would hold two sockets for good. Zero: 30 s;
	// negative: no limit.
	HalfCloseTimeout time.Duration
	// LookupTimeout bounds the fresh lookup of a name whose destination was
	// not handed out by our DNS. Zero: 3 s.
	LookupTimeout time.Duration

	// MaxConns caps concurrent connections over all clients. Zero: 50,000;
	// negative: no cap.
	MaxConns int
	// MaxConnsPerClient caps concurrent connections of one client: a LAN
	// device, all its addresses together, where Deps.Devices names one
	// for the address, else the address.
	// Zero: 5,000; negative: no cap.
	MaxConnsPerClient int
	// PeekBudget bounds the bytes that the ClientHellos and request heads
	// being read hold, all connections together, beyond the first 4 KiB
	// of each (peekbudget.go), one client (as for MaxConnsPerClient) a
	// tenth of it; a
	// connection whose hello or head does not fit is refused
	// (connection-limit). Zero: 16 MiB; negative: no bound.
	PeekBudget int

	// DenyPage is the body of the HTTP 403 answer, an html/template
	// executed with a DenyInfo. Empty: a short built-in page.
	DenyPage string

	// Inspect turns on decryption of connections to hosts that have
	// host/path rules, so that each request is decided on host and path.
	// All other hosts stay spliced. It needs StateDir, where the CA is
	// generated on first use (see LoadOrCreateCA): when Run starts, or at
	// the first inspected connection of a proxy served without Run. The
	// host's leaves are signed by signLeaf, not by goproxy.
	Inspect bool
	// StateDir holds the inspection CA (ca.pem, ca-key.pem).
	StateDir string
	// UpstreamRoots verifies upstream certificates where the proxy itself
	// talks TLS to the destination (inspected connections). Nil: the
	// system's roots. Certificates are always verified.
	UpstreamRoots *x509.CertPool

	// ProxyUsers, when not empty, makes the explicit proxy require HTTP
	// Basic proxy authentication with one of these user → password pairs
	// (answering 407 otherwise).
	ProxyUsers map[string]string
	// ProxyUserDigests does the same with a hash of each user's password
	// instead of the password (egressd run --proxy-users): bcrypt, or the
	// unsalted SHA-256 digest. A name may be in one of the two maps, not
	// both.
	ProxyUserDigests map[string]UserSecret

	// AllowSpecial lists destination prefixes that the special-range guard
	// lets through even without a CIDR rule naming them (for sites whose
	// "internet" is one of these ranges). Empty: none.
	AllowSpecial []netip.Prefix
	// OwnAddrs are the gateway's own addresses, denied as destinations
	// unless a CIDR rule names them. Nil: the addresses of the local
	// interfaces, read when Run or Serve starts. Proxy.SetOwnAddrs
	// replaces them while the proxy runs.
	OwnAddrs []netip.Addr

	// FastMarks are the packet-mark values the fast path's verdicts set
	// (ServeQueue; egressd run fills them from firewall.FastMarks). Used
	// only by ServeQueue.
	FastMarks FastMarks
	// FastFlows bounds the fast path's flow table (connections it took
	// and is deciding, those decided in the last 30 s, and those allowed
	// in the last 10 minutes whose client has not spoken yet); a SYN past it,
	// or past a client's eighth of it (its flows not handed to the kernel
	// yet), goes to the proxy. Zero: 16,384.
	FastFlows int
	// FastPorts are the destination ports whose SYNs the fast path may
	// take; a SYN to another port goes to the proxy. Nil: 443 only. A
	// plain HTTP request on a fast connection is refused
	// (ReasonFastPathHTTP), so a port that carries HTTP belongs here
	// only if refusing it is meant.
	FastPorts []uint16

	// fastDecided is a test hook: when set, the fast path's decide calls
	// it once the peek has decided a flow, before the held packets get
	// their verdicts (a test queues a segment then). Set in the Config
	// given to New, it is read-only while the proxy runs, so parallel
	// tests, each with its own proxy, do not share it.
	fastDecided func(flowKey)
	// fastRecording is a test hook: when set, the fast path's decision
	// calls it once the flow's state is set, before the flow's event is
	// written (a test queues the first segment of a flow allowed with
	// nothing marked then). Read-only while the proxy runs.
	fastRecording func(flowKey)
	// fastWorker is a test hook: when it says so for a flow, its
	// decision is a worker's even on a complete ClientHello (a test
	// queues a segment while a worker decides, which the queue's
	// goroutine, deciding, cannot take meanwhile).
	fastWorker func(flowKey) bool
	// fastKeep and fastKeepSilent are test settings: how long a decided
	// flow stays in the fast path's table (zero: fastKeep, 30 s), and
	// one allowed with no packet marked yet (zero: fastKeepSilent, 10 min),
	// so that a test need not wait for them.
	fastKeep, fastKeepSilent time.Duration
	// fastHandshake is a test setting: the handshake's allowance added
	// to the fast path's first-byte wait, which runs from the SYN
	// (fastFirstByteWait; zero: deferAcceptWait, 1 s).
	fastHandshake time.Duration
}

// Deps are the proxy's collaborators; cmd/ wires them.
type Deps struct {
	// Policy decides every flow. Required.
	Policy *policy.Store
	// Sink receives one event per connection. Nil: audit.Discard.
	Sink audit.Sink
	// Logger gets the canonical line per connection. Nil: slog.Default().
	Logger *slog.Logger
	// Registerer gets the proxy's metrics. Nil: not registered.
	Registerer prometheus.Registerer
	// DNS says which names our DNS gave an address out for. Nil: none
	// (only CIDR rules and fresh lookups then vouch for a destination).
	DNS DNSFacts
	// Resolver looks names up through the configured upstreams, for the
	// explicit proxy and for destinations DNS did not hand out. Nil: no
	// fresh lookups (the explicit proxy then refuses names).
	Resolver Resolver
	// Dial connects to destinations. Nil: a net.Dialer (the context it is
	// given carries DialTimeout).
	// Tests use it to dial from inside a network namespace.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// Conntrack gives back the client's own source address and port of a
	// redirected connection whose source NAT remapped (see
	// netutil.Conntrack). Nil: the proxy opens a netutil.Conntrack in its
	// own network namespace when the first connection needs it. Tests pass
	// one opened inside the gateway's namespace.
	Conntrack Conntrack
	// MACs tells a client's MAC address, for a policy whose rules name
	// clients by MAC (policy.Engine.HasMACs). Nil means no client has one:
	// such rules match none of the proxy's clients.
	MACs ClientMACs
	// Devices tells which device of the LAN a client address is, so that
	// a device's addresses share one client's connection cap and peek
	// budget share. Nil means each address is a client of its own.
	Devices ClientDevices
	// Accepted, when set, is told each connection the transparent
	// listener accepts (the client's address and port as the socket has
	// them, its original destination), once the destination is read,
	// before the proxy decides it: the proxy writes the connection's
	// decision line. In egressd capture is told (capture.ProxyAccepted),
	// which sees the connection on the LAN too and then writes none. It
	// reports true where the connection's line is written already
	// (capture reported the connection first, its client gone before the
	// proxy took it from its queue): the proxy writes the event only.
	// ended says whether the client had ended the connection (a reset or
	// a FIN seen: the socket is no longer established) when it was
	// accepted: only such a one can capture have reported already. It
	// reads the socket's TCP_INFO, a system call, so Accepted asks it
	// only where that matters (capture: where it lined the connection's
	// 4-tuple), and only during the call.
	Accepted func(client, dest netip.AddrPort, ended func() bool) (lined bool)
	// Inject sends the fast path's deny answers and resets (ServeQueue).
	// Nil: none sent (a denied fast connection's packets are dropped).
	Inject Injector
}

// ClientDevices tells the device of a LAN client address, where a
// device's addresses share one client's limits. In egressd, cmd/egressd
// wires the LAN interfaces' neighbour tables (netutil.Devices.Device).
type ClientDevices interface {
	// ClientDevice returns the MAC address of client's device; nil when
	// it has none (a client behind a router, one the neighbour table does
	// not know): the address is then a client of its own. It may wait
	// briefly for the kernel: the proxy asks when an address holds no
	// connection yet, and again at doubling counts while it has none.
	// The caller does not modify the result.
	ClientDevice(client netip.Addr) net.HardwareAddr
}

// ClientMACs tells a LAN client's MAC address, for policies whose rules
// name clients by MAC (policy.Input.ClientMAC). In egressd, cmd/egressd
// wires the LAN interfaces' neighbour tables (netutil.Devices.MAC): the
// proxy sees a connection's client address only, never its frames.
type ClientMACs interface {
	// ClientMAC returns client's MAC address; nil when it has none (a
	// client behind a router, whose address is not on the LAN's link, or
	// one the neighbour table does not know). It may wait briefly for the
	// kernel: the proxy asks once per connection, and only while the
	// policy names MAC addresses. The caller does not modify the result.
	ClientMAC(client netip.Addr) net.HardwareAddr
}

// Conntrack looks up the original source of a connection in the kernel's
// connection tracking table: local and remote are the accepted socket's
// ends (conntrack's reply tuple). *netutil.Conntrack implements it.
type Conntrack interface {
	OriginalSource(local, remote netip.AddrPort) (netip.AddrPort, error)
}

// DNSFacts is what the proxy needs to know from the DNS forwarder.
type DNSFacts interface {
	// NamesFor returns the normalised names our DNS gave addr out for to
	// client, whose answers have not expired; when it gave client none,
	// those it gave another address of client's device (egressd run: one
	// MAC in the LAN's neighbour table, netutil.Devices), as a
	// dual-stack device asks from one address and connects from another.
	// Nil or empty: none.
	NamesFor(client, addr netip.Addr) []string
}

// Resolver is a fresh lookup through the configured upstream resolvers.
type Resolver interface {
	LookupNetIP(ctx context.Context, name string) ([]netip.Addr, error)
}

// DenyInfo is what the deny page template gets.
type DenyInfo struct {
	Host   string // the name or address that was refused
	Path   string // the request path, when known
	Client string
	Rule   string // the rule that would have allowed it (expired), if any
	Reason string
	Policy string // the policy's name (profile name, or file name without .yaml), never its path
}

// Defaults.
const (
	defaultHelloTimeout      = 10 * time.Second
	defaultFirstByteWait     = time.Second
	defaultHelloMaxBytes     = 64 << 10
	defaultDialTimeout       = 10 * time.Second
	defaultKeepAlive         = 30 * time.Second
	defaultLookupTimeout     = 3 * time.Second
	defaultHalfCloseTimeout  = 30 * time.Second
	defaultMaxConns          = 50000
	defaultMaxConnsPerClient = 5000
	defaultPeekBudget        = 16 << 20
)

const defaultDenyPage = `<!doctype html>
<html><head><meta charset="utf-8"><title>Blocked by egressd</title></head>
<body><h1>Blocked by egressd</h1>
<p>The connection to <b>{{.Host}}{{.Path}}</b> was blocked by the site's egress policy
{{- if .Policy}} (<code>{{.Policy}}</code>){{end}}.</p>
<p>Reason: <code>{{.Reason}}</code>{{if .Rule}}; rule <code>{{.Rule}}</code>{{end}}. Client: {{.Client}}.</p>
<p>Ask the administrator to add a rule if this destination is needed.</p>
</body></html>
`

// withDefaults fills in zero fields.
func (c Config) withDefaults() Config {
	if c.HelloTimeout == 0 {
		c.HelloTimeout = defaultHelloTimeout
	}
	if c.FirstByteWait == 0 {
		c.FirstByteWait = defaultFirstByteWait
	}
	if c.HelloMaxBytes == 0 {
		c.HelloMaxBytes = defaultHelloMaxBytes
	}
	if c.DialTimeout == 0 {
		c.DialTimeout = defaultDialTimeout
	}
	if c.KeepAlive == 0 {
		c.KeepAlive = defaultKeepAlive
	}
	if c.HalfCloseTimeout == 0 {
		c.HalfCloseTimeout = defaultHalfCloseTimeout
	}
	if c.LookupTimeout == 0 {
		c.LookupTimeout = defaultLookupTimeout
	}
	if c.MaxConns == 0 {
		c.MaxConns = defaultMaxConns
	}
	if c.MaxConnsPerClient == 0 {
		c.MaxConnsPerClient = defaultMaxConnsPerClient
	}
	if c.PeekBudget == 0 {
		c.PeekBudget = defaultPeekBudget
	}
	if c.FastFlows <= 0 {
		c.FastFlows = defaultFastFlows
	}
	if c.fastKeep <= 0 {
		c.fastKeep = fastKeep
	}
	if c.fastKeepSilent <= 0 {
		c.fastKeepSilent = fastKeepSilent
	}
	if c.fastHandshake <= 0 {
		c.fastHandshake = deferAcceptWait
	}
	if c.FastPorts == nil {
		c.FastPorts = defaultFastPorts
	}
	if c.DenyPage == "" {
		c.DenyPage = defaultDenyPage
	}
	return c
}

// Validate returns every problem of the configuration at once.
func (c Config) Validate() error {
	var errs []error
	addrs := []struct{ name, v string }{{"transparent", c.TransparentAddr}, {"explicit", c.ExplicitAddr}}
	for _, a := range c.ExplicitMore {
		addrs = append(addrs, struct{ name, v string }{"explicit", a})
	}
	if len(c.ExplicitMore) > 0 && c.ExplicitAddr == "" {
		errs = append(errs, errors.New("proxy: more explicit listen addresses without the first (ExplicitAddr)"))
	}
	for _, a := range addrs {
		if a.v == "" {
			continue
		}
		if _, _, err := net.SplitHostPort(a.v); err != nil {
			errs = append(errs, fmt.Errorf("proxy: %s listen address %q: %v", a.name, a.v, err))
		}
	}
	if c.DropTransparentFrom < 0 || c.DropExplicitFrom < 0 {
		errs = append(errs, fmt.Errorf("proxy: interface index %d, %d: negative", c.DropTransparentFrom, c.DropExplicitFrom))
	}
	if c.HelloTimeout < 0 || c.FirstByteWait < 0 || c.DialTimeout < 0 || c.LookupTimeout < 0 {
		errs = append(errs, errors.New("proxy: timeouts must not be negative"))
	}
	if c.HelloMaxBytes < 0 || (c.HelloMaxBytes > 0 && c.HelloMaxBytes < 1024) {
		errs = append(errs, fmt.Errorf("proxy: hello size cap %d: at least 1024 bytes", c.HelloMaxBytes))
	}
	if c.Inspect && c.StateDir == "" {
		errs = append(errs, errors.New("proxy: inspection needs a state directory for its CA"))
	}
	if c.DenyPage != "" {
		if _, err := template.New("deny").Parse(c.DenyPage); err != nil {
			errs = append(errs, fmt.Errorf("proxy: deny page template: %w", err))
		}
	}
	for u := range c.ProxyUsers {
		if u == "" {
			errs = append(errs, errors.New("proxy: a proxy user has an empty name"))
		}
		if _, ok := c.ProxyUserDigests[u]; ok {
			errs = append(errs, fmt.Errorf("proxy: proxy user %q has both a password and a digest", u))
		}
	}
	for u := range c.ProxyUserDigests {
		if u == "" {
			errs = append(errs, errors.New("proxy: a proxy user has an empty name"))
		}
	}
	return errors.Join(errs...)
}
