package capture

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/prometheus/client_golang/prometheus"

	"egressd/audit"
	"egressd/internal/netutil"
	"egressd/policy"
)

// Config configures capture. The zero value of every field but
// Interfaces is a working default; Interfaces is needed only by Run.
type Config struct {
	// Interfaces are the LAN interfaces Run captures on (AF_PACKET), one
	// socket each, read by one goroutine into one flow table, their
	// packets in time-stamp order (live.go, nextHead). A packet the
	// gateway forwards from one of them to another crosses two sockets:
	// its flow counts it on the interface the flow's first packet came
	// in on, with its client's MAC address, and the copy on the other is
	// skipped (Stats.Copies). One that does not exist (yet), or is
	// re-made with another index, gets its socket when Follow sees it
	// (live.go). Empty means Run fails; ReadFile does not need it.
	Interfaces []string
	// MaxFlows bounds the flow table. 0 means 65536. When the table is full
	// the oldest-looking flow is ended early ("evicted") and counted. It
	// bounds too the flows capture ended while open and remembers for
	// when they resume (proc.go, remember).
	MaxFlows int
	// MaxLearned bounds the table of addresses learned from DNS answers on
	// the wire. 0 means 65536.
	MaxLearned int
	// TCPIdle ends a TCP flow that saw no packet for this long. 0 means 5m.
	TCPIdle time.Duration
	// UDPIdle ends a UDP flow that saw no packet for this long. 0 means 60s.
	UDPIdle time.Duration
	// MaxStreamBytes bounds the bytes held, across all flows, to read
	// names: the reassembly buffers of ClientHellos, HTTP request heads
	// and DNS over TCP (at most 64 KiB per flow and direction), QUIC
	// CRYPTO streams and the Initials waiting for keys, the Initial keys
	// of a QUIC flow's DCIDs but its first (about 1.3 KB each), and the bytes a
	// followed plain-HTTP connection holds between packets (a later head
	// or framing line not complete yet, segments out of order; never its
	// bodies). 0 means 64 MiB.
	// Without it, a client holding many connections with partial hellos
	// could make capture hold 64 KiB for each flow of the table (4 GiB at
	// the default MaxFlows). A flow whose next bytes would pass the bound
	// gives up its name search, as a flow past its own limit does (it is
	// decided by address), and is counted (Stats.StreamLimited); a
	// followed connection stops being followed (Stats.Unfollowed too).
	MaxStreamBytes int
	// RingMB is the size of the AF_PACKET ring in MiB. 0 means 64.
	RingMB int
	// FullFrames makes the live socket copy whole frames. By default a
	// filter cuts frames to what capture reads (see snapFilter in
	// live.go), so the ring holds far more packets under bulk load.
	FullFrames bool
	// ReportOpenAfter makes Run report a flow still open this long after
	// it started, then update it when it ends (see proc.go, "When a flow
	// is classified and reported"). 0 means 1m; ReadFile reports every
	// flow once, at its end.
	ReportOpenAfter time.Duration
	// OwnAddrs are the gateway's own addresses. A flow to or from one of
	// them is the gateway's own traffic, not egress (the firewall's
	// prerouting leaves it alone, and enforce mode does not drop it): a
	// client's connection to the explicit proxy, the admin page, ssh.
	// Such flows are counted (Stats.Own) and not recorded, so the report
	// shows no would-drop for them, nor a second flow beside the explicit
	// proxy's own event. DNS to the gateway is the exception: its
	// forwarder answers for the LAN, and policies credit those flows to a
	// port-53 rule (the seed's "dns"). Nil: Open (live capture) reads the
	// interfaces' addresses; ReadFile then knows none. SetOwnAddrs
	// replaces them while capture runs.
	OwnAddrs []netip.Addr
	// TCPPorts are the TCP ports enforce mode redirects to the transparent
	// proxy (egressd run --tcp-ports), TCP ranges. Nil means every port,
	// the default. With a list, a TCP flow to another port (and not to a
	// port of a host/path rule, which is redirected too) is one nftables
	// forwards or drops at its first packet by its destination address and
	// the addresses egressd's DNS gave out for a rule's names, without
	// reading SNI or Host: capture judges it so (see proc.go, redirected).
	TCPPorts []policy.PortRange
	// ProxyLines, when set, says whether the transparent proxy runs
	// beside capture (egressd run) and egressd's firewall redirects to
	// it, so that the proxy writes the decision line of each connection
	// enforce mode redirects: it is asked at a connection's first packet
	// (NAT applies to it), as either may change while capture runs (a proxy whose listener failed, a
	// firewall installed at a reload to enforce). Capture's report of
	// such a connection (live, TCP to a redirected port, opened in
	// enforce mode) is then an event only, with no line of its own: one
	// decision line per connection, the proxy's, which has the close
	// reason and the bytes relayed. The ledger counts the two events as
	// one flow, the proxy's. Nil, or false: nothing redirects to a
	// proxy (--no-firewall, a firewall that did not install, a proxy
	// not listening), the proxy never sees the connection, and capture's
	// line is its only one.
	ProxyLines func() bool
	// ProxyTells says that the transparent proxy, when it runs, tells
	// capture each connection it accepts (ProxyAccepted), as egressd run
	// wires it: then that word alone makes a connection's line the
	// proxy's, and one the firewall redirected that the proxy never
	// accepted (the kernel dropped its handshake's end on a full accept
	// queue and the client gave up) keeps capture's line. False:
	// ProxyLines and the handshake decide, as well as a word that came.
	ProxyTells bool
	// Firewall, when set, says whether egressd's firewall is installed,
	// so that enforce mode's drops are its nftables ruleset's (the
	// forward chain, the gateway hardening of guard.go). False
	// (--no-firewall, a firewall that did not install): nothing of
	// egressd's drops the packets capture sees, and a flow it records
	// denied in enforce mode is recorded as enforce would drop it, not
	// as dropped (Event.Enforced false), as in audit mode. Asked when a
	// flow or request is reported. Nil: as if installed (an offline
	// reading, a test).
	Firewall func() bool
}

// firewallDrops reports whether egressd's firewall is there to drop what
// enforce mode denies (Config.Firewall): else a deny is recorded not
// enforced.
func (c *Capture) firewallDrops() bool { return c.cfg.Firewall == nil || c.cfg.Firewall() }

// Validate returns every problem of the configuration.
func (c Config) Validate() error {
	var errs []error
	if c.MaxFlows < 0 {
		errs = append(errs, fmt.Errorf("capture: max flows %d is negative", c.MaxFlows))
	}
	if c.MaxStreamBytes < 0 {
		errs = append(errs, fmt.Errorf("capture: max stream bytes %d is negative", c.MaxStreamBytes))
	}
	if c.MaxLearned < 0 {
		errs = append(errs, fmt.Errorf("capture: max learned %d is negative", c.MaxLearned))
	}
	if c.TCPIdle < 0 || c.UDPIdle < 0 {
		errs = append(errs, errors.New("capture: idle timeouts must not be negative"))
	}
	if c.ReportOpenAfter < 0 {
		errs = append(errs, fmt.Errorf("capture: report-open-after %v is negative", c.ReportOpenAfter))
	}
	if c.RingMB < 0 || c.RingMB > 4096 {
		errs = append(errs, fmt.Errorf("capture: ring size %d MiB out of range 0..4096", c.RingMB))
	}
	for _, pr := range c.TCPPorts {
		if pr.Proto != policy.TCP || pr.Lo == 0 || pr.Lo > pr.Hi {
			errs = append(errs, fmt.Errorf("capture: tcp port range %v is not a TCP range", pr))
		}
	}
	return errors.Join(errs...)
}

func (c Config) withDefaults() Config {
	if c.MaxFlows == 0 {
		c.MaxFlows = 65536
	}
	if c.MaxLearned == 0 {
		c.MaxLearned = 65536
	}
	if c.MaxStreamBytes == 0 {
		c.MaxStreamBytes = 64 << 20
	}
	if c.TCPIdle == 0 {
		c.TCPIdle = 5 * time.Minute
	}
	if c.UDPIdle == 0 {
		c.UDPIdle = 60 * time.Second
	}
	if c.RingMB == 0 {
		c.RingMB = 64
	}
	if c.ReportOpenAfter == 0 {
		c.ReportOpenAfter = defaultOpenReport
	}
	return c
}

// Deps are capture's collaborators.
type Deps struct {
	// Policy classifies flows. Required.
	Policy *policy.Store
	// Sink receives one event per flow, and one per later request of a
	// followed plain-HTTP flow. nil means audit.Discard.
	Sink audit.Sink
	// Logger gets one canonical line per flow and per request event
	// (deny at Warn, allow at Info). nil means no logging.
	Logger *slog.Logger
	// Registerer gets capture's metrics. nil means they are not registered.
	Registerer prometheus.Registerer
	// DNS gives the names egressd's forwarder handed out. nil means none.
	DNS DNSFacts
	// Devices tells which LAN addresses are one device's, for the DNS
	// answers capture saw on the wire (DNS's own answers say so
	// themselves). nil means each address is its own client (offline).
	Devices Devices
	// MACs tells a client's MAC as the proxy and the DNS forwarder see
	// it, for a policy that names clients by MAC: the flows they decide
	// (proxied TCP, DNS) are judged with it, and the answers the
	// forwarder's gate passed to the firewall's learned sets with their
	// asker's. Forwarded flows are judged with the frame's source
	// address, which nftables' ether saddr matches. nil means the frame's
	// source address for every flow (offline: no neighbour table).
	MACs ClientMACs
}

// Stats counts what capture saw. Counters are cumulative for the Capture.
type Stats struct {
	Packets uint64 // packets read
	Bytes   uint64 // bytes of packets read, as long as they were on the wire
	Snapped uint64 // packets the capture cut short (the live snap filter)
	// CapturedBytes are the bytes the kernel copied into the ring (or the
	// file held): less than Bytes when frames were cut short.
	CapturedBytes uint64
	Malformed     uint64 // packets that failed to decode, skipped
	Panics        uint64 // of those, decodes that panicked (recovered)
	NotIP         uint64 // frames that carry no IP packet of a flow (not IP; ICMP errors, discovery, on-link: other.go)
	Fragments     uint64 // IP fragments seen
	Reassembled   uint64 // TCP and UDP datagrams rebuilt from fragments
	FragDropped   uint64 // fragmented datagrams given up
	Flows         uint64 // flows classified and reported (each counted once)
	Own           uint64 // flows to or from the gateway's own addresses, not recorded (Config.OwnAddrs)
	// Inbound are flows started from outside the LAN toward a LAN host
	// (proc.go, inbound): recorded denied as ReasonInbound in audit
	// mode, not recorded in enforce mode.
	Inbound uint64
	// Guarded are LAN packets enforce mode's gateway hardening drops
	// (guard.go: forged sources, loopback destinations, RAs,
	// redirects), recorded in their flows as denied in both modes;
	// RPFUnchecked are packets whose source capture could not check
	// (over the lookup budget, no answer from the kernel).
	Guarded, RPFUnchecked uint64
	// Martian are LAN packets from 0.0.0.0 to neither the broadcast
	// address, a local multicast group nor 0.0.0.0, to 0.0.0.0 that
	// enforce mode does not redirect to the gateway, and from :: to an
	// address the gateway routes out of another interface than the LAN
	// one it came in on, which Linux drops in both modes (guard.go): no
	// flow is recorded for them.
	Martian uint64
	Denied  uint64 // of those, denied (dropped or would-drop)
	Updates uint64 // end events of flows first reported while open
	Evicted uint64 // flows ended early because the table was full
	// Copies are packets of a flow seen on another of Config.Interfaces
	// than the flow's own: forwarded between two LAN interfaces, each
	// such packet crosses both sockets. Skipped (counted once).
	Copies uint64
	// OtherVLAN are frames a live socket read that the kernel found
	// tagged for a VLAN (ID not 0): another interface's, its VLAN
	// device's (live.go, livePacket). Skipped.
	OtherVLAN uint64
	// Unforwarded are frames from a LAN client that the gateway would
	// have routed (to its MAC address, toward a unicast address not its
	// own, not redirected to its proxy or DNS forwarder) and drops
	// instead (proc.unforwarded: a wrong IPv4 header checksum, a TTL or
	// hop limit of 1 or 0). No server reads them, and capture skips them.
	Unforwarded uint64
	// StreamLimited counts flows that gave up their name search because
	// the buffers of all flows held Config.MaxStreamBytes.
	StreamLimited uint64
	// Requests counts request events: later requests of plain-HTTP flows
	// capture followed (audit mode and offline), and streams they refused.
	Requests uint64
	// Unfollowed counts plain-HTTP flows whose later requests capture
	// stopped following before their end: a segment missing, bytes the
	// capture cut off where a head could be, the bound on all flows'
	// buffers. Their later requests are in no event.
	Unfollowed  uint64
	Hellos      uint64 // TLS ClientHellos parsed (TCP and QUIC)
	BadHellos   uint64 // of those, malformed (the SNI before the fault is kept)
	QUICOpened  uint64 // QUIC Initial packets decrypted
	DNSQueries  uint64 // DNS queries seen
	DNSAnswers  uint64 // DNS responses seen
	KernelDrops uint64 // packets the kernel dropped on the capture socket (live)
	// SocketErrors counts sockets that failed to read (live): each was
	// closed and opened again, capture going on on the others.
	SocketErrors uint64
}

// Capture is the flow auditor. Use New; Run captures live, ReadFile reads a
// capture file; they must not run at the same time.
type Capture struct {
	cfg  Config
	deps Deps
	log  *slog.Logger
	m    *metrics

	learned *learned
	proc    *proc   // the packet pipeline; used by one goroutine at a time
	proxied proxied // the connections the proxy accepted (ProxyAccepted)

	mu      sync.Mutex // guards following
	sources []source   // the live sockets Open opened, one per Config.Interfaces, in its order (h nil: none)
	opened  bool       // Open has run
	ownSet  bool       // SetOwnAddrs was called: Open does not read the addresses
	running bool
	closed  bool
	// isShut mirrors closed for Run, which looks at it between two
	// packets without taking mu.
	isShut atomic.Bool
	// ifaces are what capture knows of each of Config.Interfaces: the
	// index its socket is bound to (or about to be: swaps) and why it
	// has none. Open and Follow set them.
	ifaces []ifaceState
	// swaps are the sockets Follow opened or closed, for Run's
	// goroutine to take (swapped says there are some; wake wakes Run).
	swaps   []swap
	swapped atomic.Bool
	wake    chan struct{}
	// openReq are the OpenFlows calls for Run's goroutine to answer.
	openReq openReqs
	// failed says Run closed a socket that failed to read since Follow
	// last looked (Follow reports it as a change); changes asks the
	// caller to call Follow (Changes).
	failed  bool
	changes chan struct{}
	// openRingHook, when set (by tests), opens the sockets instead of
	// openRing.
	openRingHook func(name string) (packetSource, error)
	// routes asks the routing table of the sockets' namespace about
	// sources (guard.go); Open opens it there, Run's end closes it. Nil:
	// sources are not checked.
	routes *netutil.RouteAsker
	// routesBackHook, when set (by tests), answers guard.go's route
	// lookups instead of routes.
	routesBackHook func(ifindex int, addr netip.Addr) (bool, error)
	// followMu keeps Follow to one caller at a time, and guards linkSaid.
	followMu sync.Mutex
	linkSaid []linkSaid // by slot of Config.Interfaces
	// linkWindow is linkWindow; shorter in tests.
	linkWindow time.Duration
	// retiredDrops are the kernel's drops on the sockets Run closed.
	retiredDrops uint64

	// Revoke and Redecide queue here for the packet goroutine
	// (reload.go); hasPending says the queue is not empty.
	clock      func() time.Time // when Revoke and Redecide are called; tests set it
	pendMu     sync.Mutex
	pending    []pendingOp
	stopped    bool // Run has returned: Revoke passes events on at once
	hasPending atomic.Bool

	kernelDrops atomic.Uint64
	// observe, when set (by tests), is told every name capture reads off
	// the wire.
	observe func(o observation)
}

// packetSource is the live socket (afpacket on Linux).
type packetSource interface {
	ZeroCopyReadPacketData() ([]byte, gopacket.CaptureInfo, error)
	KernelDrops() (uint64, error)
	Close()
}

// source is one live socket: the interface it is bound to, its place in
// Config.Interfaces (slot: a flow remembers it, proc.src, so a socket
// opened again on a re-made interface carries on its flows) and that
// interface's MAC address (a frame from it was sent by the gateway).
type source struct {
	name    string
	slot    int
	ifindex int          // the index h is bound to
	h       packetSource // nil: no socket on the interface
	mac     [6]byte
	hasMAC  bool
}

// ifaceState is what capture knows of one of Config.Interfaces.
type ifaceState struct {
	ifindex int   // the index its socket is bound to; 0: no socket
	why     error // why there is no socket; nil when there is one
	// link is why the interface carries no traffic while it exists:
	// linkDown (administratively down), linkNoCarrier, or "" (up).
	link string
	// A socket that failed to read (readFailed) is opened again by
	// Follow from retryAt on; fails counts the failures in a row
	// (reset when the socket had read for maxReopenWait), opened is
	// when Follow last opened one.
	fails   int
	retryAt time.Time
	opened  time.Time
	// mac is the interface's MAC address as capture knows it (hasMAC:
	// it has one): Follow takes a new one (setMAC).
	mac    [6]byte
	hasMAC bool
}

// Link states of ifaceState.link.
const (
	linkDown      = "down"
	linkNoCarrier = "no carrier"
)

// readFailed says capture closed the socket on an interface because it
// failed to read; Follow opens another.
type readFailed struct {
	name string
	err  error
}

func (r readFailed) Error() string {
	return "capture: read " + r.name + ": " + r.err.Error() + " (socket closed; opened again shortly)"
}
func (r readFailed) Unwrap() error { return r.err }

// swap is a socket Follow opened on an interface (h set) or closed (h
// nil: the interface went away), for Run to put in slot's place.
type swap struct {
	slot int
	src  source
	// mac: only the interface's MAC address changed (src.mac,
	// src.hasMAC), its socket stays.
	mac bool
}

// ErrNoInterface says that an interface of Config.Interfaces does not
// exist (yet): Follow opens a socket on it when it appears. The errors
// that say so name the interface (noInterface).
var ErrNoInterface = errors.New("capture: no such interface")

// noInterface is ErrNoInterface for one interface.
type noInterface string

func (n noInterface) Error() string        { return "capture: " + string(n) + " does not exist (yet)" }
func (n noInterface) Is(target error) bool { return target == ErrNoInterface }

// Listening returns the interfaces capture has a socket on, in
// Config.Interfaces' order.
func (c *Capture) Listening() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []string
	for i, st := range c.ifaces {
		if st.ifindex != 0 {
			out = append(out, c.cfg.Interfaces[i])
		}
	}
	return out
}

// NotListening returns, in Config.Interfaces' order, why capture has no
// socket on each interface it has none on (errors.Is ErrNoInterface:
// the interface does not exist); nil before Open.
func (c *Capture) NotListening() []error {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []error
	for _, st := range c.ifaces {
		if st.ifindex == 0 && st.why != nil {
			out = append(out, st.why)
		}
	}
	return out
}

// LinkDown returns, in Config.Interfaces' order, the interfaces capture
// has a socket on that carry no traffic: "eth1 is down" (set down: ip
// link set down, ifdown) or "eth1 has no carrier" (a cable unplugged, a
// veth's peer down). The socket stays open and hears the interface
// again once it is up; Follow notices both changes. Nil before Open.
func (c *Capture) LinkDown() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []string
	for i, st := range c.ifaces {
		switch {
		case st.ifindex == 0:
		case st.link == linkDown:
			out = append(out, c.cfg.Interfaces[i]+" is down")
		case st.link == linkNoCarrier:
			out = append(out, c.cfg.Interfaces[i]+" has no carrier")
		}
	}
	return out
}

// InterfacesUp reports, in Config.Interfaces' order, whether capture
// reads each interface: it has a socket on it, and the interface is up
// with a carrier (not LinkDown). All false before Open.
func (c *Capture) InterfacesUp() []bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]bool, len(c.cfg.Interfaces))
	for i, st := range c.ifaces {
		out[i] = st.ifindex != 0 && st.link == ""
	}
	return out
}

// Changes returns a channel capture sends on (without blocking) when it
// wants Follow called besides the link changes: it closed a socket that
// failed to read, and when that socket's reopening is due.
func (c *Capture) Changes() <-chan struct{} { return c.changes }

// poke sends on changes without blocking.
func (c *Capture) poke() {
	select {
	case c.changes <- struct{}{}:
	default:
	}
}

// New checks the configuration and returns a Capture. It opens nothing.
func New(cfg Config, deps Deps) (*Capture, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if deps.Policy == nil {
		return nil, errors.New("capture: deps.Policy is required")
	}
	if deps.Sink == nil {
		deps.Sink = audit.Discard
	}
	log := deps.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	cfg = cfg.withDefaults()
	c := &Capture{cfg: cfg, deps: deps, log: log.With(audit.LogComponent, "capture"), clock: time.Now, wake: make(chan struct{}, 1), changes: make(chan struct{}, 1), linkWindow: linkWindow}
	c.learned = newLearned(cfg.MaxLearned)
	c.m = newMetrics()
	c.proc = newProc(c)
	if deps.Registerer != nil {
		if err := c.m.register(deps.Registerer, c); err != nil {
			return nil, err
		}
	}
	return c, nil
}

// SetOwnAddrs replaces the gateway's own addresses (Config.OwnAddrs, or
// those Open read from the interfaces) with addrs: egressd run calls it
// when the interfaces' addresses change (a WAN address gained on a
// reconnect, a new delegated IPv6 prefix), so that a flow to a new one is
// the gateway's own and not recorded, and one to an address taken off is
// egress again. It is safe to call while Run runs; a flow capture follows
// already stays what it was when it began.
func (c *Capture) SetOwnAddrs(addrs []netip.Addr) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.ownSet = true
	c.proc.setOwn(addrs)
}

// Stats returns the counters so far. It is safe to call while Run runs.
func (c *Capture) Stats() Stats {
	s := c.proc.stats.snapshot()
	s.KernelDrops = c.kernelDrops.Load()
	return s
}

// Close releases the live socket. It is idempotent; a running Run returns.
func (c *Capture) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil
	}
	c.closed = true
	c.isShut.Store(true)
	if !c.running {
		for _, s := range c.sources {
			if s.h != nil {
				s.h.Close()
			}
		}
		c.sources = nil
		c.closeRoutesLocked()
	}
	c.dropSwapsLocked()
	return nil
}

// closeRoutesLocked closes the route lookups' socket, if open.
func (c *Capture) closeRoutesLocked() {
	if c.routes != nil {
		c.routes.Close()
		c.routes = nil
	}
}
