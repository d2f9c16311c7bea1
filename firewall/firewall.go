package firewall

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/nftables"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"egressd/audit"
	"egressd/policy"
)

// Firewall owns egressd's nftables table. New has no side effects;
// Install puts the ruleset in the kernel, Replace swaps it on reload, Learn
// feeds DNS-learned addresses into its sets, and Remove (or Close) deletes
// the table. All methods are safe for concurrent use.
type Firewall struct {
	cfg  Config
	log  *slog.Logger
	sink audit.Sink
	now  func() time.Time
	m    *metrics
	// given is Deps.Given: the forwarder's answers, to seed learned sets.
	given func() []Given
	// macs is Deps.MACs; nil: no client has a MAC.
	macs ClientMACs

	ioMu sync.Mutex // serialises netlink transactions; taken before mu
	// sweepMu serialises the looks at conntrack after a ruleset goes in
	// (sweep.go); taken before mu, never with ioMu.
	sweepMu sync.Mutex
	conn    *nftables.Conn // guarded by ioMu; opened on first use

	// cur is rs, for Wants without a lock.
	cur atomic.Pointer[Ruleset]
	// fastOff: DropFastPath turned Config.FastPath off for the rest of
	// the Firewall's life; every ruleset renders without it.
	fastOff atomic.Bool

	mu  sync.Mutex // guards the fields below
	eng *policy.Engine
	rs  *Ruleset // the installed ruleset; nil when nothing is installed
	// since is what the tags of conntrack marks can mean: the enforce
	// ruleset whose sweep last looked at every flow and every enforce
	// ruleset installed after it (those before a first such sweep, at a
	// start, after Deps.Previous's and Deps.Pending's), oldest first, at most maxSince
	// (sweep.go).
	since []*Ruleset
	// learned holds, per learned set, the addresses in it and when they
	// expire. The kernel's expiry of an element is never earlier (it is
	// computed from the same TTL after this one), so an address whose
	// expiry here is in the future is in the kernel's set. Every write
	// of an expiry goes through noted too (expiry.go).
	learned  map[string]map[netip.Addr]learnedAddr
	expq     map[string]*expiryQueue // per learned set that was full
	pending  *learnBatch             // collecting; nil when empty
	flushing bool                    // a flush goroutine is writing learn batches
	timer    *time.Timer             // re-renders when a rule expires
	// afterFunc arms timer; nil is time.AfterFunc (tests set it).
	afterFunc func(time.Duration, func()) *time.Timer
	closed    bool
	examined  uint64 // learned addresses looked at to make room in a full set, for tests
}

// learnBatch is a group of learned addresses written in one transaction:
// concurrent Learn calls share it ("group commit"), so a burst of DNS
// answers costs one netlink round trip, not one each.
type learnBatch struct {
	ops  []learnOp
	done chan struct{} // closed once written (or failed); err is set then
	err  error
}

// learnedAddr is a learned address's expiry, as written to (or on its way
// to) the kernel.
type learnedAddr struct {
	exp time.Time
	b   *learnBatch // the batch writing it, until written; nil after
	op  int         // its index in b.ops
}

type learnOp struct {
	// rs is the ruleset the address was learned for: a Replace may land
	// before the write (writeLearned).
	rs        *Ruleset
	rule, set string
	addr      netip.Addr
	exp       time.Time
	// refresh: the address is in the set already and its expiry is
	// extended (delete and add again in the same transaction, which works
	// on every kernel; a plain add of an existing element does not change
	// its timeout before Linux 6.10). prev is its current expiry.
	refresh bool
	prev    time.Time
}

// New validates nothing against the kernel and opens nothing: the first
// Install does.
func New(cfg Config, deps Deps) (*Firewall, error) {
	if cfg.MaxLearned < 0 {
		return nil, errors.New("firewall: MaxLearned is negative")
	}
	f := &Firewall{cfg: cfg, log: deps.Logger, sink: deps.Sink, now: deps.Now, m: newMetrics(deps.Registerer), given: deps.Given, macs: deps.MACs,
		learned: map[string]map[netip.Addr]learnedAddr{}, expq: map[string]*expiryQueue{}}
	if f.log == nil {
		f.log = slog.Default()
	}
	f.log = f.log.With(audit.LogComponent, "firewall")
	if f.now == nil {
		f.now = time.Now
	}
	if f.sink == nil {
		f.sink = audit.Discard
	}
	// The tags an earlier egressd's ruleset wrote are read as its rules'
	// (sweep.go), rendered with the ports forward handled then, when
	// known; and as those of the policies it may have put in after it.
	// One that does not render here is left out: its tags are then read
	// as the others', as without it. Whether it ran with the fast path
	// moves the tags (ruleTags); not known, it is read both ways.
	for i, p := range append([]Prior{{Policy: deps.Previous, TCPPorts: deps.PreviousTCPPorts, CTMarkBits: deps.PreviousCTMarkBits, FastPath: deps.PreviousFastPath}}, deps.Pending...) {
		if p.Policy == nil {
			continue
		}
		prev := cfg
		if p.TCPPorts != nil {
			prev.TCPPorts = *p.TCPPorts
		}
		if p.CTMarkBits != nil {
			prev.CTMarkBits = *p.CTMarkBits
		}
		fast := []bool{false, true}
		if p.FastPath != nil {
			fast = []bool{*p.FastPath}
		}
		for _, fp := range fast {
			prev.FastPath = fp
			rs, err := Render(prev, p.Policy)
			if err != nil {
				f.log.Warn("firewall: a policy before this start does not render; conntrack mark tags are read as the others'", "pending", i > 0, "fast_path", fp, audit.LogError, err.Error())
				continue
			}
			f.since = append(f.since, rs)
		}
	}
	return f, nil
}

// connLocked returns the netlink connection, opening it (in Config.NetNS)
// on first use. f.ioMu must be held.
func (f *Firewall) connLocked() (*nftables.Conn, error) {
	if f.conn != nil {
		return f.conn, nil
	}
	opts := []nftables.ConnOption{nftables.AsLasting(), nftables.WithSockOptions(bigReceiveBuffer)}
	if f.cfg.NetNS != "" {
		ns, err := os.Open(f.cfg.NetNS)
		if err != nil {
			return nil, fmt.Errorf("firewall: network namespace: %w", err)
		}
		// The socket is created in the namespace by New and stays there;
		// the namespace file is not needed afterwards.
		defer ns.Close()
		opts = append(opts, nftables.WithNetNSFd(int(ns.Fd())))
	}
	c, err := nftables.New(opts...)
	if err != nil {
		return nil, fmt.Errorf("firewall: netlink: %w", err)
	}
	f.conn = c
	return c, nil
}

// batchReceiveBuffer is the netlink socket's receive buffer. The kernel
// acknowledges every message of a batch (each set, element list and
// rule) before the firewall reads the first acknowledgement; with the
// default buffer (rmem_default, 208 KiB) a ruleset of a few hundred
// rules overflowed it and the install failed with ENOBUFS.
const batchReceiveBuffer = 8 << 20

// bigReceiveBuffer sets the socket's receive buffer to
// batchReceiveBuffer, past net.core.rmem_max (SO_RCVBUFFORCE, which
// CAP_NET_ADMIN allows; without it, as large as rmem_max lets).
func bigReceiveBuffer(c *netlink.Conn) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, batchReceiveBuffer)
	}); err != nil {
		return err
	}
	if serr != nil {
		return c.SetReadBuffer(batchReceiveBuffer)
	}
	return nil
}

// Install renders eng and installs the ruleset, replacing any egressd table
// already there (one left by a killed egressd, say) in one transaction. In
// enforce mode its learned sets start with the addresses the DNS forwarder
// gave out already (Deps.Given, seed.go). It needs CAP_NET_ADMIN.
func (f *Firewall) Install(eng *policy.Engine) error { return f.apply(eng, "install", nil) }

// Replace renders eng and swaps it for the installed ruleset in one
// transaction: packets see the old ruleset or the new one, never none.
// Addresses learned for rules that still have learned sets are carried
// over with their remaining timeouts, and the sets of rules that learn
// more than before (all of them, from audit mode to enforce) are seeded
// with the addresses the DNS forwarder gave out (Deps.Given, seed.go);
// conntrack is left alone, so
// established connections (redirected ones included) carry on. If rendering
// or installing fails, the old ruleset stays, with its learned sets as they
// were, and so does what the firewall knows of them.
func (f *Firewall) Replace(eng *policy.Engine) error { return f.apply(eng, "replace", nil) }

// DropFastPath turns the fast path (Config.FastPath) off for the rest of
// the Firewall's life, when its queue's reader is gone: the ruleset
// installed with it queues new connections to the fast ports to no one
// (no bypass: the kernel drops them), so it is replaced by eng's without
// it, as Replace does, and a later Replace or Install renders without
// it too. The conntrack marks are read as at any reload (sweep.go): the
// rulesets with the fast path stay in since, so a fast-allowed
// connection, whose mark is no rule's without the fast path (rules draw
// their tags from one more), is decided again as forward decides a new
// one; to a fast port, which forward leaves to the proxy, it is cut
// (and reported, as every cut is). Pending connections, whose packets
// were queued, lose the fast path's rules that passed or queued them
// and are dropped (fail closed). It reports whether a ruleset was
// replaced: none is when none with the fast path is installed.
func (f *Firewall) DropFastPath(eng *policy.Engine) (bool, error) {
	f.fastOff.Store(true)
	if rs := f.cur.Load(); rs == nil || !rs.fast {
		return false, nil
	}
	return true, f.apply(eng, "replace", nil)
}

// config is the Config rulesets render with: Config.FastPath off once
// DropFastPath turned it off.
func (f *Firewall) config() Config {
	cfg := f.cfg
	if f.fastOff.Load() {
		cfg.FastPath = false
	}
	return cfg
}

// apply renders eng and installs it. When only is set, it does so only if
// only is still the installed policy once the netlink lock is held (a
// re-render must not undo a Replace that went first), and else does
// nothing.
//
// In enforce mode it then looks at the connections already out and cuts
// those the new ruleset does not allow (sweep.go), and logs one line.
func (f *Firewall) apply(eng *policy.Engine, op string, only *policy.Engine) error {
	_, rs, seeded, err := f.swapIn(eng, op, only)
	if err != nil || rs == nil {
		return err
	}
	if seeded.ran {
		late, err := f.catchUp(eng, rs, seeded.rules)
		seeded.seeded += late
		if err != nil {
			f.log.Error("firewall: seeding learned sets", audit.LogError, err.Error())
		}
	}
	sw := f.sweep(eng, rs)
	n := 0
	for _, c := range rs.Chains {
		n += len(c.Rules)
	}
	attrs := []any{audit.LogMode, string(rs.Mode), "table", "inet " + TableName,
		"lan", strings.Join(f.cfg.LANs, ","), "wan", f.cfg.WAN, "chains", len(rs.Chains), "rules", n, "sets", len(rs.Sets)}
	if seeded.ran {
		// The addresses the forwarder gave out before, put into the
		// learned sets of rules that may have lacked them (seed.go).
		attrs = append(attrs, "learned_seeded", seeded.seeded)
		if seeded.full > 0 {
			attrs = append(attrs, "learned_seed_full", seeded.full)
		}
	}
	if sw.ran {
		attrs = append(attrs, "flows_kept", sw.kept, "flows_cut", sw.cut)
	}
	short := uint64(len(rs.flows)) > uint64(rs.ruleTags())
	if short {
		// More rules than tags (Config.CheckTags): rules share tags.
		attrs = append(attrs, "ct_mark_tags", rs.ruleTags(), "ct_mark_tags_wanted", len(rs.flows))
	}
	if sw.err != nil || short {
		if sw.err != nil {
			attrs = append(attrs, audit.LogError, "flows: "+sw.err.Error())
		}
		f.log.Warn("firewall "+op, attrs...)
	} else {
		f.log.Info("firewall "+op, attrs...)
	}
	return nil
}

// swapIn renders eng and installs it (see apply); it returns the
// ruleset it replaced (nil: none) and the new one (nil: none installed).
func (f *Firewall) swapIn(eng *policy.Engine, op string, only *policy.Engine) (old, rs *Ruleset, seeded seedResult, err error) {
	now := f.now()
	rs, err = render(f.config(), eng, now)
	if err != nil {
		return nil, nil, seeded, err
	}
	f.ioMu.Lock()
	defer f.ioMu.Unlock()
	if rs.fast && f.fastOff.Load() {
		// DropFastPath came between the render and the lock: the
		// fast path must not come back.
		if rs, err = render(f.config(), eng, now); err != nil {
			return nil, nil, seeded, err
		}
	}
	f.mu.Lock()
	if only != nil && (f.closed || f.eng != only || f.rs == nil) {
		f.mu.Unlock()
		return nil, nil, seeded, nil
	}
	defer func() { f.count(op, err) }()
	if f.closed {
		f.mu.Unlock()
		return nil, nil, seeded, ErrClosed
	}
	old = f.rs
	want := rs.seedRules(old)
	// A rule that covers fewer names or other clients starts its sets
	// afresh, from the forwarder's answers (seeded whenever they reach
	// the kernel).
	narrowed := rs.narrowedFrom(old)
	if rs.inKernel {
		for name := range narrowed {
			if want == nil {
				want = map[string]bool{}
			}
			want[name] = true
		}
	}
	f.mu.Unlock()
	// The forwarder's answers, outside f.mu (LearnAll does not wait for
	// them); f.rs cannot change meanwhile (ioMu).
	var given []Given
	var givenMACs map[netip.Addr]net.HardwareAddr
	if want != nil && f.given != nil {
		given = f.given()
		givenMACs = f.macsOf(eng, func(yield func(netip.Addr) bool) {
			for _, g := range given {
				if !yield(g.Client) {
					return
				}
			}
		})
	}
	f.mu.Lock()
	// Carry learned addresses over, for the rules that still learn. Only
	// computed here: f.learned describes the installed ruleset until the
	// new one is in (a refused transaction leaves the old one, and its
	// sets, as they were), so it changes after the flush (carryOver).
	keep := map[string]bool{}
	for name, s := range rs.learn {
		if !narrowed[name] {
			for _, set := range s {
				if set != "" {
					keep[set] = true
				}
			}
		}
	}
	carried := make(map[string]map[netip.Addr]learnedAddr, len(keep))
	for name, m := range f.learned {
		if !keep[name] {
			continue
		}
		c := make(map[netip.Addr]learnedAddr, len(m))
		for a, v := range m {
			if v.exp.Sub(now) >= time.Millisecond {
				c[a] = v
			}
		}
		carried[name] = c
	}
	// And seed the sets that may lack what the forwarder gave out.
	var added map[string]map[netip.Addr]time.Time
	if want != nil && f.given != nil {
		added, seeded = rs.seedsFrom(eng, want, given, givenMACs, carried, f.cfg.maxLearned(), now)
	}
	seeds := map[string][]seed{}
	if rs.inKernel {
		for name, m := range carried {
			for a, v := range m {
				if _, ok := added[name][a]; !ok {
					seeds[name] = append(seeds[name], seed{a, v.exp.Sub(now)})
				}
			}
		}
		for name, m := range added {
			for a, exp := range m {
				seeds[name] = append(seeds[name], seed{a, exp.Sub(now)})
			}
		}
	}
	f.mu.Unlock()

	conn, err := f.connLocked()
	if err != nil {
		return nil, nil, seeded, err
	}
	if err := queueReplace(conn, rs, seeds); err != nil {
		// Half a transaction is queued: throw the connection away with
		// it, unsent.
		f.dropConnLocked()
		return nil, nil, seeded, err
	}
	if err := conn.Flush(); err != nil {
		f.dropConnLocked()
		return nil, nil, seeded, fmt.Errorf("firewall: %s: %w", op, err)
	}

	f.mu.Lock()
	f.carryOver(keep, now)
	for name, m := range added {
		if f.learned[name] == nil {
			f.learned[name] = map[netip.Addr]learnedAddr{}
		}
		for a, exp := range m {
			if v, ok := f.learned[name][a]; !ok || v.exp.Before(exp) {
				f.learned[name][a] = learnedAddr{exp: exp}
				f.noted(name, a, exp)
			}
		}
	}
	f.rs, f.eng = rs, eng
	if rs.Mode == policy.ModeEnforce {
		f.since = append(f.since, rs)
		if len(f.since) > maxSince {
			f.since = slices.Delete(f.since, 0, len(f.since)-maxSince)
		}
	}
	f.cur.Store(rs)
	f.scheduleLocked(rs.NextExpiry, now)
	f.mu.Unlock()
	for _, mode := range []policy.Mode{policy.ModeAudit, policy.ModeEnforce} {
		v := 0.0
		if mode == rs.Mode {
			v = 1
		}
		f.m.installed.WithLabelValues(string(mode)).Set(v)
	}
	return old, rs, seeded, nil
}

// carryOver drops, once a ruleset is in, what f.learned holds for the sets
// it lacks (keep: those it has) and the addresses that expired before now
// (+1ms: those swapIn did not carry over). An address a LearnAll
// refreshed meanwhile has a later expiry, and stays. f.mu must be held.
func (f *Firewall) carryOver(keep map[string]bool, now time.Time) {
	for name, m := range f.learned {
		if !keep[name] {
			delete(f.learned, name)
			delete(f.expq, name)
			continue
		}
		for a, v := range m {
			if v.exp.Sub(now) < time.Millisecond && v.b == nil {
				delete(m, a)
			}
		}
	}
}

// expiryWake is the longest the wait for a rule's expiry goes without a
// look at the wall clock.
const expiryWake = time.Minute

// scheduleLocked arranges a re-render when the next rule expires, so that an
// expired rule's addresses close without waiting for a reload. f.mu must be
// held.
func (f *Firewall) scheduleLocked(at, now time.Time) {
	if f.timer != nil {
		f.timer.Stop()
		f.timer = nil
	}
	if at.IsZero() {
		return
	}
	eng := f.eng
	// Sub saturates at the largest Duration for a far-future expiry (year
	// 9999, say): the second's margin must not wrap that negative, into a
	// timer that fires at once and re-renders again and again.
	d := max(at.Sub(now), 0)
	if d < math.MaxInt64-time.Second {
		d += time.Second
	}
	// A timer counts real (monotonic) time, the expiry is a wall-clock
	// date: when the clock is set forward (NTP on a gateway without a
	// real-time clock that started at 1970, or at a fake-hwclock's saved
	// time days behind), a timer armed for the whole distance would leave
	// the expired rule in the kernel for as long as the step. So it wakes
	// at least every expiryWake and looks at the clock.
	d = min(d, expiryWake)
	after := f.afterFunc
	if after == nil {
		after = time.AfterFunc
	}
	f.timer = after(d, func() {
		f.mu.Lock()
		current := f.eng == eng && f.rs != nil && !f.closed
		if current {
			if now := f.now(); now.Before(at) {
				f.scheduleLocked(at, now)
				f.mu.Unlock()
				return
			}
		}
		f.mu.Unlock()
		if !current {
			return
		}
		if err := f.apply(eng, "replace", eng); err != nil {
			f.log.Error("firewall: re-render after a rule expired", audit.LogError, err.Error())
		}
	})
}

// Remove deletes egressd's table, and nothing else. It succeeds when there
// is no table.
func (f *Firewall) Remove() error {
	f.ioMu.Lock()
	defer f.ioMu.Unlock()
	return f.removeLocked()
}

func (f *Firewall) removeLocked() (err error) {
	defer func() { f.count("remove", err) }()
	conn, err := f.connLocked()
	if err != nil {
		return err
	}
	queueRemove(conn)
	if err := conn.Flush(); err != nil {
		f.dropConnLocked()
		return fmt.Errorf("firewall: remove: %w", err)
	}
	f.mu.Lock()
	f.rs = nil
	f.cur.Store(nil)
	clear(f.learned)
	clear(f.expq)
	if f.timer != nil {
		f.timer.Stop()
		f.timer = nil
	}
	f.mu.Unlock()
	f.m.installed.Reset()
	f.log.Info("firewall removed", "table", "inet "+TableName)
	return nil
}

// RemoveLeftover removes egressd's table if one is in the kernel though
// this Firewall installed none: what an earlier egressd in enforce mode
// left (its clean stop and kill -9 both leave the ruleset, fail-closed). A
// start that installs nothing (audit mode) must not keep enforcing it. It
// reports whether there was a table.
func (f *Firewall) RemoveLeftover() (bool, error) {
	f.ioMu.Lock()
	defer f.ioMu.Unlock()
	conn, err := f.connLocked()
	if err != nil {
		return false, err
	}
	if _, err := conn.ListTableOfFamily(TableName, nftables.TableFamilyINet); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return false, nil
		}
		f.dropConnLocked()
		return false, fmt.Errorf("firewall: list table: %w", err)
	}
	return true, f.removeLocked()
}

// Close removes the table if this Firewall installed one (and was not
// detached), and releases the netlink socket. It is idempotent.
func (f *Firewall) Close() error {
	return f.shut(true)
}

// MarksSettled reports whether the conntrack marks carry the tags of the
// installed ruleset alone (or of none installed): its look at the
// connections, or a later one's, went through. Until then a restart must
// read them also as the policies before it (Deps.Previous, Deps.Pending),
// which the firewall goes on doing in this process (since).
func (f *Firewall) MarksSettled() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.since) == 0 || len(f.since) == 1 && f.since[0] == f.rs
}

// Detach releases the netlink socket and leaves the ruleset in the kernel,
// as a killed process would: in enforce mode the gateway stays fail-closed
// until the next egressd's Install replaces the table (atomically, so a
// restart never opens a gap). Install, Replace and Learn do nothing more
// after it; Remove still deletes the table.
func (f *Firewall) Detach() error {
	return f.shut(false)
}

func (f *Firewall) shut(remove bool) error {
	// ioMu first: an Install in flight finishes, and is then undone.
	f.ioMu.Lock()
	defer f.ioMu.Unlock()
	f.mu.Lock()
	wasClosed := f.closed
	f.closed = true
	installed := f.rs != nil
	if !remove {
		f.rs = nil
	}
	f.cur.Store(nil)
	if f.timer != nil {
		f.timer.Stop()
		f.timer = nil
	}
	f.mu.Unlock()
	var err error
	if remove && installed && !wasClosed {
		err = f.removeLocked()
	}
	f.dropConnLocked()
	return err
}

// Ruleset returns the installed ruleset, or nil.
func (f *Firewall) Ruleset() *Ruleset {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.rs
}

// Address is one address for [Firewall.LearnAll]: open the rule's
// forwarded ports to Addr for TTL, because the DNS forwarder told Client
// that Name has Addr, under policy Engine, for the rule.
type Address struct {
	Rule string
	Addr netip.Addr
	TTL  time.Duration
	// Engine is the policy the answer was decided under; nil: the
	// installed one (Learn). When it is another (a reload went in, or
	// was refused, while the query was answered), the address goes into
	// the installed rule's sets only if that rule lets Client resolve
	// Name (ErrNotCovered otherwise): a rule's sets are named after it,
	// not after the policy it came from.
	Engine *policy.Engine
	Client netip.Addr
	// ClientMAC is the client's MAC the answer was decided with (a policy
	// that names clients by MAC); nil: none.
	ClientMAC net.HardwareAddr
	Name      string
}

// ErrNotCovered is LearnAll's error for an address decided under another
// policy than the installed one whose installed rule does not cover the
// name for the client: it is not learned.
var ErrNotCovered = errors.New("firewall: learn: the installed rule does not cover the name")

// WantsAny reports whether some rule of the installed ruleset takes
// learned addresses (Wants is false for every rule otherwise).
func (f *Firewall) WantsAny() bool {
	rs := f.cur.Load()
	return rs != nil && len(rs.learn) > 0
}

// Wants reports whether Learn does anything for the rule: a ruleset is
// installed and the rule has names whose addresses feed its learned sets
// (it forwards UDP, or TCP ports that are not redirected). It takes no lock
// and does not allocate, so a DNS forwarder can ask it on every answer.
func (f *Firewall) Wants(rule string) bool {
	rs := f.cur.Load()
	if rs == nil {
		return false
	}
	_, ok := rs.learn[rule]
	return ok
}

// Learn opens the rule's forwarded ports (UDP, and TCP ports that are not
// redirected) to addr for ttl (at least Config.MinTTL, at most MaxTTL),
// because dnsfilter answered a name of that rule with it. It is LearnAll
// of one address, without a deadline.
func (f *Firewall) Learn(rule string, addr netip.Addr, ttl time.Duration) error {
	return f.LearnAll(context.Background(), []Address{{Rule: rule, Addr: addr, TTL: ttl}})
}

// LearnAll opens each rule's forwarded ports to each address for its TTL (at
// least Config.MinTTL, at most MaxTTL), and returns once every address is
// in the kernel's set, so that a DNS answer handed out after it returns
// never meets a closed set. Rules without names, unknown rules and calls
// when nothing is installed are ignored. An address is never shortened:
// one already in its set (or on its way there) until at least the time
// asked costs a map lookup, and waits only for the transaction that is
// writing it, if any. Others are written with the next transaction,
// shared with concurrent calls ("group commit"), and their set timeout is
// padded by min(TTL/16, 1s) so that repeated answers do not each cost one.
// In audit mode the addresses are only remembered, for a reload to
// enforce.
//
// An address whose Engine is not the installed policy is learned only if
// the installed rule of its name lets its client resolve its name
// (ErrNotCovered otherwise); one of the installed policy costs a pointer
// compare.
//
// When ctx is done first, LearnAll returns its error; the addresses are
// still written. Invalid addresses and full sets (ErrSetFull) are errors
// too, reported after the others are written.
func (f *Firewall) LearnAll(ctx context.Context, as []Address) error {
	var errs []error
	var waitBuf [2]*learnBatch
	waits := waitBuf[:0]
	f.mu.Lock()
	rs := f.rs
	if rs == nil || f.closed {
		f.mu.Unlock()
		return nil
	}
	now := f.now()
	for _, a := range as {
		if !a.Addr.IsValid() {
			errs = append(errs, errors.New("firewall: learn: invalid address"))
			continue
		}
		sets, ok := rs.learn[a.Rule]
		if !ok {
			continue
		}
		// An answer decided under the installed policy is the common
		// case: one pointer compare. Otherwise the installed rule of that
		// name must cover the answer, as seeding would have it.
		if a.Engine != nil && a.Engine != f.eng && !coveredBy(f.eng, a, now) {
			f.m.learnRefused.Inc()
			errs = append(errs, fmt.Errorf("%w: rule %s, %s for %s", ErrNotCovered, a.Rule, a.Name, a.Client))
			continue
		}
		addr := a.Addr.Unmap()
		set := sets[0]
		if addr.Is6() {
			set = sets[1]
		}
		if set == "" {
			continue // "*" or a /0 opens the family: no set to fill
		}
		ttl := policy.LearnedLifetime(a.TTL, f.cfg.minTTL())
		exp := now.Add(ttl)
		m := f.learned[set]
		if m == nil {
			m = map[netip.Addr]learnedAddr{}
			f.learned[set] = m
		}
		prev, had := m[addr]
		live := had && prev.exp.After(now)
		if live && !prev.exp.Before(exp) {
			// There already (or being written) for at least as long.
			if prev.b != nil && !slices.Contains(waits, prev.b) {
				waits = append(waits, prev.b)
			}
			continue
		}
		if !had && len(m) >= f.cfg.maxLearned() {
			f.dropExpired(set, m, now)
			if len(m) >= f.cfg.maxLearned() {
				f.m.setFull.Inc()
				errs = append(errs, &SetFullError{Rule: a.Rule, Set: set, Addr: addr, Len: len(m), Enforced: rs.inKernel,
					Opened: destOpens(f.eng, a.Rule, addr), OtherPolicy: a.Engine != nil && a.Engine != f.eng})
				continue
			}
		}
		if !rs.inKernel {
			m[addr] = learnedAddr{exp: exp}
			f.noted(set, addr, exp)
			continue
		}
		exp = exp.Add(min(ttl/16, time.Second))
		b := f.pending
		if b == nil {
			b = &learnBatch{done: make(chan struct{})}
			f.pending = b
		}
		if live && prev.b == b {
			// Not written yet: write the later expiry instead.
			b.ops[prev.op].exp = exp
			m[addr] = learnedAddr{exp: exp, b: b, op: prev.op}
			f.noted(set, addr, exp)
		} else {
			// If the kernel's copy expires before the delete reaches
			// it, the transaction fails and writeLearned retries with
			// adds only.
			b.ops = append(b.ops, learnOp{rs: rs, rule: a.Rule, set: set, addr: addr, exp: exp, refresh: live, prev: prev.exp})
			m[addr] = learnedAddr{exp: exp, b: b, op: len(b.ops) - 1}
			f.noted(set, addr, exp)
		}
		if !slices.Contains(waits, b) {
			waits = append(waits, b)
		}
	}
	if f.pending != nil && !f.flushing {
		// Take the batch now: the next calls start the next one.
		f.flushing = true
		go f.flush(f.pending)
		f.pending = nil
	}
	f.mu.Unlock()
	for _, b := range waits {
		select {
		case <-b.done:
			if b.err != nil {
				errs = append(errs, b.err)
			}
		case <-ctx.Done():
			return errors.Join(append(errs, fmt.Errorf("firewall: learn: %w", ctx.Err()))...)
		}
	}
	return errors.Join(errs...)
}

// destOpens reports whether eng's rule of that name opens addr by a CIDR
// or "*" of its own (policy.Engine.DestOpens): eng is the installed
// policy, whose accept rules are the ruleset's, not the one the answer
// was decided under (a reload may have gone in since).
func destOpens(eng *policy.Engine, rule string, addr netip.Addr) bool {
	if eng == nil {
		return false
	}
	for i, r := range eng.Rules() {
		if r.Name == rule {
			return eng.DestOpens(i, addr)
		}
	}
	return false
}

// coveredBy reports whether eng's rule a.Rule lets a.Client resolve
// a.Name (Engine.NameRules, the forwarder's gateRules and seedsFrom).
func coveredBy(eng *policy.Engine, a Address, now time.Time) bool {
	if eng == nil || a.Name == "" {
		return false
	}
	var buf [8]int
	rules := eng.Rules()
	for _, r := range eng.NameRules(policy.Input{Client: a.Client.Unmap(), ClientMAC: a.ClientMAC, Name: a.Name, Now: now}, 0, buf[:0]) {
		if rules[r].Name == a.Rule {
			return true
		}
	}
	return false
}

// flush writes cur, then the batches that collected meanwhile, one
// transaction each, until none is left. One flush runs at a time
// (f.flushing).
func (f *Firewall) flush(cur *learnBatch) {
	f.mu.Lock()
	for cur != nil {
		f.mu.Unlock()
		err := f.writeLearned(cur.ops)
		f.mu.Lock()
		for _, op := range cur.ops {
			if m := f.learned[op.set]; m != nil {
				if v, ok := m[op.addr]; ok && v.b == cur {
					v.b = nil
					m[op.addr] = v
				}
			}
		}
		cur.err = err
		close(cur.done)
		cur, f.pending = f.pending, nil
	}
	f.flushing = false
	f.mu.Unlock()
}

// writeLearned writes a batch of learned addresses in one transaction.
func (f *Firewall) writeLearned(ops []learnOp) (err error) {
	f.ioMu.Lock()
	defer f.ioMu.Unlock()
	defer func() { f.count("learn", err) }()

	f.mu.Lock()
	rs := f.rs
	f.mu.Unlock()
	if rs == nil || !rs.inKernel {
		return nil // removed, or switched to audit, in the meantime
	}
	conn, err := f.connLocked()
	if err != nil {
		return err
	}
	// Keep the ops whose set is still installed (a reload may have
	// dropped the rule), unless a reload since took names or clients from
	// their rule: what they were learned for may be among those.
	live := ops[:0:0]
	var narrowed map[*Ruleset]map[string]bool
	var stale []learnOp
	for _, op := range ops {
		if s := rs.Set(op.set); s == nil || s.Kind != SetLearned {
			continue
		}
		if op.rs != nil && op.rs != rs {
			n, ok := narrowed[op.rs]
			if !ok {
				if narrowed == nil {
					narrowed = map[*Ruleset]map[string]bool{}
				}
				n = rs.narrowedFrom(op.rs)
				narrowed[op.rs] = n
			}
			if n[op.rule] {
				stale = append(stale, op)
				continue
			}
		}
		live = append(live, op)
	}
	if len(stale) > 0 {
		// Those the rule still covers are in the forwarder's table,
		// which the Replace's seeding took them from.
		f.forget(stale)
	}
	if len(live) == 0 {
		return nil
	}
	write := func(refresh bool) error {
		now := f.now()
		dels := map[string][]nftables.SetElement{}
		adds := map[string][]nftables.SetElement{}
		var order []string
		for _, op := range live {
			if _, ok := adds[op.set]; !ok {
				order = append(order, op.set)
			}
			key := op.addr.AsSlice()
			if refresh && op.refresh {
				dels[op.set] = append(dels[op.set], nftables.SetElement{Key: key})
			}
			adds[op.set] = append(adds[op.set], nftables.SetElement{Key: key, Timeout: max(op.exp.Sub(now), time.Millisecond)})
		}
		t := table()
		for _, name := range order {
			s := &nftables.Set{Table: t, Name: name, HasTimeout: true}
			if len(dels[name]) > 0 {
				if err := conn.SetDeleteElements(s, dels[name]); err != nil {
					return err
				}
			}
			if err := conn.SetAddElements(s, adds[name]); err != nil {
				return err
			}
		}
		if err := conn.Flush(); err != nil {
			f.dropConnLocked()
			return err
		}
		return nil
	}
	err = write(true)
	if err != nil {
		var cerr error
		if conn, cerr = f.connLocked(); cerr != nil {
			f.forget(live)
			return errors.Join(err, cerr)
		}
		// A refreshed address may have left the set after all (someone
		// flushed it): add only, and remember the old expiry of the
		// refreshed ones, so that the next Learn tries again.
		if err2 := write(false); err2 != nil {
			f.forget(live)
			return fmt.Errorf("firewall: learn: %w", errors.Join(err, err2))
		}
		f.mu.Lock()
		for _, op := range live {
			if op.refresh {
				if m := f.learned[op.set]; m != nil && m[op.addr].exp.Equal(op.exp) {
					v := m[op.addr]
					v.exp = op.prev
					m[op.addr] = v
					f.noted(op.set, op.addr, v.exp)
				}
			}
		}
		f.mu.Unlock()
	}
	for _, op := range live {
		f.m.learned.WithLabelValues(op.rule).Inc()
	}
	return nil
}

// forget drops addresses whose write failed, so that the next Learn
// retries them.
func (f *Firewall) forget(ops []learnOp) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, op := range ops {
		if m := f.learned[op.set]; m != nil && m[op.addr].exp.Equal(op.exp) {
			delete(m, op.addr)
		}
	}
}

// dropConnLocked closes the netlink connection, after a failed
// transaction too: google/nftables keeps a serialisation error, and
// messages queued before it, in the connection, so it is not reused. f.ioMu
// must be held.
func (f *Firewall) dropConnLocked() {
	if f.conn != nil {
		f.conn.CloseLasting()
		f.conn = nil
	}
}

func (f *Firewall) count(op string, err error) {
	result := "ok"
	if err != nil {
		result = "error"
	}
	f.m.applies.WithLabelValues(op, result).Inc()
}
