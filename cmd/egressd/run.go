package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"egressd/admin"
	"egressd/audit"
	"egressd/capture"
	"egressd/dnsfilter"
	"egressd/firewall"
	"egressd/internal/atomicfile"
	"egressd/internal/logbuf"
	"egressd/internal/logjson"
	"egressd/internal/memlimit"
	"egressd/internal/netutil"
	"egressd/internal/nfq"
	"egressd/internal/sdnotify"
	"egressd/policy"
	"egressd/profiles"
	"egressd/proxy"
)

func init() {
	commands["run"] = command{
		"run [--policy FILE | --profile NAME] [--mode audit|enforce] [--lan IFACE,...] [--wan IFACE] ...",
		"run the gateway: DNS forwarder, proxy, capture, firewall, report on the admin address", cmdRun}
}

// runConfig is what `egressd run` is told on its command line. Behaviour
// lives in the policy file; flags only say where things are.
type runConfig struct {
	policyFile  string
	profile     string
	mode        string
	lan, wan    string
	upstreams   string
	stateDir    string
	admin       string
	adminHosts  string
	noFirewall  bool
	masquerade  bool
	guardWAN    bool
	wanOpen     string
	transparent string
	explicit    string
	proxyUsers  string
	dnsListen   string
	tcpPorts    string
	ctMarkBits  string
	nat64       string
	inspect     bool
	fastPath    bool
	fastPorts   string
	// fastPortsGiven: --fast-path-ports was on the command line (set by
	// parse), which without --fast-path is a flag that would do nothing.
	fastPortsGiven bool
	denyAnswer     string
	tunnelAlarm    int
	logLevel       string
	logFormat      string
}

func (c *runConfig) flags(fs *flag.FlagSet) {
	fs.StringVar(&c.policyFile, "policy", "", "policy file (default: the embedded profile)")
	fs.StringVar(&c.profile, "profile", profiles.Default, "embedded profile, when no --policy is given (see egressd profiles)")
	fs.StringVar(&c.mode, "mode", "", "audit or enforce (default: the policy's mode)")
	fs.StringVar(&c.lan, "lan", "", "interfaces LAN clients arrive on, comma-separated (VLANs kept apart: eth1.10,eth1.20), each treated as the LAN; capture listens on each (default: the only non-WAN interface, else the WAN one)")
	fs.StringVar(&c.wan, "wan", "", "interface toward the internet (default: the interface of the default route)")
	fs.StringVar(&c.upstreams, "upstream-dns", "", "upstream resolvers, comma-separated ip[:port] (default: /etc/resolv.conf)")
	fs.StringVar(&c.stateDir, "state-dir", "/var/lib/egressd", "state directory: event log (the ledger survives restarts), learned DNS answers (survive restarts), inspection CA")
	fs.StringVar(&c.admin, "admin", "127.0.0.1:9901", "admin address: / (HTML report), /report.json, /metrics, /healthz, /readyz")
	fs.StringVar(&c.adminHosts, "admin-hosts", "", "names, comma-separated, the admin address answers to besides its IP addresses, localhost and --admin's host name (gw.example.lan); any other Host gets 421: DNS rebinding")
	fs.BoolVar(&c.noFirewall, "no-firewall", false, "do not touch nftables: the operator brings traffic to the listeners")
	fs.BoolVar(&c.masquerade, "masquerade", false, "NAT LAN traffic leaving the WAN interface")
	fs.BoolVar(&c.guardWAN, "guard-wan", false, "drop new connections from the WAN side in audit mode too (always on in enforce)")
	fs.StringVar(&c.wanOpen, "wan-open", "", "ports of the gateway that stay reachable from the WAN side, under that guard and past the WAN socket filters of egressd's own listeners, such as 53/udp,22/tcp")
	fs.StringVar(&c.transparent, "proxy-listen", "[::]:15001", "transparent proxy listen address (the target of the nftables redirect)")
	fs.StringVar(&c.explicit, "explicit-proxy-listen", "", "explicit HTTP/CONNECT proxy listen address (default: each LAN interface's address, port 3128; \"off\" to disable)")
	fs.StringVar(&c.proxyUsers, "proxy-users", "", "file of NAME:bcrypt:HASH lines (egressd proxy-users hash NAME): the explicit proxy then asks for one of these users (HTTP Basic, 407)")
	fs.StringVar(&c.dnsListen, "dns-listen", ":53", "DNS forwarder listen addresses, comma-separated (UDP and TCP)")
	tcpPortsFlag(fs, &c.tcpPorts)
	fs.StringVar(&c.ctMarkBits, "ct-mark-bits", defaultCTMarkBits, ctMarkBitsUsage)
	nat64Flag(fs, &c.nat64)
	fs.BoolVar(&c.inspect, "inspect", false, "decrypt connections to hosts with host/path rules (CA in the state directory; egressd ca export)")
	fastPathFlags(fs, &c.fastPath, &c.fastPorts)
	fs.StringVar(&c.denyAnswer, "dns-deny", "", "answer to denied names in enforce mode: REFUSED (default), NXDOMAIN or NULL")
	fs.IntVar(&c.tunnelAlarm, "dns-tunnel-threshold", 500, "distinct names of one wildcard rule's zone one client may send upstream in a minute before the DNS forwarder raises a dns-tunnel alarm (queries are still answered); all clients together may send twice it (dns-tunnel-zone), one client ten times it in an hour (dns-tunnel-slow), all clients twenty times it in an hour (dns-tunnel-zone-slow); 0 turns the alarms off")
	fs.StringVar(&c.logLevel, "log-level", "info", "debug, info, warn or error")
	fs.StringVar(&c.logFormat, "log-format", "json", "json or text")
}

// parse parses args with fs, whose flags are c's (flags), and notes
// which of them were given that checkFlagValues asks about; it returns
// the positional arguments.
func (c *runConfig) parse(fs *flag.FlagSet, args []string) ([]string, error) {
	pos, err := parseArgs(fs, args)
	c.fastPortsGiven = given(fs, "fast-path-ports")
	return pos, err
}

// daemon holds what `egressd run` started, for reload and shutdown.
type daemon struct {
	// reloadWhy: why the parts of the reload under way were refused
	// (reload), for the report's note.
	reloadWhy []string

	cfg    runConfig
	log    *slog.Logger
	out    io.Writer
	store  *policy.Store
	mode   policy.Mode // the --mode override, or ""
	source string      // where the policy comes from, for reloads
	// prevPolicy is the policy the egressd before this start ran with
	// (the state directory's copy), with the NAT64 prefixes it ran with,
	// for the firewall's first look at the connections already out; nil:
	// none.
	prevPolicy *policy.Engine
	// prevTCPPorts is the --tcp-ports prevPolicy's ruleset was rendered
	// with (recorded beside the copy); nil: not known.
	prevTCPPorts *[]policy.PortRange
	// prevCTMarkBits are the --ct-mark-bits its marks were written at
	// (recorded beside the copy; this run's when not).
	prevCTMarkBits *uint32
	// prevFastPath is whether that ruleset had the fast path (--fast-path:
	// the tags move with it); nil: not known (read both ways).
	prevFastPath *bool
	// prevPending are the enforce policies the egressd before this start
	// was putting in when it stopped, unrecorded (pendingFile).
	prevPending []firewall.Prior
	// beforeSave, when set (tests), runs as savePolicy starts: a kill
	// there is one between an install and the copy.
	beforeSave func()
	// marksSettled, when set (tests), stands for d.fw.MarksSettled.
	marksSettled func() bool
	// src is the running policy's source, which savePolicy copies into
	// the state directory once it runs; srcEnforce: it is in enforce mode
	// (its ruleset marks the flows it lets out).
	src        []byte
	srcEnforce bool
	// fwNetNS is the network namespace file the firewall works in; "":
	// this process's. Set by tests only.
	fwNetNS string

	reg   *prometheus.Registry
	admin *admin.Server // created once the ledger exists

	journal *audit.Journal
	ledger  *audit.Ledger
	sink    audit.Sink
	dns     *dnsfilter.Server
	proxy   *proxy.Proxy
	capture *capture.Capture
	fw      *firewall.Firewall
	// What a reload needs to install the firewall when the policy turns
	// to enforce after a start in audit mode, which installed none. wan
	// is --wan, else the default route's interface (newDaemon).
	lans []string
	wan  string
	gate *firewallGate
	// macs tells a LAN client's MAC (the LAN interfaces' neighbour
	// tables); nil without LAN interfaces.
	macs *lanMACs
	// table is the DNS forwarder's learned-address table: the firewall
	// seeds its learned sets with what it holds when it goes in.
	table *dnsfilter.Table
	// learned keeps table in the state directory across restarts.
	learned *learnedStore
	// proxyUsers are the explicit proxy's users (--proxy-users) as read
	// at start; nil: no authentication. A reload hands the file's users
	// to the proxy (reloadProxyUsers), not here.
	proxyUsers map[string]proxy.UserSecret
	caps       capabilities
	// redirecting: egressd's firewall is installed (in enforce mode it
	// redirects TCP from the LAN to the transparent proxy); proxyState:
	// the proxy's transparent listener is not open yet (0), listening
	// (1), stopped (2). Capture leaves a connection's decision line to
	// the proxy only while both hold (proxyLines), and records enforce
	// mode's denies as dropped only while the first does (capture's
	// Config.Firewall).
	redirecting atomic.Bool
	proxyState  atomic.Int32
	// proxyTells is capture once it runs, which the proxy tells of each
	// transparent connection it accepts (proxyAccepted).
	proxyTells atomic.Pointer[capture.Capture]

	// fastFailed carries the failure of the fast path's queue reader
	// to the main loop (fastPathFailed); serveFast starts a reader on
	// a queue openFastPath opened (run sets it); fastOpen: one was
	// started (the queue is open and read until it fails or egressd
	// stops).
	fastFailed chan *proxy.QueueError
	serveFast  func(q *nfq.Conn)
	fastOpen   bool
	// fastErr is the queue reader's failure; while nftables refuses the
	// ruleset without the fast path, fastRetry fires when dropFastPath
	// tries again (nil: no try due), fastTries refusals in a row.
	fastErr   *proxy.QueueError
	fastRetry <-chan time.Time
	fastTries int

	mu       sync.Mutex // guards degraded
	degraded map[string]string
}

func cmdRun(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	var cfg runConfig
	fs := newFlags("run", stderr)
	cfg.flags(fs)
	pos, err := cfg.parse(fs, args)
	if err != nil {
		return flagErr(err)
	}
	if len(pos) != 0 {
		fmt.Fprintf(stderr, "egressd run: unexpected argument %q\n", pos[0])
		return exitUsage
	}
	if exclusive(fs, stderr, [2]string{"policy", "profile"}) {
		return exitUsage
	}
	// The log lines (one per decision) go out in batches; Close writes
	// the last ones before the error below, if any.
	lw := logbuf.New(stderr, logFlushInterval)
	defer lw.Close()
	stderr = lw
	d, err := newDaemon(cfg, stdout, stderr)
	if err != nil {
		fmt.Fprintln(stderr, "egressd:", err)
		if errors.As(err, new(flagValueError)) {
			return exitUsage
		}
		return exitFail
	}
	if err := d.run(ctx); err != nil {
		fmt.Fprintln(stderr, "egressd:", err)
		return exitFail
	}
	return exitOK
}

// logFlushInterval is the longest a log line waits before it is written.
const logFlushInterval = 50 * time.Millisecond

func newLogger(cfg runConfig, w io.Writer) (*slog.Logger, *slog.LevelVar, error) {
	lv := new(slog.LevelVar)
	if err := lv.UnmarshalText([]byte(cfg.logLevel)); err != nil {
		return nil, nil, fmt.Errorf("--log-level %q: expected debug, info, warn or error", cfg.logLevel)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch cfg.logFormat {
	case "json":
		return slog.New(logjson.New(w, opts)), lv, nil
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), lv, nil
	}
	return nil, nil, fmt.Errorf("--log-format %q: expected json or text", cfg.logFormat)
}

// flagValueError is a flag of `egressd run` whose value is malformed: a
// usage error (exit 2), found before anything starts.
type flagValueError struct{ error }

func (e flagValueError) Unwrap() error { return e.error }

// checkFlagValues returns every malformed flag value of cfg at once. A
// value the daemon would only read later (the firewall's ports, on a
// reload to enforce) or that would leave a part not running (a mistyped
// --dns-deny stopped DNS, so enforce mode's redirect left the LAN without
// it) must stop the start instead.
func checkFlagValues(cfg runConfig) error {
	var errs []error
	bad := func(flag string, err error) {
		if err != nil {
			errs = append(errs, fmt.Errorf("--%s: %w", flag, err))
		}
	}
	if _, _, err := newLogger(cfg, io.Discard); err != nil {
		errs = append(errs, err)
	}
	lans, err := parseLANs(cfg.lan)
	bad("lan", err)
	bad("lan", lansNameWAN(lans, cfg.wan, " (--wan)"))
	if cfg.mode != "" {
		if _, ok := policy.ParseMode(cfg.mode); !ok {
			errs = append(errs, fmt.Errorf("--mode %q: expected audit or enforce", cfg.mode))
		}
	}
	// The firewall reads --tcp-ports and --wan-open only when it installs, which in
	// audit mode may first happen on a reload to enforce: a bad value
	// must stop the start, not that switch.
	_, err = parseTCPPorts(cfg.tcpPorts)
	bad("tcp-ports", err)
	_, err = parsePortProtos(cfg.wanOpen)
	bad("wan-open", err)
	bits, err := parseCTMarkBits(cfg.ctMarkBits)
	bad("ct-mark-bits", err)
	if cfg.fastPortsGiven && !cfg.fastPath {
		errs = append(errs, errFastPortsAlone)
	}
	if cfg.fastPath {
		if cfg.noFirewall {
			bad("fast-path", errors.New("egressd: the fast path needs the firewall (it queues the connections), not --no-firewall"))
		}
		ports, err := parseFastPorts(cfg.fastPorts)
		bad("fast-path-ports", err)
		if err == nil && len(ports) > 0 {
			bad("fast-path", firewall.Config{FastPath: true, CTMarkBits: bits}.Validate(policy.ModeAudit))
		}
	}
	if cfg.inspect && cfg.stateDir == "" {
		// The proxy would refuse it (its CA lives there) and egressd
		// would run without the proxy.
		bad("inspect", errors.New(`egressd: inspection needs a state directory for its CA, not --state-dir ""`))
	}
	_, err = policy.ParseNAT64(cfg.nat64)
	bad("nat64-prefix", err)
	bad("dns-listen", dnsfilter.Config{Listen: splitList(cfg.dnsListen)}.Validate())
	bad("upstream-dns", dnsfilter.Config{Upstreams: splitList(cfg.upstreams)}.Validate())
	bad("dns-deny", dnsfilter.Config{Deny: denyAnswer(cfg.denyAnswer)}.Validate())
	if cfg.tunnelAlarm < 0 {
		bad("dns-tunnel-threshold", fmt.Errorf("egressd: %d is negative (0 turns the alarm off)", cfg.tunnelAlarm))
	} else {
		bad("dns-tunnel-threshold", dnsfilter.Config{TunnelThreshold: cfg.tunnelAlarm}.Validate())
	}
	bad("proxy-listen", checkListenAddr(cfg.transparent))
	if cfg.explicit != "" && cfg.explicit != "off" {
		bad("explicit-proxy-listen", checkListenAddr(cfg.explicit))
	}
	bad("admin", checkListenAddr(cfg.admin))
	for _, h := range splitList(cfg.adminHosts) {
		bad("admin-hosts", admin.CheckHost(h))
	}
	if len(errs) > 0 {
		return flagValueError{errors.Join(errs...)}
	}
	return nil
}

// firewallConfig is the firewall's configuration for egressd run with
// cfg, on the LAN interfaces lans and the WAN interface wan, in the
// network namespace file netns ("": this process's); the part the
// policy's rule tags depend on needs none of the three. The values were
// checked by checkFlagValues; the error names the flag of one that was
// not.
func firewallConfig(cfg runConfig, lans []string, wan, netns string) (firewall.Config, error) {
	tcpPorts, err := parseTCPPorts(cfg.tcpPorts)
	if err != nil {
		return firewall.Config{}, fmt.Errorf("--tcp-ports: %w", err)
	}
	wanOpen, err := parsePortProtos(cfg.wanOpen)
	if err != nil {
		return firewall.Config{}, fmt.Errorf("--wan-open: %w", err)
	}
	markBits, err := parseCTMarkBits(cfg.ctMarkBits)
	if err != nil {
		return firewall.Config{}, fmt.Errorf("--ct-mark-bits: %w", err)
	}
	fc := firewall.Config{LANs: lans, WAN: wan, NetNS: netns,
		ProxyPort: listenPort(cfg.transparent), DNSPort: listenPort(firstOf(splitList(cfg.dnsListen))),
		TCPPorts: tcpPorts, Masquerade: cfg.masquerade, GuardWAN: cfg.guardWAN, WANOpen: wanOpen, CTMarkBits: markBits}
	if cfg.fastPath {
		if fc.FastPathPorts, err = parseFastPorts(cfg.fastPorts); err != nil {
			return firewall.Config{}, fmt.Errorf("--fast-path-ports: %w", err)
		}
		fc.FastPath = true
	}
	return fc, nil
}

// maxFastPorts bounds --fast-path-ports: TLS ports are few, and the
// proxy checks each SYN's port against the list.
const maxFastPorts = 64

// errFastPortsAlone is --fast-path-ports given without --fast-path, which
// would do nothing (egressd run, firewall print).
var errFastPortsAlone = errors.New("--fast-path-ports needs --fast-path")

// fastPathFlags defines --fast-path and --fast-path-ports (egressd run,
// and firewall print, which shows the ruleset run installs with them).
func fastPathFlags(fs *flag.FlagSet, fast *bool, ports *string) {
	fs.BoolVar(fast, "fast-path", false, "in enforce mode, decide new TLS connections to --fast-path-ports from their queued packets (NFQUEUE) and let the kernel forward those allowed instead of proxying them, where the address is one the DNS forwarder gave the client for a name the rule allows; others go to the proxy as before (needs the firewall)")
	fs.StringVar(ports, "fast-path-ports", "443", "TCP ports whose new connections --fast-path decides (comma-separated, N or N-M; TLS only: plain HTTP keeps the proxy, which reads every request; needs --fast-path)")
}

// parseFastPorts parses --fast-path-ports: TCP ports or ranges, at least
// one and at most maxFastPorts ports ("all" is no answer: the fast path
// is for TLS only).
func parseFastPorts(s string) ([]policy.PortRange, error) {
	if t := strings.TrimSpace(s); t == "" || t == "all" {
		return nil, fmt.Errorf("egressd: %q: name the TLS ports (443, 8443, 5223)", s)
	}
	ranges, err := parseTCPPorts(s)
	if err == nil && len(portList(ranges)) > maxFastPorts {
		err = fmt.Errorf("egressd: %q: more than %d ports (the fast path is for the TLS ports)", s, maxFastPorts)
	}
	return ranges, err
}

// portList lists the ports of ranges, each once, up to maxFastPorts+1.
func portList(ranges []policy.PortRange) []uint16 {
	var out []uint16
	for _, r := range ranges {
		for p := int(r.Lo); p <= int(r.Hi) && len(out) <= maxFastPorts; p++ {
			if !slices.Contains(out, uint16(p)) {
				out = append(out, uint16(p))
			}
		}
	}
	return out
}

// denyAnswer maps --dns-deny, in any case, to dnsfilter's names: REFUSED
// and NXDOMAIN are upper case there, null lower case.
func denyAnswer(s string) dnsfilter.DenyAnswer {
	for _, a := range []dnsfilter.DenyAnswer{dnsfilter.DenyRefused, dnsfilter.DenyNXDomain, dnsfilter.DenyNull} {
		if strings.EqualFold(s, string(a)) {
			return a
		}
	}
	return dnsfilter.DenyAnswer(s)
}

// checkListenAddr checks that a is HOST:PORT (HOST may be empty).
func checkListenAddr(a string) error {
	_, port, err := net.SplitHostPort(a)
	if err == nil {
		if _, perr := strconv.ParseUint(port, 10, 16); perr != nil {
			err = fmt.Errorf("port %q is not a number from 0 to 65535", port)
		}
	}
	if err != nil {
		return fmt.Errorf("%q: expected HOST:PORT (%v)", a, err)
	}
	return nil
}

func newDaemon(cfg runConfig, stdout, stderr io.Writer) (*daemon, error) {
	if err := checkFlagValues(cfg); err != nil {
		return nil, err
	}
	log, _, err := newLogger(cfg, stderr)
	if err != nil {
		return nil, err
	}
	d := &daemon{cfg: cfg, log: log, out: stdout, degraded: map[string]string{}, fastFailed: make(chan *proxy.QueueError, 1)}
	d.wan = cfg.wan
	if d.wan == "" {
		d.wan = defaultRouteInterface()
		lans, _ := parseLANs(cfg.lan) // checked above
		if err := lansNameWAN(lans, d.wan, " (the default route's; --wan names another)"); err != nil {
			return nil, flagValueError{fmt.Errorf("--lan: %w", err)}
		}
	}
	if cfg.mode != "" {
		d.mode, _ = policy.ParseMode(cfg.mode)
	}
	if cfg.proxyUsers != "" {
		if cfg.explicit == "off" {
			return nil, flagValueError{errors.New("--proxy-users: the explicit proxy is off (--explicit-proxy-listen off)")}
		}
		if d.proxyUsers, err = loadProxyUsers(cfg.proxyUsers); err != nil {
			return nil, err
		}
		d.warnUnsalted(d.proxyUsers)
	}
	d.source = cfg.policyFile
	if d.source == "" {
		d.source = "profile:" + cfg.profile
	}
	// The temporary files of the writes a kill cut short (atomicfile: a
	// new name each write, which the next does not reuse).
	for _, f := range []string{runningPolicyFile, runningSourceFile, runningFirewallFile, pendingFile} {
		for _, name := range atomicfile.RemoveTemps(filepath.Join(cfg.stateDir, f)) {
			d.log.Info("removed the temporary file of a state file's write that did not finish", "file", name)
		}
	}
	if !cfg.noFirewall {
		prev := d.previousPolicy() // before savePolicy writes over the copy
		d.prevPolicy, d.prevTCPPorts, d.prevCTMarkBits, d.prevFastPath = prev.eng, prev.tcpPorts, prev.markBits, prev.fastPath
		d.prevPending = d.pendingPolicies()
	}
	eng, src, err := d.loadPolicy()
	if err != nil {
		return nil, err
	}
	// Copied into the state directory once it runs (run): in enforce
	// mode, once the firewall took it.
	d.src, d.srcEnforce = src, eng.Mode() == policy.ModeEnforce
	d.store = policy.NewStore(eng)
	d.reg = prometheus.NewRegistry()
	d.reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	firewall.RegisterMetrics(d.reg) // served in audit mode too, before any table
	return d, nil
}

// loadPolicy reads and compiles the policy, applying the --mode override;
// src is what it read (savePolicy's, once the policy runs).
func (d *daemon) loadPolicy() (eng *policy.Engine, src []byte, err error) {
	src, err = policySource(d.source)
	if err != nil {
		return nil, nil, err
	}
	if eng, err = policy.Compile(d.source, src); err != nil {
		return nil, nil, err
	}
	for _, w := range runWarnings(eng, d.cfg.inspect) {
		d.log.Warn("policy warning", "problem", w.String())
	}
	// Checked by checkFlagValues.
	nat64, _ := policy.ParseNAT64(d.cfg.nat64)
	return eng.WithMode(d.mode).WithNAT64(nat64), src, nil
}

// runWarnings is what egressd run says of the policy: its warnings but,
// with --inspect, the one that a path rule acts at host level on HTTPS
// without inspection (the proxy inspects those hosts).
func runWarnings(eng *policy.Engine, inspect bool) []policy.Problem {
	var ws []policy.Problem
	for _, w := range eng.Warnings() {
		if inspect && w.Code == policy.WarnPathNeedsInspection {
			continue
		}
		ws = append(ws, w)
	}
	return ws
}

// nat64Usage is --nat64-prefix's help.
const nat64Usage = "NAT64 prefixes of the site's DNS64/NAT64 (RFC 6052 /96), comma-separated, such as 64:ff9b::/96: a destination inside one is decided and guarded as the IPv4 address it embeds"

// runningPolicyFile is the copy of the running policy in the state
// directory, which `egressd report` reads when the daemon is not running.
const runningPolicyFile = "policy.yaml"

// runningSourceFile names, beside runningPolicyFile, where the copy came
// from (--policy's file or profile:NAME), so that `egressd report
// --state-dir` names the policy as the running daemon does.
const runningSourceFile = "policy.source"

// runningFirewallFile records, beside runningPolicyFile, what else the
// ruleset of the copy's policy in the kernel was rendered with that the
// reading of its marks depends on (--tcp-ports, on which its rule tags
// depend; --nat64-prefix, on which what its rules open depends), once
// the firewall took it, and
// which copy it goes with (its SHA-256: a copy written without it, by an
// audit-mode start or an egressd before the record, is not matched to a
// record of another policy's).
const runningFirewallFile = "policy.firewall.json"

// firewallRecord is runningFirewallFile's content.
type firewallRecord struct {
	Version  int    `json:"version"`
	TCPPorts string `json:"tcp_ports"` // --tcp-ports, as given
	// NAT64 is --nat64-prefix, as given; nil: not recorded (an egressd
	// before the field, which ignores it: the version stays), read as
	// this run's.
	NAT64        *string `json:"nat64_prefix,omitempty"`
	PolicySHA256 string  `json:"policy_sha256"` // of the copy it goes with
	// MarksPolicy is the source of the policy whose enforce ruleset
	// marked the flows still out, when it is not the copy's: a start or
	// reload since installed no enforce ruleset (audit mode, with or
	// without an audit ruleset; --no-firewall), and the marks the
	// enforce run wrote outlive its table. "": the copy's.
	MarksPolicy string `json:"marks_policy,omitempty"`
	// CTMarkBits is --ct-mark-bits, as given, where the marks are; ""
	// not recorded (an egressd before the field, which ignores it: the
	// version stays), read as this run's.
	CTMarkBits string `json:"ct_mark_bits,omitempty"`
	// FastPath is --fast-path, with which the rules' tags move (the fast
	// path reserves one); nil: not recorded (an egressd before the
	// field, which ignores it: the version stays), read both ways.
	FastPath *bool `json:"fast_path,omitempty"`
}

// firewallRecordVersion is the version runningFirewallFile is written
// with; one of another is not read.
const firewallRecordVersion = 1

// previousPolicy compiles the state directory's copy of the policy the
// egressd before this start ran with: the firewall reads the tags in the
// conntrack marks of the connections that one let out as its rules'
// (firewall.Deps.Previous), with the --nat64-prefix and rendered with the
// --tcp-ports recorded beside it (tcpPorts; nil when there is no record
// of this copy: this run's are used, and this run's prefixes); the
// record's MarksPolicy instead of the copy when it names one (the copy
// is of a run that put no enforce ruleset in); and the --ct-mark-bits
// its marks are at (markBits: recorded, or this run's), and whether it
// had the fast path (fastPath: recorded; nil when not known). No eng when there
// is none, or it does not compile (a newer egressd's, rolled back from):
// said, and the tags are read as the new policy's.
func (d *daemon) previousPolicy() recorded {
	r := d.previousRecorded()
	if r.eng == nil {
		return recorded{}
	}
	if r.nat64 == nil {
		// Checked by checkFlagValues.
		this, _ := policy.ParseNAT64(d.cfg.nat64)
		r.nat64 = &this
	}
	if r.markBits == nil {
		// Checked by checkFlagValues.
		this, _ := parseCTMarkBits(d.cfg.ctMarkBits)
		r.markBits = &this
	}
	r.eng = r.eng.WithNAT64(*r.nat64)
	return r
}

// recorded is the policy the egressd before this start ran with and
// what its ruleset was rendered with, as previousRecorded reads them
// (nil: not known); previousPolicy fills in this run's --nat64-prefix
// and --ct-mark-bits for those not known.
type recorded struct {
	eng      *policy.Engine
	tcpPorts *[]policy.PortRange
	nat64    *[]netip.Prefix
	markBits *uint32
	fastPath *bool
}

// previousRecorded is previousPolicy's reading of the copy and the
// record: the policy, and the --tcp-ports, --nat64-prefix,
// --ct-mark-bits and --fast-path recorded for it (nil: not known).
func (d *daemon) previousRecorded() recorded {
	p := filepath.Join(d.cfg.stateDir, runningPolicyFile)
	src, err := os.ReadFile(p)
	if err != nil {
		return recorded{}
	}
	eng, err := policy.Compile(p, src)
	if err != nil {
		d.log.Warn("the state directory's copy of the policy before this start does not compile; conntrack mark tags are read as the new policy's", audit.LogError, err.Error())
		return recorded{}
	}
	rp := filepath.Join(d.cfg.stateDir, runningFirewallFile)
	b, err := os.ReadFile(rp)
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			d.log.Warn("cannot read the record of the --tcp-ports the policy before this start ran with; its tags are read with this run's", "file", rp, audit.LogError, err.Error())
		}
		return recorded{eng: eng}
	}
	var rec firewallRecord
	sum := sha256.Sum256(src)
	var ports []policy.PortRange
	switch err := json.Unmarshal(b, &rec); {
	case err != nil:
		d.log.Warn("the record of the --tcp-ports the policy before this start ran with does not parse; its tags are read with this run's", "file", rp, audit.LogError, err.Error())
		return recorded{eng: eng}
	case rec.Version != firewallRecordVersion:
		d.log.Warn("the record of the --tcp-ports the policy before this start ran with is of another version; its tags are read with this run's", "file", rp, "version", rec.Version)
		return recorded{eng: eng}
	case rec.PolicySHA256 != hex.EncodeToString(sum[:]):
		// The copy was written after the record (an audit-mode start, an
		// egressd from before the record): not its ports.
		d.log.Info("the record of --tcp-ports is of another copy of the policy; the tags of the policy before this start are read with this run's", "file", rp)
		return recorded{eng: eng}
	}
	if ports, err = parseTCPPorts(rec.TCPPorts); err != nil {
		d.log.Warn("the record of the --tcp-ports the policy before this start ran with does not parse; its tags are read with this run's", "file", rp, audit.LogError, err.Error())
		return recorded{eng: eng}
	}
	r := recorded{eng: eng, tcpPorts: &ports, fastPath: rec.FastPath}
	if rec.NAT64 != nil {
		n, err := policy.ParseNAT64(*rec.NAT64)
		if err != nil {
			d.log.Warn("the record of the --nat64-prefix the policy before this start ran with does not parse; its rules are read with this run's", "file", rp, audit.LogError, err.Error())
		} else {
			r.nat64 = &n
		}
	}
	if rec.CTMarkBits != "" {
		b, err := parseCTMarkBits(rec.CTMarkBits)
		if err != nil {
			d.log.Warn("the record of the --ct-mark-bits the policy before this start ran with does not parse; its marks are read at this run's", "file", rp, audit.LogError, err.Error())
		} else {
			r.markBits = &b
		}
	}
	if rec.MarksPolicy != "" {
		// The copy is of a run that installed no enforce ruleset: the
		// marks are those of the enforce run before it.
		meng, err := policy.Compile(rp, []byte(rec.MarksPolicy))
		if err != nil {
			d.log.Warn("the policy whose ruleset marked the flows still out does not compile; conntrack mark tags are read as the new policy's", "file", rp, audit.LogError, err.Error())
			return recorded{}
		}
		r.eng = meng
	}
	return r
}

// readFirewallRecord returns the record beside the copy when it is of
// this version and of the copy now in place (copy); nil otherwise.
func (d *daemon) readFirewallRecord(copy []byte) *firewallRecord {
	b, err := os.ReadFile(filepath.Join(d.cfg.stateDir, runningFirewallFile))
	if err != nil {
		return nil
	}
	var rec firewallRecord
	sum := sha256.Sum256(copy)
	if json.Unmarshal(b, &rec) != nil || rec.Version != firewallRecordVersion || rec.PolicySHA256 != hex.EncodeToString(sum[:]) {
		return nil
	}
	return &rec
}

// savePolicy copies the running policy's source, d.src, into the state
// directory, atomically (a report never reads half a file): at start, in
// enforce mode once the firewall took it (a start whose install failed
// leaves the copy of the policy whose ruleset is still in the kernel);
// on a reload, once the firewall took it (not a policy refused, nor an
// edit made since it was read). With installed and an enforce policy,
// its ruleset marks the flows it lets out: the --tcp-ports it was
// rendered with, the --nat64-prefix it ran with and the --ct-mark-bits
// its marks are at are recorded beside
// it (runningFirewallFile), for the next start's reading of the marks,
// and the note of the policies going in (pendingFile) is removed;
// otherwise the record, when it is of the copy replaced, goes on naming
// the policy, ports and prefixes of the enforce run before (firewallRecord.MarksPolicy), whose marks outlive its table.
// Failure only costs the report its unused-rules list and the next start
// its reading of the marks as the policy's before it (previousPolicy),
// so it is logged, not fatal.
func (d *daemon) savePolicy(installed bool) {
	if d.beforeSave != nil {
		d.beforeSave()
	}
	err := os.MkdirAll(d.cfg.stateDir, 0o750)
	copyPath, recPath := filepath.Join(d.cfg.stateDir, runningPolicyFile), filepath.Join(d.cfg.stateDir, runningFirewallFile)
	sum := sha256.Sum256(d.src)
	switch {
	case err != nil:
	case installed && d.srcEnforce:
		// The copy first: a crash before the record leaves a record of
		// another copy, read as none (this run's --tcp-ports), not one
		// that names the earlier policy's.
		// Marks the look at the connections left with older tags
		// (firewall.Firewall.MarksSettled): the note stays, with the
		// copy about to be replaced added.
		settled := d.settled()
		if !settled {
			d.noteReplacedCopy()
		}
		if err = d.writeCopy(copyPath); err == nil {
			err = writeRecord(recPath, firewallRecord{Version: firewallRecordVersion, TCPPorts: d.cfg.tcpPorts, NAT64: &d.cfg.nat64, CTMarkBits: d.cfg.ctMarkBits, FastPath: &d.cfg.fastPath, PolicySHA256: hex.EncodeToString(sum[:])})
		}
		if err == nil && settled {
			d.donePending()
		}
	default:
		// No enforce ruleset of this policy marks flows: those still out
		// carry the marks of the enforce run before, whose policy and
		// ports the record goes on naming, for the new copy. The record
		// first: a crash before the copy leaves a record of another copy
		// (read as none), not the copy taken for the marks' policy.
		if old, rerr := os.ReadFile(copyPath); rerr == nil {
			if rec := d.readFirewallRecord(old); rec != nil {
				if rec.MarksPolicy == "" {
					rec.MarksPolicy = string(old)
				}
				rec.PolicySHA256 = hex.EncodeToString(sum[:])
				err = writeRecord(recPath, *rec)
			}
		}
		if err == nil {
			err = d.writeCopy(copyPath)
		}
	}
	if err != nil {
		d.log.Warn("cannot keep a copy of the policy in the state directory", audit.LogError, err.Error())
	}
}

// writeCopy writes the running policy's copy to p, and where it came
// from beside it (runningSourceFile).
func (d *daemon) writeCopy(p string) error {
	if err := writeAtomic(p, d.src); err != nil {
		return err
	}
	return writeAtomic(filepath.Join(filepath.Dir(p), runningSourceFile), []byte(d.source+"\n"))
}

// writeRecord writes rec as runningFirewallFile's content, to p.
func writeRecord(p string, rec firewallRecord) error {
	b, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	return writeAtomic(p, append(b, '\n'))
}

// writeAtomic writes b as the file at p (atomicfile): after a power cut
// the policy's copy and its record are the old or the new, never an empty
// file, as learned.ndjson and the ledger's archive are.
func writeAtomic(p string, b []byte) error {
	return atomicfile.WriteFile(p, b, 0o640, atomicfile.Replace)
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// capabilities reports which of the capabilities egressd's parts need the
// process has.
type capabilities struct{ netAdmin, netRaw, bindService bool }

func currentCapabilities() capabilities {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		root := os.Geteuid() == 0
		return capabilities{root, root, root}
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "CapEff:"); ok {
			n, err := strconv.ParseUint(strings.TrimSpace(v), 16, 64)
			if err != nil {
				break
			}
			return capabilities{netAdmin: n&(1<<12) != 0, netRaw: n&(1<<13) != 0, bindService: n&(1<<10) != 0}
		}
	}
	return capabilities{}
}

// withCapHint adds which capability is missing to a permission error.
func withCapHint(err error, have bool, hint string) string {
	if !have && errors.Is(err, os.ErrPermission) {
		return err.Error() + ": needs " + hint
	}
	return err.Error()
}

// listenCapHint adds to a listener's permission error the capability it
// lacked: CAP_NET_ADMIN where the kernel refused the WAN socket filter
// (some kernels ask it for SO_ATTACH_FILTER), else bindHint (which names
// CAP_NET_BIND_SERVICE) where the port is below 1024 or not known. A
// permission error on a high port that is not the filter's gets no hint:
// binding one needs no capability.
func listenCapHint(err error, caps capabilities, bindHint string) string {
	if !errors.Is(err, os.ErrPermission) {
		return err.Error()
	}
	if errors.Is(err, netutil.ErrSocketFilter) {
		if caps.netAdmin {
			return err.Error()
		}
		return err.Error() + ": needs CAP_NET_ADMIN (this kernel asks it for the socket filter that keeps the WAN side out)"
	}
	if caps.bindService {
		return err.Error()
	}
	var op *net.OpError
	if errors.As(err, &op) {
		port := 0
		switch a := op.Addr.(type) {
		case *net.TCPAddr:
			port = a.Port
		case *net.UDPAddr:
			port = a.Port
		}
		if port >= 1024 {
			return err.Error()
		}
	}
	return err.Error() + ": needs " + bindHint
}

// degrade records a part that does not run, for /readyz and the summary.
// It logs when the part stops or its reason changes: the link watcher asks
// again on every notice and every linkRecheck, and a LAN port left empty
// would repeat the same line each time.
func (d *daemon) degrade(part, why string) {
	if d.setDegraded(part, why) {
		d.log.Error("part not running", "part", part, audit.LogReason, why)
	}
}

// setDegraded is degrade without its log line, for a caller that says
// it in a line of its own; it reports whether the part was running or
// had another reason.
func (d *daemon) setDegraded(part, why string) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	was, ok := d.degraded[part]
	d.degraded[part] = why
	return !ok || was != why
}

// undegrade records that a part degrade named runs again.
func (d *daemon) undegrade(part string) {
	d.mu.Lock()
	_, was := d.degraded[part]
	delete(d.degraded, part)
	d.mu.Unlock()
	if was {
		d.log.Info("part running again", "part", part)
	}
}

// setOpenFlows makes the live report count the flows open now that no
// event reported yet (README, "Reports"): capture's (capOpen, nil when
// capture does not run: a UDP flow until 60 s of silence, any flow until
// a minute after it began) and the proxy's (a connection until it
// closes; a tunnel through the explicit proxy capture sees only as one
// to the gateway). A transparent connection both list counts once, as
// the proxy's, as its events would (audit.Ledger). Then the events
// queued before the lists are taken into the ledger (Journal.Sync): a
// flow reported just before is in one or the other, never in neither.
func (d *daemon) setOpenFlows(capOpen func() []audit.Event) {
	prx, j := d.proxy, d.journal
	if capOpen == nil && prx == nil {
		return
	}
	d.ledger.SetOpenFlows(func() []audit.Event {
		var evs []audit.Event
		if capOpen != nil {
			evs = capOpen()
		}
		if prx != nil {
			evs = append(evs, prx.OpenFlows()...)
		}
		if j != nil {
			j.Sync(2 * time.Second)
		}
		return evs
	})
}

// captureHealth records, for /readyz and the summary, the LAN interfaces
// capture has no socket on, or that are down or have no carrier (the part
// "capture" not running), or that it has one on each, up; nothing once
// its Run has returned (ended).
func (d *daemon) captureHealth(c *capture.Capture, ended *atomic.Bool) {
	if ended.Load() {
		return
	}
	not, down := c.NotListening(), c.LinkDown()
	if len(not) == 0 && len(down) == 0 {
		d.undegrade("capture")
		return
	}
	var why []string
	if len(not) > 0 {
		msg := make([]string, len(not))
		for i, err := range not {
			msg[i] = err.Error()
		}
		how := "capture listens on each once it appears"
		if !onlyMissing(not) {
			how = "capture tries again when an interface changes, and every " + linkRecheck.String()
		}
		why = append(why, fmt.Sprintf("%s (listening on %s meanwhile; %s)", strings.Join(msg, "; "), orNone(strings.Join(c.Listening(), ", ")), how))
	}
	if len(down) > 0 {
		why = append(why, "capture: "+strings.Join(down, ", ")+" (capture keeps its socket and hears it again once it is up)")
	}
	d.degrade("capture", strings.Join(why, "; "))
}

// onlyMissing reports whether every error of capture.NotListening says
// the interface does not exist (yet).
func onlyMissing(not []error) bool {
	for _, err := range not {
		if !errors.Is(err, capture.ErrNoInterface) {
			return false
		}
	}
	return true
}

// notListeningNames are the lans not in on.
func notListeningNames(lans, on []string) []string {
	var out []string
	for _, l := range lans {
		if !slices.Contains(on, l) {
			out = append(out, l)
		}
	}
	return out
}

func (d *daemon) degradedParts() map[string]string {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make(map[string]string, len(d.degraded))
	for k, v := range d.degraded {
		out[k] = v
	}
	return out
}

func (d *daemon) say(format string, args ...any) { fmt.Fprintf(d.out, format+"\n", args...) }

// testHookJournal, when set (tests), may change the event log's
// configuration before it opens: a test stalls its read (LoadDone).
var testHookJournal func(*audit.JournalConfig)

func (d *daemon) run(ctx context.Context) error {
	// SIGHUP is caught from the start: one that comes while the parts
	// start (systemd's ExecReload, a script that saw the first lines)
	// would otherwise end the process (its default action); it waits here
	// and reloads once egressd is running.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	cfg := d.cfg
	caps := currentCapabilities()
	eng := d.store.Load()
	d.say("egressd %s: policy %s, %d rules, mode %s", version, d.source, len(eng.Rules()), eng.Mode())
	// Go's default: every CPU the process may use. Half of them cost the
	// proxy less CPU per connection but lowered its bulk rate, lengthened
	// its tail and cost the DNS forwarder 15-21 % of its cached rate, for
	// the same connection rate (README, "Running it as the site's
	// gateway").
	note := ""
	if os.Getenv("GOMAXPROCS") != "" {
		note = " (GOMAXPROCS)"
	}
	d.say("go: %d processors%s", runtime.GOMAXPROCS(0), note)
	// Memory (README, "Memory"): under a cgroup limit (MemoryMax= in the
	// unit) the runtime gets a soft limit below it, so the garbage
	// collector works harder before the OOM killer would end the process
	// (TestMemoryMaxUnderFlood); capture's ring is sized to the memory the
	// process may use.
	mem := memlimit.Read()
	d.say("go: %s", applyMemoryLimit(mem))

	wan := d.wan
	lans, _ := parseLANs(cfg.lan) // checked by newDaemon
	if len(lans) == 0 {
		if lan := guessLAN(wan); lan != "" {
			lans = []string{lan}
		}
	}
	d.lans, d.caps = lans, caps

	// The event path: components → journal (bounded queue, never blocks)
	// → ledger and the append-only log in the state directory. Without a
	// usable state directory the ledger still counts, in memory only.
	//
	// The log is read into the ledger in the background (Background):
	// DNS and the proxies serve at once, not after a read of seconds (in
	// enforce mode nftables, kept across the restart, sends the LAN to
	// them meanwhile). What is emitted during the read is written to
	// the log as it comes and counted after it; a report meanwhile says
	// its counts are partial (README, "Serving while the log is read").
	var wg sync.WaitGroup
	jcfg := audit.JournalConfig{Dir: cfg.stateDir, Compress: true, Logger: d.log.With(audit.LogComponent, "audit"), Background: true,
		LoadDone: func(st audit.LoadStats, took time.Duration, err error) {
			took = took.Round(time.Millisecond)
			switch {
			case err == nil:
				d.say("event log: %s (%d earlier events restored, read in %s while serving)", cfg.stateDir, st.Events, took)
			case errors.Is(err, audit.ErrLoadStopped):
				d.say("event log: %s (its read stopped by the shutdown after %d earlier events, %s)", cfg.stateDir, st.Events, took)
			default:
				d.degrade("event log read", fmt.Sprintf("%v: counts of earlier events are partial (%d events of %d files read); events since the start are counted and written", err, st.Events, st.Files))
			}
		}}
	if testHookJournal != nil {
		testHookJournal(&jcfg)
	}
	j, _, err := audit.OpenJournal(jcfg, audit.NewLedger(eng, audit.LedgerOptions{}))
	if err != nil {
		d.degrade("event log", fmt.Sprintf("%v: reports are kept in memory only and lost on restart", err))
		d.ledger = audit.NewLedger(eng, audit.LedgerOptions{})
		d.sink = d.ledger
	} else {
		d.journal, d.ledger, d.sink = j, j.Ledger(), j
		d.say("event log: %s (reading the earlier events in the background)", cfg.stateDir)
		if err := j.Err(); err != nil {
			// A read-only state directory: the site stays online, the
			// events are counted and not written until it is writable
			// (/readyz 503, egress_audit_write_failed_events_total).
			d.say("WARNING: %v: events are counted but not written until the state directory is writable", err)
		}
		j.RegisterMetrics(d.reg)
		// The journal outlives the components: it stops in shutdown,
		// after them, so that what they emit while stopping (capture
		// flushes its open flows) still reaches the log.
		go j.Run(context.Background())
	}
	d.ledger.RegisterMetrics(d.reg)

	explicit, explicitMore := cfg.explicit, []string(nil)
	followExplicit := explicit == ""
	if followExplicit {
		// Each LAN interface's addresses a client can use (each IPv4
		// one, each global IPv6 one): a client asks its own gateway. One that
		// has none at start (not there yet) gets its listener when it
		// has one (watchLinks, SetExplicitAddrs).
		addrs := explicitListenAddrs(lans, wan, explicitIfAddrs)
		explicit, explicitMore = addrs[0], addrs[1:]
	}
	if explicit == "off" {
		explicit = ""
	}

	// What arrives on the WAN interface, the listeners drop (a socket
	// filter on each), in every mode: no open resolver, no open proxy.
	wanOpen, _ := parsePortProtos(cfg.wanOpen) // checked by check
	wdrop := wanDropFor(lans, wan, wanOpen, splitList(cfg.dnsListen), cfg.transparent, explicit)
	wanIdx, wanLoopback := 0, false
	if wdrop.any() {
		wanIdx, wanLoopback = wanIndex(wan)
	}

	// DNS first: the proxy and capture read its learned-address table.
	dnsCfg := dnsfilter.Config{Listen: splitList(cfg.dnsListen), Upstreams: splitList(cfg.upstreams), Deny: denyAnswer(cfg.denyAnswer)}
	dnsCfg.DropUDPFrom, dnsCfg.DropTCPFrom = wdrop.dns(wanIdx)
	dnsCfg.TunnelThreshold = cfg.tunnelAlarm
	if cfg.tunnelAlarm == 0 {
		dnsCfg.TunnelThreshold = -1 // off
	}
	table := dnsfilter.NewTable(0)
	d.table = table
	// The LAN's devices, from each LAN interface's neighbour table: which
	// addresses are one device's (lanFacts), and a client's MAC, for a
	// policy that names clients by MAC (the forwarder, the proxies,
	// capture and the firewall ask the same tables: lanMACs).
	var devs lanDeviceSet
	for _, lan := range lans {
		devs = append(devs, netutil.NewDevices(lan, func(err error) {
			if err == nil {
				d.log.Info("lan devices: the neighbour table can be read again", "lan", lan)
				return
			}
			d.log.Warn("lan devices: cannot read the neighbour table: each address is its own client, and has no MAC, meanwhile", "lan", lan, audit.LogError, err.Error())
		}))
	}
	d.macs = devs.macs(lans)
	// What the forwarder gave out before a restart, before anything
	// reads the table: the firewall seeds its learned sets with it, the
	// proxy vouches with it, capture follows it. Only what this
	// forwarder would learn under the running policy comes back.
	d.restoreLearned(ctx, &wg, table, dnsCfg)
	gate := &firewallGate{} // the firewall, once installed, takes allowed answers' addresses before the client gets them
	d.gate = gate
	dnsDeps := dnsfilter.Deps{Policy: d.store, Sink: d.sink, Logger: d.log, Registerer: d.reg, Table: table, Firewall: gate}
	if d.macs != nil {
		dnsDeps.MACs, dnsDeps.Devices = d.macs, d.macs
	}
	if d.dns, err = dnsfilter.New(dnsCfg, dnsDeps); err != nil {
		d.degrade("dns", dnsNotRunning(err, err.Error()))
	}
	// What the forwarder gave one address of a LAN device, it gave the
	// device (lanFacts): the proxy and capture ask the same facts.
	facts := lanFacts{Table: table}
	if d.macs != nil {
		facts.devices = d.macs
	}
	var dnsFacts interface {
		NamesFor(client, addr netip.Addr) []string
	} = facts
	var resolver proxy.Resolver
	if d.dns != nil {
		resolver = d.dns
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := d.dns.Run(ctx); err != nil && ctx.Err() == nil {
				d.degrade("dns", dnsNotRunning(err, listenCapHint(err, caps, "CAP_NET_BIND_SERVICE to listen on port 53 (or give --dns-listen a port above 1023)")))
			}
		}()
	}

	pcfg := proxy.Config{TransparentAddr: cfg.transparent, ExplicitAddr: explicit, ExplicitMore: explicitMore, Inspect: cfg.inspect, StateDir: cfg.stateDir,
		ProxyUserDigests: d.proxyUsers}
	pcfg.MaxConns, pcfg.MaxConnsPerClient = proxyLimits(mem.Available())
	pcfg.DropTransparentFrom, pcfg.DropExplicitFrom = wdrop.proxy(wanIdx)
	proxyStopped := make(chan struct{}) // closed once the proxy's Run has returned (and its failure is recorded)
	pdeps := proxy.Deps{Policy: d.store, Sink: d.sink, Logger: d.log, Registerer: d.reg, DNS: dnsFacts, Resolver: resolver, Accepted: d.proxyAccepted}
	if d.macs != nil {
		pdeps.MACs, pdeps.Devices = d.macs, d.macs
	}
	var fastQueue *nfq.Conn
	if cfg.fastPath && eng.Mode() == policy.ModeEnforce {
		// Only in enforce mode: audit mode has no fast path, and a
		// reload to enforce opens it then (reloadPolicy).
		fastQueue = d.openFastPath(caps, &pcfg, &pdeps)
	}
	breakProxyConfigHook(&pcfg)
	if d.proxy, err = proxy.New(pcfg, pdeps); err != nil {
		d.degrade("proxy", err.Error())
		if d.cfg.fastPath && eng.Mode() == policy.ModeEnforce {
			// Nobody would read the queue: the ruleset goes in
			// without the fast path, as when the queue cannot be had
			// (in audit mode, the reload to enforce says so).
			d.noFastPathProxy(fastQueue, pdeps.Inject, err.Error())
			fastQueue = nil
		}
	}
	cfg.fastPath = d.cfg.fastPath // off when its queue could not be had or read
	if !cfg.noFirewall {
		// Once the fast path is known to be on or off: it takes a tag.
		d.checkTags(eng)
	}
	if d.proxy != nil {
		wg.Add(2)
		go func() {
			defer wg.Done()
			select {
			case <-d.proxy.Ready():
				if t, _ := d.proxy.Addrs(); t != nil {
					d.proxyState.CompareAndSwap(0, 1)
				}
			case <-proxyStopped:
			}
		}()
		go func() {
			defer wg.Done()
			defer close(proxyStopped)
			defer d.proxyState.Store(2)
			if err := d.proxy.Run(ctx); err != nil && ctx.Err() == nil {
				d.degrade("proxy", listenCapHint(err, caps, "CAP_NET_BIND_SERVICE for a listen port below 1024"))
			}
		}()
		prx := d.proxy
		d.serveFast = func(q *nfq.Conn) {
			d.fastOpen = true
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer q.Close()
				stop := breakQueueHook(ctx, q)
				defer stop()
				d.queueEnded(ctx, prx.ServeQueue(ctx, q))
			}()
		}
		if fastQueue != nil {
			d.serveFast(fastQueue)
		}
	}

	// What holds an interface's index where the operator named the
	// interface follows it (watchLinks): the WAN filters, capture.
	var follow []func()
	if wdrop.any() && !wanLoopback {
		dns, prx := d.dns, d.proxy
		follow = append(follow, d.followWAN(wan, wanIdx, func(idx int) error {
			var errs []error
			if dns != nil {
				errs = append(errs, dns.SetDropFrom(wdrop.dns(idx)))
			}
			if prx != nil {
				errs = append(errs, prx.SetDropFrom(wdrop.proxy(idx)))
			}
			return errors.Join(errs...)
		}))
	}

	// Capture sees every packet of the LAN interfaces (AF_PACKET: CAP_NET_RAW).
	var capOpen func() []audit.Event // capture's open flows, when it runs
	switch {
	case len(lans) == 0:
		d.degrade("capture", "no LAN interface (give --lan IFACE)")
	case !caps.netRaw:
		d.degrade("capture", "needs CAP_NET_RAW to open an AF_PACKET socket on "+strings.Join(lans, ", ")+" (run as root, or grant it: see the systemd unit)")
	default:
		// The TCP ports the firewall redirects to the proxy in enforce
		// mode, the same list (validated above): capture judges the
		// others as nftables does.
		tcpPorts, _ := parseTCPPorts(cfg.tcpPorts)
		ringMB := captureRingMB(mem.Available(), len(lans))
		cdeps := capture.Deps{Policy: d.store, Sink: d.sink, Logger: d.log, Registerer: d.reg, DNS: captureFacts{facts}, Devices: facts.devices}
		if d.macs != nil {
			cdeps.MACs = d.macs
		}
		if d.capture, err = capture.New(capture.Config{Interfaces: lans, TCPPorts: tcpPorts, RingMB: ringMB, ProxyLines: d.proxyLines, ProxyTells: d.proxy != nil, Firewall: d.redirecting.Load}, cdeps); err != nil {
			d.degrade("capture", err.Error())
			break
		}
		d.proxyTells.Store(d.capture) // before it opens: a connection it sees may be one the proxy accepts now
		capOpen = d.capture.OpenFlows
		// An interface that does not exist (yet) is left out until it
		// appears, and one re-made (another index) is listened on again:
		// watchLinks calls Follow. Meanwhile the part is not running
		// there, and says so (captureHealth).
		err := d.capture.Open()
		if len(d.capture.Listening()) == 0 && !onlyMissing(d.capture.NotListening()) {
			d.degrade("capture", err.Error())
			d.capture = nil
			d.proxyTells.Store(nil)
			break
		}
		capt := d.capture
		var ended atomic.Bool // Run returned: its failure is the part's state
		on := "listening on " + orNone(strings.Join(capt.Listening(), ", "))
		if not := capt.NotListening(); len(not) > 0 {
			on += "; not on " + strings.Join(notListeningNames(lans, capt.Listening()), ", ") + " (below)"
		}
		d.say("capture: %s", on)
		d.say("capture: ring %d MiB per interface", ringMB)
		d.captureHealth(capt, &ended)
		follow = append(follow, func() {
			if capt.Follow() {
				d.captureHealth(capt, &ended)
			}
		})
		wg.Add(1)
		go func() {
			defer wg.Done()
			err := capt.Run(ctx)
			ended.Store(true)
			if err != nil && ctx.Err() == nil {
				d.degrade("capture", err.Error())
			}
		}()
	}
	d.setOpenFlows(capOpen)
	// The gateway's own addresses, for the proxies' guard and capture,
	// and the explicit listeners on the LAN addresses follow address
	// changes (watchLinks wakes on address notices too).
	var ownUsers []func([]netip.Addr)
	if d.proxy != nil {
		ownUsers = append(ownUsers, d.proxy.SetOwnAddrs)
	}
	if d.capture != nil {
		ownUsers = append(ownUsers, d.capture.SetOwnAddrs)
	}
	if len(ownUsers) > 0 {
		af := &addrFollower{read: netutil.HostAddrs, users: ownUsers, log: d.log}
		follow = append(follow, af.check)
	}
	var explicitWake <-chan struct{}
	if d.proxy != nil && explicit != "" {
		prx := d.proxy
		downSaid := false // the part is degraded for a listener down
		follow = append(follow, func() {
			// SetExplicitAddrs logs; what did not open is tried again on
			// the next wake-up. Once every one is open, a listener that
			// did not open at start (a LAN address still in IPv6
			// duplicate address detection) runs: the part is no longer
			// degraded. A listener whose accept failed is the part not
			// running until the proxy has opened it again.
			var setErr error
			if followExplicit {
				setErr = prx.SetExplicitAddrs(explicitListenAddrs(lans, wan, explicitIfAddrs))
			}
			if down := prx.ExplicitDown(); len(down) > 0 {
				d.degrade("explicit-proxy", explicitDownWhy(down))
				downSaid = true
				return
			}
			switch {
			case followExplicit && setErr == nil, !followExplicit && downSaid:
				d.undegrade("explicit-proxy")
			case downSaid:
				// Open again, but another address does not open.
				d.degrade("explicit-proxy", setErr.Error())
			}
			downSaid = false
		})
		explicitWake = prx.ExplicitChanges()
	}
	if len(follow) > 0 {
		var wakes []<-chan struct{}
		if d.capture != nil {
			wakes = append(wakes, d.capture.Changes()) // a socket failed, or is due to be opened again
		}
		if explicitWake != nil {
			wakes = append(wakes, explicitWake) // an explicit listener failed, or is open again
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			d.watchLinks(ctx, follow, wakes...)
		}()
	}

	// Wait for the listeners before the firewall points traffic at them.
	if d.dns != nil {
		select {
		case <-d.dns.Ready():
			d.say("dns: listening on %s", joinAddrPorts(d.dns.Addrs()))
		case <-time.After(5 * time.Second):
		case <-ctx.Done():
		}
	}
	if d.proxy != nil {
		// What is listening, not what was asked for: a listener that
		// failed to open stops the proxy (its Run returns the error, a
		// part not running in the summary below and /readyz).
		select {
		case <-d.proxy.Ready():
			t, e := d.proxy.Addrs()
			if err := d.proxy.ExplicitErr(); err != nil {
				// The transparent proxy runs without it, and the
				// explicit listeners that opened serve.
				d.degrade("explicit-proxy", listenCapHint(err, caps, "CAP_NET_BIND_SERVICE for a listen port below 1024"))
				if e == nil {
					d.say("proxy: transparent on %s, explicit not listening", addrOrOff(t))
					break
				}
			}
			auth := ""
			if e != nil && len(d.proxyUsers) > 0 {
				auth = fmt.Sprintf(" (HTTP Basic authentication, %d users)", len(d.proxyUsers))
			}
			explicit := "explicit off"
			if ea := d.proxy.ExplicitAddrs(); len(ea) > 0 {
				explicit = "explicit on " + joinAddrs(ea)
			}
			d.say("proxy: transparent on %s, %s%s", addrOrOff(t), explicit, auth)
			if pcfg.MaxConns > 0 {
				d.say("proxy: at most %d connections, %d per client (memory)", pcfg.MaxConns, pcfg.MaxConnsPerClient)
			}
		case <-proxyStopped:
			d.say("proxy: not listening")
		case <-time.After(5 * time.Second):
		case <-ctx.Done():
		}
	}

	if wan != "" && !slices.Contains(lans, wan) {
		// What listens, not what was asked for: a listener that did not
		// open drops nothing.
		dnsOn := d.dns != nil && isClosed(d.dns.Ready())
		proxyOn := d.proxy != nil && isClosed(d.proxy.Ready()) && !isClosed(proxyStopped)
		var tOn, eOn bool
		if proxyOn {
			t, _ := d.proxy.Addrs()
			tOn, eOn = t != nil, len(d.proxy.ExplicitAddrs()) > 0
		}
		d.say("%s", wanDropSay(wan, wdrop.listening(dnsOn, tOn, eOn), wanIdx, wanLoopback))
	}
	// --guard-wan guards only when egressd installs the firewall: with
	// --no-firewall it installs nothing.
	why := auditWANExposure(lans, wan, cfg.guardWAN && !cfg.noFirewall, !wanLoopback, splitList(cfg.dnsListen), wanOpen, interfaceAddrs(wan))
	if eng.Mode() != policy.ModeAudit {
		why = enforceWANExposure(lans, wan, splitList(cfg.dnsListen), wanOpen, interfaceAddrs(wan))
	}
	if why != "" {
		d.log.Warn(why, "wan", wan)
		d.say("warning: %s", why)
	}

	switch {
	case cfg.noFirewall:
		d.say("firewall: not touched (--no-firewall): bring traffic to the listeners yourself")
		d.savePolicy(false)
	case eng.Mode() == policy.ModeAudit && !cfg.masquerade && !cfg.guardWAN:
		// Audit mode never redirects or blocks (fail-open by design: see
		// the firewall package), so there is nothing to install; but a
		// table an enforce run left (its stop leaves it, fail-closed)
		// would go on blocking: it goes.
		d.say("firewall: audit mode: nothing installed, traffic is only observed")
		if caps.netAdmin {
			if d.removeLeftoverFirewall() {
				// No ruleset of an earlier policy is in the kernel: the
				// copy is the running policy's (the report's unused
				// rules). Left at the earlier one's while a table may
				// remain.
				d.savePolicy(false)
			}
		} else {
			// Without CAP_NET_ADMIN egressd can neither see nor remove
			// such a table: the gateway may go on enforcing while this
			// run says audit, so that is a part not running.
			d.degrade("firewall", leftoverHint("cannot check for, nor remove, a table inet "+firewall.TableName+" an earlier enforce run may have left (needs CAP_NET_ADMIN)"))
		}
	case !caps.netAdmin:
		d.degrade("firewall", "needs CAP_NET_ADMIN to install nftables rules (run as root, or use --no-firewall)")
	default:
		if err := d.startFirewall(lans, wan, gate); err != nil {
			d.degrade("firewall", err.Error())
		}
	}

	adminAddr, err := d.serveAdmin(ctx, &wg)
	if err != nil {
		d.degrade("admin", err.Error())
	} else {
		d.say("admin: http://%s/ (report), /report.json, /metrics, /healthz, /readyz", adminAddr)
	}
	for part, why := range d.degradedParts() {
		d.say("NOT RUNNING: %s: %s", part, why)
	}
	sdnotify.Notify(sdnotify.Ready)
	d.log.Info("egressd running", audit.LogMode, string(eng.Mode()), "policy", d.source)

	for {
		select {
		case <-hup:
			d.reload()
		case qerr := <-d.fastFailed:
			d.fastPathFailed(qerr)
		case <-d.fastRetry:
			d.dropFastPath()
		case <-ctx.Done():
			return d.shutdown(cancel, &wg)
		}
	}
}

// openFastPath opens the fast path's queue and the injector for its
// deny answers and resets, before the firewall installs the rules that
// queue to it (firewall's chain fastpath), and sets the proxy's side of
// it in pcfg and pdeps. When either cannot be had (another process holds
// the queue; no CAP_NET_ADMIN or CAP_NET_RAW), the rules would queue
// new connections to no reader (the kernel drops them) or to a
// stranger's: egressd goes on as if --fast-path were not given (the
// plain ruleset, its record and note say so: d.cfg.fastPath is cleared),
// those connections go through the proxy, and the part is not running
// (/readyz: the operator asked for it). Nil then.
func (d *daemon) openFastPath(caps capabilities, pcfg *proxy.Config, pdeps *proxy.Deps) *nfq.Conn {
	var why string
	what := "its queue" // the one that could not be opened
	inj, err := nfq.NewInjector(d.fwNetNS)
	if err != nil {
		what = "its injector (raw sockets for its resets)"
		why = withCapHint(err, caps.netRaw, "CAP_NET_RAW (the fast path's raw sockets for its resets)")
	} else {
		q, err := nfq.OpenConfig(nfq.Config{Queue: firewall.DefaultFastPathQueue, NetNS: d.fwNetNS})
		if err == nil {
			fcfg, _ := firewallConfig(d.cfg, nil, "", "") // checked by checkFlagValues
			pcfg.FastMarks = proxy.FastMarks(firewall.FastMarks(fcfg))
			pcfg.FastPorts = portList(fcfg.FastPathPorts)
			pdeps.Inject = inj
			return q
		}
		inj.Close()
		why = withCapHint(err, caps.netAdmin, "CAP_NET_ADMIN (the fast path's NFQUEUE queue)")
	}
	d.noFastPath(nil, nil, what+" cannot be opened; the ruleset goes in without it and new connections to the fast ports go through the proxy", why+" (off: connections go through the proxy)", why)
	return nil
}

// noFastPath turns the fast path off before a ruleset with it goes in
// (d.cfg.fastPath cleared: the ruleset, its record and note are without
// it), closing its queue and injector if they were opened: the part is
// not running, for reason, and one warning line says what (after "the
// fast path is off: "), with err.
func (d *daemon) noFastPath(q *nfq.Conn, inj proxy.Injector, what, reason, err string) {
	if q != nil {
		q.Close()
	}
	if c, ok := inj.(io.Closer); ok {
		c.Close()
	}
	d.cfg.fastPath = false
	// One line, the warning: the part is not running (/readyz, the
	// summary), without degrade's own line besides.
	d.setDegraded("fast-path", reason)
	d.log.Warn("the fast path is off: "+what, audit.LogError, err)
}

// noFastPathProxy is noFastPath when the proxy, which would read the
// queue, could not be made (why: proxy.New's error).
func (d *daemon) noFastPathProxy(q *nfq.Conn, inj proxy.Injector, why string) {
	d.noFastPath(q, inj, "the proxy, which reads its queue, is not running; the ruleset goes in without it (new connections to the fast ports are redirected to the proxy's port, as without --fast-path)",
		"the proxy, which reads its queue, is not running (off)", why)
}

// fastPathForEnforce opens the fast path's queue when a reload turns the
// policy to enforce and none is open (a start in audit mode opens none:
// the fast path is enforce mode's), before the ruleset goes in: as at
// a start in enforce mode, it goes in without the fast path when the
// queue or injector cannot be had.
func (d *daemon) fastPathForEnforce(eng *policy.Engine) {
	if !d.cfg.fastPath || d.fastOpen {
		return
	}
	var q *nfq.Conn
	var pcfg proxy.Config
	var pdeps proxy.Deps
	if d.proxy == nil || d.serveFast == nil {
		d.noFastPathProxy(nil, nil, d.degradedParts()["proxy"])
	} else {
		q = d.openFastPath(d.caps, &pcfg, &pdeps)
	}
	if q == nil {
		if d.fw != nil {
			// Installed in audit mode with the fast path asked for:
			// its enforce ruleset goes in without it.
			d.fw.DropFastPath(eng)
		}
		return
	}
	d.proxy.SetFast(pcfg.FastMarks, pcfg.FastPorts, pdeps.Inject)
	d.serveFast(q)
}

// queueEnded takes the end of the fast path's queue reader
// (proxy.ServeQueue's error, on its goroutine). A QueueError says the
// reader failed while egressd ran (ServeQueue reads the stop before it
// says so: a failure the stop caused is none), and the connections
// pending then are recorded fast-path-failed: the line that says why is
// written whatever comes after. The ruleset queues to a queue no one
// reads: the main loop puts it in again without the fast path
// (fastPathFailed); once the stop has begun, the main loop may have
// left, and the stop writes the line instead (fastFailedStopping): here,
// or from the failure left unread (shutdown).
func (d *daemon) queueEnded(ctx context.Context, err error) {
	var qerr *proxy.QueueError
	if !errors.As(err, &qerr) {
		return
	}
	select {
	case d.fastFailed <- qerr:
	case <-ctx.Done():
		d.fastFailedStopping(qerr)
	}
}

// fastFailedStopping writes the line of a fast path's queue reader that
// failed as egressd stops (queueEnded, shutdown): the ruleset is left as
// the stop leaves it.
func (d *daemon) fastFailedStopping(qerr *proxy.QueueError) {
	d.log.Warn("the fast path is off: its queue reader failed as egressd was stopping; those pending a decision are lost", audit.LogError, qerr.Error(), "pending_lost", qerr.Pending)
}

// fastPathFailed: the fast path's queue reader failed while running
// (proxy.ServeQueue's error). The ruleset queues the new connections to
// the fast ports to no one (no bypass: the kernel drops them), so it
// goes in again without the fast path, as a start whose queue cannot be
// had installs it, and those connections go through the proxy. The
// conntrack marks are read as at a reload (firewall.DropFastPath): the
// connections the kernel forwarded on the fast path are cut, since
// without it their mark is no rule's and the proxy's ports are not
// forwarded (the firewall's line counts them, flows_cut); the ones
// pending a decision lose their reader and are dropped (fail closed).
// The record and the note say fast_path false, for the next start.
func (d *daemon) fastPathFailed(qerr *proxy.QueueError) {
	d.cfg.fastPath = false
	d.fastErr, d.fastTries = qerr, 0
	d.dropFastPath()
}

// fastRetryMax bounds the wait between two tries of the ruleset without
// the fast path while nftables refuses it (dropFastPath).
const fastRetryMax = 30 * time.Second

// dropFastPath puts the ruleset in without the fast path once its queue
// reader failed (fastPathFailed, d.fastErr). When nftables refuses it,
// the ruleset in the kernel queues the new connections to the fast
// ports to no one: the part says so (an error line, /readyz) and the
// main loop tries again (d.fastRetry: after 1 s, doubling up to
// fastRetryMax; a reload meanwhile renders without the fast path too)
// until it goes in, and says so then.
func (d *daemon) dropFastPath() {
	qerr := d.fastErr
	d.fastRetry = nil
	retry := d.fastTries > 0
	reason := "its queue reader failed: " + qerr.Error() + " (off: connections go through the proxy)"
	what := "its queue reader failed; the ruleset went in again without it and new connections to the fast ports go through the proxy; the connections the kernel forwarded on it are cut (firewall: flows_cut), those pending a decision are lost"
	if d.fw != nil {
		eng := d.store.Load()
		if eng.Mode() == policy.ModeEnforce {
			// Noted before it goes in (pendingFile), as a reload does.
			d.notePending(d.src)
		}
		replaced, err := d.fw.DropFastPath(eng)
		switch {
		case err != nil:
			d.fastTries++
			wait := time.Second << min(d.fastTries-1, 5)
			wait = min(wait, fastRetryMax)
			d.fastRetry = time.After(wait)
			reason = "its queue reader failed: " + qerr.Error() + "; nftables refused the ruleset without it: " + err.Error() + ": new connections to the fast ports fail (closed) until it goes in (tried again every " + fastRetryMax.String() + " at most)"
			what = "its queue reader failed, and nftables refused the ruleset without it: new connections to the fast ports fail (closed) until it goes in (tried again); those pending a decision are lost"
			d.setDegraded("fast-path", reason)
			if retry {
				d.log.Error("the fast path is off: nftables refused the ruleset without it again: new connections to the fast ports fail (closed) until it goes in", audit.LogError, err.Error(), "tries", d.fastTries, "retry_in", wait.String())
				return
			}
			d.log.Error("the fast path is off: "+what, audit.LogError, qerr.Error()+"; "+err.Error(), "pending_lost", qerr.Pending, "retry_in", wait.String())
			return
		case replaced:
			d.savePolicy(true)
		case retry:
			// A reload or the firewall's re-render at an expiry put one
			// without it in since the refusal: the record says so.
			d.savePolicy(true)
		default:
			// None with the fast path is installed: the mode's has none.
			what = "its queue reader failed; the ruleset (" + string(eng.Mode()) + " mode) does not use it and will go in without it"
		}
	} else {
		what = "its queue reader failed; no ruleset is installed, and none will go in with it"
	}
	d.setDegraded("fast-path", reason)
	if retry {
		d.log.Warn("the fast path is off: the ruleset without it is in, after nftables refused it; new connections to the fast ports go through the proxy", "tries", d.fastTries+1)
		d.fastTries = 0
		return
	}
	d.log.Warn("the fast path is off: "+what, audit.LogError, qerr.Error(), "pending_lost", qerr.Pending)
}

// checkTags warns when the ruleset egressd installs for eng, with the
// fast path as it is now (openFastPath may have turned it off), has
// fewer tags than eng has rules that forward: rules share tags, and a
// reload still cuts what it no longer allows, but may cut some flows of
// unchanged rules too. Said at start, in audit mode too (the firewall
// may first install on a reload to enforce), so the operator can widen
// --ct-mark-bits; not a reason to refuse a policy that worked before the
// flag existed.
func (d *daemon) checkTags(eng *policy.Engine) {
	fc, _ := firewallConfig(d.cfg, nil, "", "") // checked by checkFlagValues
	if err := fc.CheckTags(eng); err != nil {
		d.log.Warn("firewall: rules will share conntrack mark tags", audit.LogError, err.Error())
	}
}

// removeLeftoverFirewall removes the nftables table an earlier egressd
// in enforce mode left, if there is one; it reports whether none is left.
func (d *daemon) removeLeftoverFirewall() bool {
	fw, err := firewall.New(firewall.Config{NetNS: d.fwNetNS}, firewall.Deps{Logger: d.log})
	if err != nil {
		d.degrade("firewall", err.Error())
		return false
	}
	defer fw.Close()
	had, err := fw.RemoveLeftover()
	switch {
	case err != nil:
		d.degrade("firewall", leftoverHint("could not remove the table an earlier enforce run left: "+err.Error()))
		return false
	case had:
		d.say("firewall: removed the nftables table inet %s an earlier run in enforce mode left", firewall.TableName)
	}
	return true
}

// leftoverHint completes why a leftover table could not be removed with
// what it means and how to lift it.
func leftoverHint(why string) string {
	return why + "; if it is there, the gateway goes on enforcing it in audit mode: run `egressd firewall remove` as root"
}

// startFirewall installs the ruleset and hands it to the DNS forwarder's
// gate, which feeds it the addresses of allowed answers.
func (d *daemon) startFirewall(lans []string, wan string, gate *firewallGate) error {
	fcfg, err := firewallConfig(d.cfg, lans, wan, d.fwNetNS)
	if err != nil {
		return err
	}
	// The flows a reload cuts go to capture, which records each on its
	// own record of the flow (its start, name and bytes: counted once in
	// the report), or to the event log as the firewall reports them when
	// capture does not run.
	var cuts audit.Sink = d.sink
	if d.capture != nil {
		cuts = audit.SinkFunc(d.capture.Revoke)
	}
	// The answers the forwarder gave out before (in audit mode, say):
	// their clients keep using them, and the enforce ruleset's learned
	// sets start with them (the firewall takes those its rules cover).
	var given func() []firewall.Given
	if table := d.table; table != nil {
		given = func() []firewall.Given {
			ls := table.HeldAll(nil)
			out := make([]firewall.Given, len(ls))
			for i, l := range ls {
				out[i] = firewall.Given{Client: l.Client, Name: l.Name, Addr: l.Addr, Until: l.Expires}
			}
			return out
		}
	}
	fdeps := firewall.Deps{Logger: d.log, Registerer: d.reg, Sink: cuts, Given: given, Previous: d.prevPolicy, PreviousTCPPorts: d.prevTCPPorts, PreviousCTMarkBits: d.prevCTMarkBits, PreviousFastPath: d.prevFastPath, Pending: d.prevPending}
	if d.macs != nil {
		fdeps.MACs = d.macs
	}
	fw, err := firewall.New(fcfg, fdeps)
	if err != nil {
		return err
	}
	eng := d.store.Load()
	if eng.Mode() == policy.ModeEnforce {
		// Noted before it goes in: a kill before the copy below leaves
		// the note (pendingFile).
		d.notePending(d.src)
	}
	if err := fw.Install(eng); err != nil {
		return err
	}
	d.fw = fw
	d.redirecting.Store(true)
	// Only now: the copy is that of the policy whose ruleset is in the
	// kernel (the next start reads the marks as its rules').
	d.savePolicy(true)
	// The redirect goes to the port of the first DNS address (listenPort
	// above), which the list's other addresses may cover for IPv6.
	dnsAddrs := splitList(d.cfg.dnsListen)
	for _, l := range []struct{ what, addr string }{{"--proxy-listen", d.cfg.transparent}, {"--dns-listen", firstOf(dnsAddrs)}} {
		if why := redirectMisses(l.addr); why != "" && !(l.what == "--dns-listen" && len(dnsAddrs) > 1 && strings.Contains(why, "IPv4-only")) {
			d.log.Warn("firewall: "+l.what+" "+l.addr+": "+why, "flag", l.what, "addr", l.addr)
			d.say("warning: %s %s: %s", l.what, l.addr, why)
		}
	}
	rs := fw.Ruleset()
	d.say("firewall: installed nftables table inet %s (%d chains, %d sets; LAN %s, WAN %s); `nft list table inet %s` shows it", firewall.TableName, len(rs.Chains), len(rs.Sets), orOff(strings.Join(lans, ", ")), orOff(wan), firewall.TableName)
	gate.fw.Store(fw)
	return nil
}

// firewallGate is the firewall as the DNS forwarder sees it
// (dnsfilter.Firewall): an allowed answer reaches the client only once the
// firewall has its addresses in its sets, so the client's first UDP packet
// is not dropped. The firewall is installed after DNS starts (and not at
// all in plain audit mode); until then the gate wants nothing.
type firewallGate struct {
	fw atomic.Pointer[firewall.Firewall]
}

func (g *firewallGate) Wants(rule string) bool {
	fw := g.fw.Load()
	return fw != nil && fw.Wants(rule)
}

func (g *firewallGate) WantsAny() bool {
	fw := g.fw.Load()
	return fw != nil && fw.WantsAny()
}

// Learn hands the forwarder's answers to the firewall with the policy
// they were decided under, who asked and for what name: the firewall
// learns an address decided under another policy than its installed one
// only for a rule of that policy that covers it (firewall.ErrNotCovered
// otherwise).
func (g *firewallGate) Learn(ctx context.Context, eng *policy.Engine, ls []dnsfilter.Learned) error {
	fw := g.fw.Load()
	if fw == nil {
		return errors.New("egressd: no firewall installed")
	}
	var buf [8]firewall.Address
	as := buf[:0]
	now := time.Now()
	for _, l := range ls {
		as = append(as, firewall.Address{Rule: l.Rule, Addr: l.Addr, TTL: l.Expires.Sub(now), Engine: eng, Client: l.Client, ClientMAC: l.ClientMAC, Name: l.Name})
	}
	return fw.LearnAll(ctx, as)
}

// reload re-reads the policy and the --proxy-users file (SIGHUP), each on
// its own: the users do not depend on the policy, so a refused policy does
// not keep a changed users file out, nor the other way round. An invalid
// policy keeps the old one running; a valid one is swapped atomically into
// every part. The reload counts as failed when either is refused.
func (d *daemon) reload() {
	sdnotify.Notify(sdnotify.Reloading)
	defer sdnotify.Notify(sdnotify.Ready)
	d.reloadWhy = d.reloadWhy[:0]
	policyOK := d.reloadPolicy()
	usersOK := d.reloadProxyUsers()
	if d.admin != nil && !(policyOK && usersOK) {
		// The reports say so too, with why, until a reload succeeds;
		// not that the old policy runs when this reload's got in.
		if policyOK {
			d.admin.ConfigPartlyLoaded(time.Now(), strings.Join(d.reloadWhy, "; "))
		} else {
			d.admin.ConfigFailed(time.Now(), strings.Join(d.reloadWhy, "; "))
		}
		return
	}
	d.configLoaded(policyOK && usersOK)
}

// reloadPolicy re-reads the policy; it reports whether the running policy
// is the new one.
func (d *daemon) reloadPolicy() bool {
	eng, src, err := d.loadPolicy()
	if err != nil {
		d.log.Error("reload failed, keeping the running policy", "policy", d.source, audit.LogError, err.Error())
		d.reloadWhy = append(d.reloadWhy, err.Error())
		return false
	}
	old := d.store.Swap(eng)
	d.ledger.SetPolicy(eng)
	if eng.Mode() == policy.ModeEnforce && !d.cfg.noFirewall {
		// Before the ruleset and its note: whether it has the fast
		// path is known once its queue is open, or could not be.
		d.fastPathForEnforce(eng)
	}
	if d.fw != nil && eng.Mode() == policy.ModeEnforce {
		// Noted before it goes in (pendingFile).
		d.notePending(src)
	}
	if err := d.replaceFirewall(eng); err != nil {
		d.store.Swap(old)
		d.ledger.SetPolicy(old)
		if d.proxy != nil {
			// Connections the proxy decided while the refused policy was
			// swapped in are decided again under the running one: a
			// refused reload changes nothing that lives on.
			d.proxy.Redecide()
		}
		d.log.Error("reload failed in nftables, keeping the running policy", audit.LogError, err.Error())
		d.reloadWhy = append(d.reloadWhy, "nftables refused the ruleset: "+err.Error())
		return false
	}
	// Only now: the copy is the running policy's, the one whose ruleset
	// is in the kernel (the next start reads the marks as its rules').
	d.src, d.srcEnforce = src, eng.Mode() == policy.ModeEnforce
	d.savePolicy(d.fw != nil)
	if d.fw == nil && old.Mode() == policy.ModeAudit && eng.Mode() == policy.ModeEnforce && !d.cfg.noFirewall {
		// A start in audit mode installed nothing; the rollout the README
		// describes switches to enforce with a reload, so the ruleset goes
		// in now, as a start in enforce mode would install it. Without it
		// the policy would say enforce while nothing is blocked.
		if !d.caps.netAdmin {
			d.degrade("firewall", "needs CAP_NET_ADMIN to install nftables rules (run as root, or use --no-firewall)")
		} else if err := d.startFirewall(d.lans, d.wan, d.gate); err != nil {
			d.degrade("firewall", err.Error())
		}
	}
	if d.fw == nil && eng.Mode() == policy.ModeEnforce && !d.cfg.noFirewall {
		d.log.Warn("the policy now says enforce, but no firewall is installed: restart egressd to install it")
	}
	if d.proxy != nil {
		// The connections the proxy already forwards are decided again:
		// those the new policy denies are closed (enforce) or recorded as
		// would-be-denied (audit). Only now, once nothing can take the
		// reload back.
		d.proxy.Redecide()
	}
	if d.capture != nil {
		// So are capture's live forwarded flows, where the firewall does
		// not (it cuts in enforce mode and tells capture): in audit mode
		// a flow the new policy would deny is recorded so, and after a
		// switch to enforce a flow from audit mode that the enforce
		// ruleset drops is recorded dropped.
		d.capture.Redecide(old)
	}
	d.log.Info("policy reloaded", "policy", d.source, "rules", len(eng.Rules()), audit.LogMode, string(eng.Mode()))
	return true
}

// proxyLines reports whether the transparent proxy writes the decision
// lines of the connections enforce mode redirects to it: it listens, and
// egressd's firewall, which redirects them, is installed (capture's
// Config.ProxyLines). Else nothing brings them to the proxy (with
// --no-firewall, a firewall that did not install, a listener that did not
// open or failed): capture's line is their only one.
func (d *daemon) proxyLines() bool {
	return d.redirecting.Load() && d.proxyState.Load() == 1
}

// proxyAccepted tells capture, once it runs, of a connection the
// transparent proxy accepted: the proxy writes its decision line, and
// capture none, whatever brought the connection there (an operator's
// own redirect under --no-firewall, which proxyLines cannot know of).
func (d *daemon) proxyAccepted(client, dest netip.AddrPort, ended func() bool) bool {
	if c := d.proxyTells.Load(); c != nil {
		return c.ProxyAccepted(client, dest, ended)
	}
	return false
}

// replaceFirewall hands a reloaded policy to the firewall, if one is
// installed.
func (d *daemon) replaceFirewall(eng *policy.Engine) error {
	if d.fw == nil {
		return nil
	}
	return d.fw.Replace(eng)
}

// reloadProxyUsers reads --proxy-users again, if it was given: a file
// egressd cannot use keeps the running users. It reports whether the
// users are the file's.
func (d *daemon) reloadProxyUsers() bool {
	if d.cfg.proxyUsers == "" || d.proxy == nil {
		return true
	}
	users, err := loadProxyUsers(d.cfg.proxyUsers)
	if err == nil {
		err = d.proxy.SetProxyUserDigests(users)
	}
	if err != nil {
		d.log.Error("reload of the proxy users failed, keeping the running ones", audit.LogError, err.Error())
		d.reloadWhy = append(d.reloadWhy, "proxy users: "+err.Error())
		return false
	}
	d.log.Info("proxy users reloaded", "users", len(users))
	d.warnUnsalted(users)
	return true
}

// warnUnsalted logs one warning per user of the --proxy-users file just
// read whose password is an unsalted SHA-256 digest: taken, but cracked
// quickly offline if the file leaks.
func (d *daemon) warnUnsalted(users map[string]proxy.UserSecret) {
	for _, name := range unsaltedUsers(users) {
		d.log.Warn("proxy user has an unsalted sha256 digest; replace its line with the output of egressd proxy-users hash NAME", "user", name, "file", d.cfg.proxyUsers)
	}
}

func (d *daemon) shutdown(cancel context.CancelFunc, wg *sync.WaitGroup) error {
	sdnotify.Notify(sdnotify.Stopping)
	d.log.Info("stopping")
	cancel()
	var errs []error
	if d.fw != nil {
		// Enforce mode stays fail-closed while egressd is down, stopped
		// cleanly or not: the ruleset stays in the kernel (redirected
		// traffic finds closed ports, the rest is dropped), so a restart,
		// or a start that fails on a broken policy, never opens the
		// gateway. The next start replaces the table in one transaction;
		// `egressd firewall remove` lifts it. In audit mode the table
		// (masquerade, WAN guard) goes, as documented.
		if d.store.Load().Mode() == policy.ModeEnforce {
			if err := d.fw.Detach(); err != nil {
				errs = append(errs, err)
			}
			d.log.Info("firewall: enforce mode: the nftables ruleset stays while egressd is stopped (fail-closed); `egressd firewall remove` lifts it", "table", "inet "+firewall.TableName)
		} else if err := d.fw.Remove(); err != nil {
			errs = append(errs, err)
		}
	}
	for _, c := range []io.Closer{closerOf(d.proxy), closerOf(d.dns), closerOf(d.capture)} {
		if c != nil {
			if err := c.Close(); err != nil {
				errs = append(errs, err)
			}
		}
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		errs = append(errs, errors.New("run: parts did not stop within 10s"))
	}
	select {
	case qerr := <-d.fastFailed:
		// The queue reader failed just before the stop, and the main
		// loop took the stop first: its pending connections' events say
		// fast-path-failed, and the line says why (queueEnded).
		d.fastFailedStopping(qerr)
	default:
	}
	if d.learned != nil {
		// After DNS stopped: nothing learns any more. A failure was
		// logged; the next start begins from the last periodic write.
		// A periodic write stuck on a hung disk held the wait above for
		// its 10s; this one waits for it only learnedStopWait more, then
		// goes without, so that the rest of the stop (the event log's
		// close) is done before systemd's SIGKILL (TimeoutStopSec=20s).
		// The process ends once the kernel returns from the stuck write.
		d.learned.flush(learnedStopWait)
	}
	if d.journal != nil {
		if err := d.journal.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// closerOf returns c as an io.Closer, or nil for a nil pointer.
func closerOf[T any, P interface {
	*T
	Close() error
}](p P) io.Closer {
	if p == nil {
		return nil
	}
	return p
}

// serveAdmin serves the admin API (report, metrics, health) on its own
// listener, so that a bind error is known before the summary is printed.
func (d *daemon) serveAdmin(ctx context.Context, wg *sync.WaitGroup) (string, error) {
	checks := []admin.Check{{Name: "parts not running", Fn: func() error {
		if parts := d.degradedParts(); len(parts) > 0 {
			names := make([]string, 0, len(parts))
			for p, why := range parts {
				names = append(names, p+": "+why)
			}
			return errors.New(strings.Join(names, "; "))
		}
		return nil
	}}}
	if d.journal != nil {
		checks = append(checks, admin.Check{Name: "event log write failing", Fn: d.journal.Err},
			admin.Check{Name: "summary of rotated-out event log files failing", Fn: d.journal.FoldErr})
	}
	hosts := splitList(d.cfg.adminHosts)
	if h, _, err := net.SplitHostPort(d.cfg.admin); err == nil && h != "" && admin.CheckHost(h) == nil {
		hosts = append(hosts, h) // --admin gw.example.lan:9901
	}
	srv, err := admin.New(admin.Config{Addr: d.cfg.admin, Version: version, Hosts: hosts}, admin.Deps{Reporter: d.ledger, Registry: d.reg, Checks: checks, Logger: d.log.With(audit.LogComponent, "admin")})
	if err != nil {
		return "", err
	}
	d.admin = srv
	d.configLoaded(true)
	ln, err := net.Listen("tcp", d.cfg.admin)
	if err != nil {
		return "", err // the part's name, admin, goes with it
	}
	hs := &http.Server{Handler: srv.Handler(), ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 10 * time.Second, WriteTimeout: 60 * time.Second}
	wg.Add(1)
	go func() {
		defer wg.Done()
		stop := context.AfterFunc(ctx, func() {
			sctx, c := context.WithTimeout(context.Background(), 2*time.Second)
			defer c()
			hs.Shutdown(sctx)
		})
		defer stop()
		// The wrapper waits out EMFILE and the like with a pause
		// that Shutdown ends (TestFDExhaustion).
		err := hs.Serve(admin.RetryListener(ln, ctx.Done(), d.log))
		if ctx.Err() == nil && !errors.Is(err, http.ErrServerClosed) {
			// An accept error the wrapper does not wait out ends the
			// admin listener; the rest of egressd runs on.
			d.log.Error("admin: listener stopped", "listen", ln.Addr().String(), audit.LogError, audit.ErrorText(err))
		}
	}()
	return ln.Addr().String(), nil
}

// configLoaded records the outcome of a policy load in the admin metrics.
func (d *daemon) configLoaded(ok bool) {
	if d.admin != nil {
		d.admin.ConfigLoaded(ok, time.Now())
	}
}

func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

func firstOf(l []string) string {
	if len(l) == 0 {
		return ""
	}
	return l[0]
}

// orNone is s, or "none" when it is empty.
func orNone(s string) string {
	if s == "" {
		return "none"
	}
	return s
}

func orOff(s string) string {
	if s == "" {
		return "off"
	}
	return s
}

// addrOrOff is orOff for a bound address (nil: off).
func addrOrOff(a net.Addr) string {
	if a == nil {
		return "off"
	}
	return a.String()
}

// joinAddrs is addrOrOff for several bound addresses.
func joinAddrs(a []net.Addr) string {
	if len(a) == 0 {
		return "off"
	}
	s := make([]string, len(a))
	for i, x := range a {
		s[i] = x.String()
	}
	return strings.Join(s, ", ")
}

func joinAddrPorts(a []netip.AddrPort) string {
	s := make([]string, len(a))
	for i, x := range a {
		s[i] = x.String()
	}
	return strings.Join(s, ", ")
}

// auditWANExposure says, for a run in audit mode, that the DNS forwarder
// answers clients on the WAN side, "" when it does not or no WAN
// interface is known. The forwarder never denies in audit mode, so one
// that WAN-side hosts reach is an open resolver (amplification). Its
// sockets drop what arrives on the WAN interface (wanDrop, a socket
// filter, in every mode) unless the WAN interface is loopback (filtered
// false) or --wan-open lists the forwarder's port (wanOpen: the operator
// wants it reachable, and the firewall's guard, guarded, lets it in too).
// Without the filter the old rule holds: audit mode installs nothing, so
// only --guard-wan keeps WAN-side clients out. The forwarder is limited
// to the LAN anyway when every DNS listen address is a specific one the
// WAN interface does not hold (wanAddrs).
func auditWANExposure(lans []string, wan string, guarded, filtered bool, dnsListen []string, wanOpen []policy.PortRange, wanAddrs []netip.Addr) string {
	if wan == "" || slices.Contains(lans, wan) {
		// No WAN side apart from the LAN (one interface for both: the
		// forwarder must answer there, and --guard-wan would cut the LAN).
		return ""
	}
	if l, open := dnsWANOpen(dnsListen, wanOpen); len(open) > 0 {
		return fmt.Sprintf("audit mode: --wan-open %s lets clients on the WAN side (%s) reach the DNS forwarder (--dns-listen %s, every name allowed): an open resolver; take the port out of --wan-open", strings.Join(open, ","), wan, l)
	}
	exposed := dnsOnWANAddr(dnsListen, wanAddrs)
	if exposed == "" || filtered || guarded {
		return ""
	}
	return fmt.Sprintf("audit mode: the DNS forwarder (--dns-listen %s, every name allowed) and the proxies answer clients on the WAN side (%s) too, a loopback interface their socket filters leave alone: an open resolver; --guard-wan drops new connections from the WAN side (nothing else is installed; not with --no-firewall), or give --dns-listen the LAN address", exposed, wan)
}

// enforceWANExposure is auditWANExposure for enforce mode, where the
// firewall's guard and the socket filters keep the WAN side out but for
// the ports --wan-open lists: with the forwarder's among them, it answers
// clients there every name the policy allows.
func enforceWANExposure(lans []string, wan string, dnsListen []string, wanOpen []policy.PortRange, wanAddrs []netip.Addr) string {
	if wan == "" || slices.Contains(lans, wan) {
		return ""
	}
	l, open := dnsWANOpen(dnsListen, wanOpen)
	if len(open) == 0 {
		return ""
	}
	return fmt.Sprintf("enforce mode: --wan-open %s lets clients on the WAN side (%s) reach the DNS forwarder (--dns-listen %s): it answers them every name the policy allows, an open resolver for those names; take the port out of --wan-open", strings.Join(open, ","), wan, l)
}

// dnsWANOpen returns the first DNS listen address that is not loopback
// whose port --wan-open (wanOpen) lists, and those ports. Whatever the
// address (the LAN's too: a WAN neighbour can route to it), the listed
// port takes the socket filter off and the guard lets it in.
func dnsWANOpen(dnsListen []string, wanOpen []policy.PortRange) (string, []string) {
	for _, l := range dnsListen {
		host, _, err := net.SplitHostPort(l)
		if err != nil {
			continue
		}
		if a, err := netip.ParseAddr(host); err == nil && a.IsLoopback() {
			continue
		}
		if open := dnsPortsOpen(l, wanOpen); len(open) > 0 {
			return l, open
		}
	}
	return "", nil
}

// dnsOnWANAddr is the first DNS listen address WAN-side clients may
// address: every address, a name, or one of the WAN interface's
// (wanAddrs); "" when none is.
func dnsOnWANAddr(dnsListen []string, wanAddrs []netip.Addr) string {
	for _, l := range dnsListen {
		host, _, err := net.SplitHostPort(l)
		if err != nil {
			continue
		}
		a, err := netip.ParseAddr(host)
		if err != nil || a.IsUnspecified() || slices.Contains(wanAddrs, a.Unmap()) {
			return l
		}
	}
	return ""
}

// dnsPortsOpen lists the ports of the listen address addr that --wan-open
// (wanOpen) lists, UDP and TCP, such as "53/udp".
func dnsPortsOpen(addr string, wanOpen []policy.PortRange) []string {
	var open []string
	for _, proto := range []policy.Proto{policy.UDP, policy.TCP} {
		if p := listenPort(addr); portListed(wanOpen, p, proto) {
			open = append(open, fmt.Sprintf("%d/%s", p, proto))
		}
	}
	return open
}

// interfaceAddrs returns the addresses of an interface, nil when it has
// none or does not exist.
func interfaceAddrs(name string) []netip.Addr {
	if name == "" {
		return nil
	}
	i, err := net.InterfaceByName(name)
	if err != nil {
		return nil
	}
	addrs, _ := i.Addrs()
	var out []netip.Addr
	for _, a := range addrs {
		if p, err := netip.ParsePrefix(a.String()); err == nil {
			out = append(out, p.Addr().Unmap())
		}
	}
	return out
}

// redirectMisses says what LAN traffic the firewall's redirect would send
// past a listener on addr, "" when none: the redirect rewrites the
// destination to the address of the interface the packet came in on (the
// LAN address), so a listener on loopback gets nothing, and one on the
// IPv4 wildcard no IPv6 traffic.
func redirectMisses(addr string) string {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return ""
	}
	a, err := netip.ParseAddr(host)
	switch {
	case err != nil:
		return "" // a name, or empty: every address
	case a.IsLoopback():
		return "the redirect sends LAN traffic to the LAN interface's address, not to loopback: every redirected connection or query will fail; listen on the wildcard address (the default) or the LAN address"
	case a == netip.IPv4Unspecified():
		return "an IPv4-only listener: IPv6 traffic the redirect sends here will fail; listen on [::] (the default) for both"
	}
	return ""
}

// listenPort returns the port of a listen address, 0 when it has none.
func listenPort(addr string) uint16 {
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		return 0
	}
	n, _ := strconv.Atoi(p)
	return uint16(n)
}

// lanFacts is dnsfilter's learned-address table as the proxy and capture
// ask it about a client (NamesFor): the names the forwarder gave the
// address out for to that client, or, when it gave it to no such client,
// to another address of the client's device (netutil.Devices: one MAC in
// the LAN interface's neighbour table). A dual-stack device asks DNS over
// IPv4 (or from one IPv6 address) and connects from another address;
// what the forwarder told one of its addresses it told the device. The
// neighbour table is asked only then, and only when the forwarder gave
// the address out to some other client at all: never on the fast path.
type lanFacts struct {
	*dnsfilter.Table
	devices lanDevices // nil: each address is its own client
}

// lanDevices tells which LAN addresses are one device's
// (*netutil.Devices).
type lanDevices interface {
	SameDevice(a, b netip.Addr) bool
}

// lanDeviceSet is the devices of each LAN interface (one
// netutil.Devices each), in --lan's order; lanMACs asks them. Two
// addresses are one device's when one LAN interface's neighbour table
// says so: a MAC seen on two LAN interfaces (a host on two VLANs) is two
// devices, one on each.
type lanDeviceSet []*netutil.Devices

// SameDevice reports whether a and b are one device's (lanDevices): one
// LAN interface's neighbour table maps both to one device's MAC; an address with a zone (link-local) is looked up only
// on the interface its zone names, so that two links' devices with the
// same link-local address stay two, as ClientMAC keeps them.
func (m *lanMACs) SameDevice(a, b netip.Addr) bool {
	za, zb := a.Zone(), b.Zone()
	if za != "" && zb != "" && za != zb {
		return false
	}
	zone := za
	if zone == "" {
		zone = zb
	}
	for i, d := range m.devs {
		if zone != "" && m.names[i] != zone {
			continue
		}
		if d.SameDevice(a, b) {
			return true
		}
	}
	return false
}

// lanMACs is the LAN interfaces' neighbour tables as the forwarder, the
// proxies, capture and the firewall ask them a client's MAC
// (dnsfilter.ClientMACs, proxy.ClientMACs, capture.ClientMACs,
// firewall.ClientMACs): the first LAN interface whose table has a usable
// entry for the address (netutil.Devices.MAC); for an address with a zone
// (link-local: one address may be two devices' on two links), only the
// table of the interface the zone names. A client behind a router has
// none. They ask only while the running policy names MAC addresses.
type lanMACs struct {
	devs  lanDeviceSet
	names []string // the LAN interfaces' names, as devs
}

// macs returns s, the devices of the LAN interfaces named names (in that
// order), as lanMACs; nil without LAN interfaces.
func (s lanDeviceSet) macs(names []string) *lanMACs {
	if len(s) == 0 || len(names) != len(s) {
		return nil
	}
	return &lanMACs{devs: s, names: names}
}

// ClientMAC returns client's MAC, nil when no LAN interface's neighbour
// table has one for it (for a zoned address, when the zone names no LAN
// interface or its table has none).
func (m *lanMACs) ClientMAC(client netip.Addr) net.HardwareAddr {
	zone := client.Zone()
	for i, d := range m.devs {
		if zone != "" && m.names[i] != zone {
			continue
		}
		if mac, ok := d.MAC(client); ok {
			return net.HardwareAddr(mac[:])
		}
	}
	return nil
}

// ClientDevice returns the MAC of client's device where clients share
// limits (dnsfilter.ClientDevices, proxy.ClientDevices): as ClientMAC,
// from netutil.Devices.Device (a MAC with many addresses is one client;
// a new address is asked about again once the gateway has resolved it).
// nil for a client off the LANs' links: it stays a client of its own.
func (m *lanMACs) ClientDevice(client netip.Addr) net.HardwareAddr {
	zone := client.Zone()
	for i, d := range m.devs {
		if zone != "" && m.names[i] != zone {
			continue
		}
		if mac, ok := d.Device(client); ok {
			return net.HardwareAddr(mac[:])
		}
	}
	return nil
}

// ClientOnLink reports whether client is an address of a LAN interface's
// link (dnsfilter.ClientLinks, netutil.Devices.OnLink): one without a
// device there is a source the gateway has not resolved, which the
// forwarder's rate limit counts with all such sources as one client.
func (m *lanMACs) ClientOnLink(client netip.Addr) bool {
	zone := client.Zone()
	for i, d := range m.devs {
		if zone != "" && m.names[i] != zone {
			continue
		}
		if d.OnLink(client) {
			return true
		}
	}
	return false
}

// ResolveClient asks the kernel to resolve client on the LAN interfaces
// whose link it is on (dnsfilter.ClientLinks, netutil.Devices.Resolve).
func (m *lanMACs) ResolveClient(client netip.Addr) error {
	zone := client.Zone()
	var errs []error
	for i, d := range m.devs {
		if zone != "" && m.names[i] != zone || !d.OnLink(client) {
			continue
		}
		if _, err := d.Resolve(client); err != nil {
			errs = append(errs, fmt.Errorf("lan %s: %w", m.names[i], err))
		}
	}
	return errors.Join(errs...)
}

// NamesFor returns the names the forwarder gave addr out for to client,
// or else to another address of client's device; for the zero client,
// to any client.
func (f lanFacts) NamesFor(client, addr netip.Addr) []string {
	names := f.Table.NamesFor(client, addr)
	if len(names) > 0 || f.devices == nil || !client.IsValid() {
		return names
	}
	client = client.Unmap()
	for _, l := range f.Lookup(addr) {
		if l.Client == client || slices.Contains(names, l.Name) {
			continue
		}
		if f.devices.SameDevice(client, l.Client) {
			names = append(names, l.Name)
		}
	}
	return names
}

// dnsNotRunning is why, the reason the forwarder did not start (err),
// with what to do where the operator may not know: an upstream that loops
// back (resolv.conf naming a local stub) is replaced with --upstream-dns;
// a port another resolver holds is freed, or left to it. The forwarder
// does not try to listen again by itself.
func dnsNotRunning(err error, why string) string {
	switch {
	case errors.Is(err, dnsfilter.ErrUpstreamLoop):
		return why + "; give --upstream-dns the site's resolver"
	case errors.Is(err, syscall.EADDRINUSE):
		return why + "; another program holds the port (a resolver: systemd-resolved, dnsmasq, unbound): stop it, or give --dns-listen an address it leaves free (the LAN address), then start egressd again"
	}
	return why
}

// captureFacts is dnsfilter's learned-address table as capture asks it.
type captureFacts struct{ lanFacts }

// Given reports every client the forwarder gave addr out to, with the
// name, for as long as the enforce firewall would keep the address in its
// learned sets (dnsfilter.Table.Held), not only the answer's TTL.
func (c captureFacts) Given(addr netip.Addr) []capture.DNSGrant {
	ls := c.Held(addr)
	if len(ls) == 0 {
		return nil
	}
	out := make([]capture.DNSGrant, len(ls))
	for i, l := range ls {
		out[i] = capture.DNSGrant{Client: l.Client, Name: l.Name, Since: l.Since}
	}
	return out
}

// applyMemoryLimit gives the Go runtime the soft memory limit l calls for
// (memlimit.GoLimit) and says what it is. GOMEMLIMIT, when set, wins: the
// runtime read it at start.
func applyMemoryLimit(l memlimit.Limits) string {
	switch {
	case os.Getenv("GOMEMLIMIT") != "":
		if v := debug.SetMemoryLimit(-1); v != math.MaxInt64 {
			return fmt.Sprintf("memory limit %d MiB (GOMEMLIMIT)", v>>20)
		}
		return "no memory limit (GOMEMLIMIT)"
	case l.GoLimit() > 0:
		debug.SetMemoryLimit(l.GoLimit())
		return fmt.Sprintf("memory limit %d MiB, under the cgroup's %d MiB (%s)", l.GoLimit()>>20, l.Cgroup>>20, l.File)
	}
	return "no memory limit (no cgroup limit: MemoryMax= in the unit sets one)"
}

// proxyLimits scales the proxy's connection limits to the memory the
// process may use (memlimit.Limits.Available): half of it at 64 KiB a
// connection (a spliced tunnel holds about 14 KiB in egressd and a few in
// the kernel, a plain-HTTP one 16 KiB more, and either up to 64 KiB for a
// long path), 1,024 at least, a tenth of it for one client (a LAN device's
// addresses together: lanMACs.ClientDevice). From
// about 6 GiB up it is the proxy's default (50,000 and 5,000), which
// 0, 0 (memory unknown) leaves too: on a 512 MiB gateway those let clients
// open tunnels that take twice its memory (README, "Memory").
func proxyLimits(avail int64) (total, perClient int) {
	if avail <= 0 {
		return 0, 0
	}
	total = int(min(max(avail/2/(64<<10), 1024), 50000))
	return total, total / 10
}

// captureRingMB sizes capture's AF_PACKET ring, one per LAN interface of
// lans, to the memory the process may use (memlimit.Limits.Available): a
// 32nd of it shared by the rings, each between 8 and 64 MiB.
// The ring is the largest part of egressd's memory at rest, and the
// kernel's pages, not the cgroup's: 64 MiB from 2 GiB up (as before), 32
// MiB on 1 GiB, 16 MiB on 512 MiB. It holds the packets capture has not
// read yet; a smaller one drops sooner under a burst (README, "Memory").
func captureRingMB(avail int64, lans int) int {
	if avail <= 0 {
		return 64
	}
	return int(min(max(avail>>20/32/int64(max(lans, 1)), 8), 64))
}
