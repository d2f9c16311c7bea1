package audit

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"egressd/policy"
)

// ReportOptions select what a report covers.
type ReportOptions struct {
	// Since, when not zero, limits the report to events at or after it.
	// It needs the event log (a ledger opened through a [Journal] or
	// [LoadDir]): without one the report covers everything and says so
	// in Notes.
	Since time.Time
	// Now is the report's time (for expired rules and GeneratedAt); zero
	// means the ledger's clock.
	Now time.Time
	// EventMode makes the report's mode the latest event's, where the
	// ledger has read one, rather than the policy's: a state directory's
	// report, whose policy copy carries the file's mode and not the mode
	// `egressd run --mode` gave it.
	EventMode bool
}

// Report is the rule-usage report: DESIGN.md's report JSON, plus extra
// fields (queries, client counts, top destinations with counts, expired
// rules, shed events, totals).
type Report struct {
	Mode         policy.Mode     `json:"mode"`
	Policy       string          `json:"policy,omitempty"` // the policy file the rules come from
	GeneratedAt  time.Time       `json:"generated_at"`
	Since        *time.Time      `json:"since,omitempty"`
	Rules        []RuleReport    `json:"rules"`
	UnusedRules  []string        `json:"unused_rules"`
	ExpiredRules []ExpiredRule   `json:"expired_rules"`
	Dropped      []DroppedReport `json:"dropped"`
	// ShedEvents is how many events the event path dropped because the
	// disk could not keep up; they are in no count above.
	ShedEvents uint64 `json:"shed_events"`
	// UnwrittenEvents were counted here but lost to event log write
	// errors (a full disk): they will be missing after a restart.
	UnwrittenEvents uint64 `json:"unwritten_events,omitempty"`
	Totals          Totals `json:"totals"`
	// Alarms are the alarms components raised (THREATS.md E2: the DNS
	// forwarder's dns-tunnel), most distinct names first; AlarmsDropped
	// counts those past the ledger's bound.
	Alarms        []AlarmReport `json:"alarms,omitempty"`
	AlarmsDropped uint64        `json:"alarms_dropped,omitempty"`
	// ECH is there when DNS answers held ECH configs (THREATS.md B1).
	ECH *ECHReport `json:"ech,omitempty"`
	// Coverage says what the counts rest on; nil when nothing was
	// recorded.
	Coverage *Coverage `json:"coverage,omitempty"`
	// UsedBeforeDetail are rules a window (Since) reaches back to use of
	// that only the summary of rotated-out files holds: used in the
	// window, before the detailed log begins, so not unused.
	UsedBeforeDetail []RuleBeforeDetail `json:"used_before_detail,omitempty"`
	// OpenFlows are the flows counted above that are open now and that
	// no event reported yet (Ledger.SetOpenFlows: capture reports a UDP
	// flow after 60 s of silence, any flow still open a minute after it
	// began): the live report counts them, once, and their event counts
	// in their place when it comes. A report of the event log alone
	// (`report --state-dir`, a restart's) has none.
	OpenFlows uint64 `json:"open_flows,omitempty"`
	// Loading is there when the counts are partial because the event log
	// was not read whole into them: a restart's read still under way
	// (the daemon serves while it reads), or one that failed (Error).
	Loading *Loading `json:"loading,omitempty"`
	Notes   []string `json:"notes,omitempty"`
}

// Loading says how far the read of the event log into the live report's
// counts got (Report.Loading).
type Loading struct {
	Files      int    `json:"files"`       // files read whole
	FilesTotal int    `json:"files_total"` // files to read
	Events     uint64 `json:"events"`      // events read
	// Error is why the read ended before its end; empty while it runs.
	Error string `json:"error,omitempty"`
	// Queued are the events emitted since the start that wait for the
	// read to end, Shed those the full queue shed meanwhile (counted as
	// shed once the read ends): while it runs, the counts lack both.
	Queued uint64 `json:"queued,omitempty"`
	Shed   uint64 `json:"shed,omitempty"`
}

// note is Loading as a report's note.
func (g *Loading) note() string {
	if g.Error != "" {
		return fmt.Sprintf("COUNTS ARE PARTIAL: the event log could not be read whole at the start (%s): %d events from %d of %d files are counted, and every event since the start", g.Error, g.Events, g.Files, g.FilesTotal)
	}
	since := "the events since the start are counted once it is read"
	if g.Queued+g.Shed > 0 {
		since = fmt.Sprintf("the %d events emitted since the start wait to be counted once it is read", g.Queued)
		if g.Shed > 0 {
			since += fmt.Sprintf(" (%d shed: the queue was full)", g.Shed)
		}
	}
	return fmt.Sprintf("COUNTS ARE PARTIAL: the event log is still being read after the start (%d events from %d of %d files so far); %s; ask again in a few seconds", g.Events, g.Files, g.FilesTotal, since)
}

// Coverage says what a report's counts rest on: every event since
// DetailFrom is in the event log's files; when rotation deleted older
// files, their events were added to a summary (RotatedOut) first, which
// keeps counts and first/last seen times but not the events.
type Coverage struct {
	// DetailFrom is the time from which every event is in the kept
	// files: the oldest event recorded, or, with RotatedOut, its Until.
	DetailFrom time.Time   `json:"detail_from"`
	RotatedOut *RotatedOut `json:"rotated_out,omitempty"`
}

// RotatedOut describes the summary of rotated-out event log files.
type RotatedOut struct {
	From   time.Time `json:"from"`  // the oldest event in it
	Until  time.Time `json:"until"` // the newest event in it
	Files  uint64    `json:"files"`
	Events uint64    `json:"events"`
}

// RuleBeforeDetail is a rule a windowed report does not call unused: the
// summary of rotated-out files saw it used inside the window.
type RuleBeforeDetail struct {
	Name     string    `json:"name"`
	LastSeen time.Time `json:"last_seen"` // in the summary
	// Uses are its flows, queries and requests in the whole summary
	// (which does not say how many fall inside the window).
	Uses uint64 `json:"uses"`
	// InPolicy is false for a rule the current policy no longer has
	// (renamed or removed by a reload since): its use does not make
	// any of the policy's rules used. True when the report has no
	// policy to compare with.
	InPolicy bool `json:"in_policy"`
}

// AlarmReport is one client's alarms of one reason and zone: for
// dns-tunnel, the client sent more distinct names of a wildcard rule's
// zone upstream in a window than the forwarder's threshold; for
// dns-tunnel-slow, more than ten times it in a window sixty times as
// long; for dns-tunnel-zone, all clients together sent more than twice
// it, and Client is empty (no one client); for dns-tunnel-zone-slow, all
// clients together more than twice the long window's.
type AlarmReport struct {
	Reason    string `json:"reason"`
	Client    string `json:"client"`
	ClientMAC string `json:"client_mac,omitempty"`
	Zone      string `json:"zone"`
	Rule      string `json:"rule,omitempty"`
	// TopClients, of a zone-wide alarm, are the clients that added the
	// most names (an approximate count) to the window DistinctNames is
	// of, most first: at most MaxAlarmClients.
	TopClients []string `json:"top_clients,omitempty"`
	// Alarms counts the windows that alarmed; DistinctNames is the most
	// distinct names one of them had when it alarmed (an estimate).
	Alarms        uint64    `json:"alarms"`
	DistinctNames uint64    `json:"distinct_names"`
	FirstSeen     time.Time `json:"first_seen"`
	LastSeen      time.Time `json:"last_seen"`
}

// ECHReport counts DNS answers that held ECH configs (the ech SvcParam
// of HTTPS/SVCB records), which hide the name a client connects to from
// the proxy and capture (THREATS.md B1).
type ECHReport struct {
	// Stripped are queries egressd's DNS forwarder answered without the
	// ech parameter upstream's answer held: it strips it in every mode.
	Stripped uint64 `json:"stripped"`
	// WouldStrip are DNS exchanges with other resolvers (capture, audit
	// mode) whose answer kept one: in enforce mode every LAN query goes
	// to the forwarder, which would strip it.
	WouldStrip uint64 `json:"would_strip"`
	// Clients are those of both; Names the names the forwarder stripped
	// it from, most asked first.
	Clients          []string    `json:"clients"`
	ClientCount      int         `json:"client_count"`
	ClientsTruncated bool        `json:"clients_truncated,omitempty"`
	Names            []DestCount `json:"names"`
}

// RuleReport is one used rule.
type RuleReport struct {
	Name    string `json:"name"`
	Flows   uint64 `json:"flows"`
	Queries uint64 `json:"queries"` // allowed DNS queries credited to the rule
	// Requests are later HTTP requests on plain-HTTP connections (the
	// first request of a connection is its flow) and requests in
	// inspected connections, credited to the rule.
	Requests uint64   `json:"requests,omitempty"`
	BytesOut uint64   `json:"bytes_out"`
	BytesIn  uint64   `json:"bytes_in"`
	Clients  []string `json:"clients"`
	// ClientCount is len(Clients); ClientsTruncated says more were seen
	// than the ledger keeps.
	ClientCount      int  `json:"client_count"`
	ClientsTruncated bool `json:"clients_truncated,omitempty"`
	// ClientMACs, DeviceCount, DevicesTruncated and Devices say which
	// devices the clients were (ClientDevices).
	ClientDevices
	Destinations    []string    `json:"destinations"` // top destinations, most used first
	TopDestinations []DestCount `json:"top_destinations"`
	FirstSeen       time.Time   `json:"first_seen"`
	LastSeen        time.Time   `json:"last_seen"`
	// InPolicy is false for a rule that events name but the current
	// policy no longer has (renamed or removed since); true when the
	// report has no policy to compare with.
	InPolicy bool `json:"in_policy"`
	// OpenFlows are those of Flows open now, not reported by an event
	// yet (Report.OpenFlows).
	OpenFlows uint64 `json:"open_flows,omitempty"`
	// AnswersWithheld are those of Queries (enforce mode) whose answer
	// the DNS forwarder cut, trimmed or SERVFAIL, because the rule's
	// learned set was full (Event.Enforced under the allow verdict): the
	// client did not get every address the name has.
	AnswersWithheld uint64 `json:"answers_withheld,omitempty"`
}

// maxLearnedNote is the learned set's size as withheldNote gives it:
// firewall's DefaultMaxLearned, which no flag or policy field changes.
const maxLearnedNote = "65536"

// withheldNote is the report's note on a rule whose queries got answers
// cut by its full learned set (RuleReport.AnswersWithheld).
func withheldNote(u RuleReport) string {
	return plural(u.AnswersWithheld, "answer", "answers") + " withheld: learned set full (at most " + maxLearnedNote +
		" live addresses per family)"
}

// ClientDevices say which LAN devices a rule's or a dropped entry's
// clients were: the MAC addresses seen with each client address
// (Event.ClientMAC; capture, the DNS forwarder and the proxies record it
// for a client on a LAN link), grouped by MAC, and how many devices the
// addresses are. A device with several addresses (a dual-stack one, IPv6
// privacy addresses) is one device; an address seen with several MACs
// (a DHCP lease that changed hands) counts with each. For a client
// behind a router on the LAN the MAC is the router's.
type ClientDevices struct {
	// ClientMACs are the clients seen with a MAC, in the order of
	// Clients: the latest MAC and how many distinct ones (at most
	// maxClientMACs are kept per address: MACsTruncated says more were
	// seen).
	ClientMACs []ClientMAC `json:"client_macs,omitempty"`
	// DeviceCount is how many devices the clients are: the distinct MACs
	// seen with them, and each address seen with none (a client off the
	// LAN's links, offline events, a log of before session 21) as one.
	// DevicesTruncated says it is a lower bound (clients or MACs were
	// seen beyond the bounds).
	DeviceCount      int  `json:"device_count"`
	DevicesTruncated bool `json:"devices_truncated,omitempty"`
	// Devices are the MACs seen, each with its client addresses.
	Devices []Device `json:"devices,omitempty"`
}

// ClientMAC is a client address and the MACs seen with it.
type ClientMAC struct {
	Client        string `json:"client"`
	MAC           string `json:"mac"`  // the latest seen
	MACs          int    `json:"macs"` // distinct MACs seen: more than 1 when the address changed hands
	MACsTruncated bool   `json:"macs_truncated,omitempty"`
}

// Device is a MAC and the client addresses seen with it.
type Device struct {
	MAC     string   `json:"mac"`
	Clients []string `json:"clients"`
}

func (c *clientSet) report() ClientDevices {
	macs, devs, n := c.devices()
	return ClientDevices{ClientMACs: macs, DeviceCount: n, DevicesTruncated: c.devicesTruncated(), Devices: devs}
}

// clientTexts are clients as the text and HTML reports print them: the
// address, and the latest MAC seen with it, and how many there were when
// more than one ("192.168.50.23 (aa:bb:cc:dd:ee:ff, 2 devices)").
func (d ClientDevices) clientTexts(clients []string) []string {
	byClient := make(map[string]ClientMAC, len(d.ClientMACs))
	for _, m := range d.ClientMACs {
		byClient[m.Client] = m
	}
	out := make([]string, len(clients))
	for i, c := range clients {
		m, ok := byClient[c]
		switch {
		case !ok:
			out[i] = c
		case m.MACs > 1 || m.MACsTruncated:
			out[i] = fmt.Sprintf("%s (%s, %s devices)", c, textName(m.MAC), fmtCount(m.MACs, m.MACsTruncated))
		default:
			out[i] = fmt.Sprintf("%s (%s)", c, textName(m.MAC))
		}
	}
	return out
}

// anyMACs reports whether a client of r was seen with a MAC.
func (r *Report) anyMACs() bool {
	for _, u := range r.Rules {
		if len(u.ClientMACs) > 0 {
			return true
		}
	}
	for _, d := range r.Dropped {
		if len(d.ClientMACs) > 0 {
			return true
		}
	}
	return false
}

// ExpiredRule is a rule past its "expires" date.
type ExpiredRule struct {
	Name string `json:"name"`
	// Expires is the first instant the rule no longer matched (the day
	// after the date written in the policy).
	Expires time.Time `json:"expires"`
	// Flows is how many flows were denied that only this rule would have
	// allowed.
	Flows uint64 `json:"flows"`
}

// DroppedReport is one entry of the dropped list: what was (enforced) or
// would be (audit mode) dropped, grouped by destination, port and protocol.
type DroppedReport struct {
	Dest string `json:"dest"`
	IP   string `json:"ip"` // the latest address seen, "" when none
	// IPs are the distinct addresses of its flows, sorted, when there
	// are more than one (at most maxDropIPs; IPsTruncated when more).
	IPs              []string `json:"ips,omitempty"`
	IPsTruncated     bool     `json:"ips_truncated,omitempty"`
	Port             uint16   `json:"port"`
	Proto            string   `json:"proto"` // "tcp", "udp", "dns" for denied queries, or another IP protocol (Event.Proto; Port 0)
	Flows            uint64   `json:"flows"`
	Queries          uint64   `json:"queries,omitempty"`
	Requests         uint64   `json:"requests,omitempty"` // later HTTP requests on plain-HTTP connections, requests in inspected ones
	BytesOut         uint64   `json:"bytes_out,omitempty"`
	BytesIn          uint64   `json:"bytes_in,omitempty"`
	Clients          []string `json:"clients"`
	ClientCount      int      `json:"client_count"`
	ClientsTruncated bool     `json:"clients_truncated,omitempty"`
	ClientDevices
	Enforced      bool      `json:"enforced"` // the latest flow was blocked
	EnforcedFlows uint64    `json:"enforced_flows"`
	Reason        string    `json:"reason,omitempty"`
	Rule          string    `json:"rule,omitempty"` // the expired rule that would allow it
	FirstSeen     time.Time `json:"first_seen"`
	LastSeen      time.Time `json:"last_seen"`
	// OpenFlows are those of Flows open now, not reported by an event
	// yet (Report.OpenFlows).
	OpenFlows uint64 `json:"open_flows,omitempty"`
	// AllowedNow is the rule of the running policy that allows the
	// entry to each of its clients now (a rule a reload added since the
	// drops, from --suggest, say): "" when none does, or with no policy.
	// --suggest proposes no rule for it.
	AllowedNow string `json:"allowed_now,omitempty"`
}

// otherIPs is "+N" for the addresses besides the latest (IP) an entry
// lists, "+N…" when the list is truncated; "" when there is one.
func (d DroppedReport) otherIPs() string {
	if len(d.IPs) < 2 && !d.IPsTruncated {
		return ""
	}
	n := len(d.IPs)
	if slices.Contains(d.IPs, d.IP) {
		n--
	}
	if d.IPsTruncated {
		return fmt.Sprintf("+%d…", n)
	}
	return fmt.Sprintf("+%d", n)
}

// ipsText lists an entry's addresses: its IPs, "…" after them when
// truncated, else the one address.
func (d DroppedReport) ipsText() string {
	if len(d.IPs) == 0 {
		return d.IP
	}
	s := strings.Join(d.IPs, ", ")
	if d.IPsTruncated {
		s += ", …"
	}
	return s
}

// Report builds a report. It is a snapshot: later events do not change it.
// Reports are built one at a time: at the ledger's bounds one allocates
// about 386 MB (BenchmarkReportDroppedFull), and operators polling the
// admin API together would each add that much; a second caller waits for
// the first's build, then builds its own (a report of when its turn
// came). What comes before the build is done without waiting for the
// turn: the wait for a restart's read of the event log, the list of the
// open flows, and a window's (Since) read of the log, which takes seconds
// for a month's log and would hold up every plain report meanwhile.
// Windows are read one at a time (windowReads), each into a ledger of its
// own held until its report is built; a second window's report waits for
// the first's, and ReportContext's read stops when ctx ends.
func (l *Ledger) Report(opt ReportOptions) *Report {
	r, _ := l.ReportContext(context.Background(), opt)
	return r
}

// ReportContext is Report for a caller that may go away (the admin API's
// request, whose client gives up): when ctx ends before the report's turn
// to be built comes, it returns ctx's error and no report, and builds
// none for no one.
func (l *Ledger) ReportContext(ctx context.Context, opt ReportOptions) (*Report, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	// A restart's read of the event log still under way: wait a little
	// for it (a log of a few files reads in that time), then answer with
	// the counts so far, marked partial. It comes before the open flows,
	// whose Sync waits for a writer that takes no queue while it reads.
	l.mu.Lock()
	loadWait := l.loadWait
	l.mu.Unlock()
	var loading *Loading
	if loadWait != nil {
		loading = loadWait(reportLoadWait)
	}
	// The open flows are listed before a window reads the event log, and
	// before the ledger's counts are copied (snapshotOpen): a flow
	// reported in between is then in both, and counts once, rather than
	// in neither.
	l.mu.Lock()
	openFn := l.open
	l.mu.Unlock()
	var open []Event
	if openFn != nil {
		open = openFn()
	}
	src := l
	var notes []string
	since := opt.Since
	if !since.IsZero() {
		l.mu.Lock()
		hist, eng, mode := l.history, l.eng, l.lastMode
		l.mu.Unlock()
		if hist != nil {
			// The window's own ledger: no one else copies it, so its
			// read needs no build turn; it takes a window's, held
			// until the window's report is built.
			if err := takeToken(ctx, l.windows, windowWaitHook); err != nil {
				return nil, err
			}
			defer func() { <-l.windows }()
			tmp := NewLedger(eng, l.opt)
			// The latest event's mode (EventMode) is the whole log's: a
			// window that holds none of its events has it too.
			tmp.lastMode = mode
			var wrongClock, read uint64
			err := hist(ctx, since, func(ev Event) {
				read++
				if windowEventHook != nil {
					windowEventHook(ctx, read)
				}
				if ev.Time.Before(since) {
					if ev.Kind != KindShed && ev.Time.Before(SourceFloor) {
						wrongClock++
					}
					return
				}
				if ev.Kind == KindShed {
					tmp.addShed(ev.Time, ev.Count)
					return
				}
				tmp.add(&ev)
			})
			if err := ctx.Err(); err != nil { // the read stopped: the caller is gone
				return nil, err
			}
			if err != nil {
				notes = append(notes, fmt.Sprintf("reading the event log: %v", err))
			}
			if wrongClock > 0 {
				notes = append(notes, fmt.Sprintf("%d event(s) stamped before %s, recorded while the clock was wrong (a gateway without a real-time clock before NTP set it), are in no window", wrongClock, SourceFloor.Format("2006-01-02")))
			}
			src = tmp
		} else {
			notes = append(notes, "no event log: the report covers everything recorded, not only since "+since.UTC().Format(time.RFC3339))
			opt.Since = time.Time{}
		}
	}
	if err := takeToken(ctx, l.reporting, reportWaitHook); err != nil {
		return nil, err
	}
	if opt.Now.IsZero() {
		opt.Now = l.opt.Now()
	}
	r := func() *Report {
		defer func() { <-l.reporting }()
		return src.snapshotOpen(opt, open)
	}()
	l.mu.Lock()
	r.Coverage = l.coverageLocked()
	arch, archNote, eng := l.arch, l.archNote, l.eng
	l.mu.Unlock()
	if archNote != "" {
		r.Notes = append(r.Notes, archNote)
	}
	if !opt.Since.IsZero() && arch != nil && !opt.Since.After(arch.cov.Until) {
		r.Notes = append(r.Notes, r.beforeDetail(arch, eng, opt.Since.UTC()))
	}
	r.Notes = append(r.Notes, notes...)
	if loading != nil {
		r.Loading = loading
		r.Notes = append([]string{loading.note()}, r.Notes...)
	}
	return r, nil
}

// takeToken waits for a turn (a token of turns: l.reporting to build a
// report, l.windows to read a window), or for ctx to end: then it returns
// ctx's error, without the turn. hook, when set (tests), is called when
// it waits.
func takeToken(ctx context.Context, turns chan struct{}, hook func()) error {
	select {
	case turns <- struct{}{}:
		return nil
	default:
	}
	if hook != nil {
		hook()
	}
	select {
	case turns <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	}
	if err := ctx.Err(); err != nil { // both were ready: the caller is gone
		<-turns
		return err
	}
	return nil
}

// windowReads is how many windows' reads of the event log (each into a
// ledger of its own, as big as the ledger at its bounds) are under way at
// once (Ledger.windows): one, as reports are built one at a time.
const windowReads = 1

// SetOpenFlows sets fn as the source of the flows open now that no event
// reported yet (capture's table: a UDP flow is reported after 60 s of
// silence, a flow still open a minute after it began; the proxy's
// connections, each reported when it closes): Report counts
// them with the recorded events, as open, each once (a flow the ledger
// holds a report of, or listed twice, counts once), without adding them
// to the ledger, so what the event log says is unchanged and each flow's
// event counts in its place when it comes. fn is called by Report,
// without the ledger's lock held.
func (l *Ledger) SetOpenFlows(fn func() []Event) {
	l.mu.Lock()
	l.open = fn
	l.mu.Unlock()
}

// snapshotOpen is snapshot with the flows of open counted that the
// ledger holds no report of (the report of one may have come since the
// list was taken: the lookup and the copy counted on are made under one
// hold of the lock, so a flow counts either way, never both). A flow the
// ledger holds another component's report of counts where the open one's
// event will move it (the proxy's connection capture reported a minute
// after it began, without the name the proxy read), not as open. They are
// counted on an overlay: a copy of the ledger's counts that shares
// nothing with it, so that the flows are counted, and the report made,
// after the lock is let go. Before, they were counted on a copy-on-write
// overlay under the lock, and with 65,536 open flows the journal's writer
// waited 150–210 ms for it (BenchmarkReportOpenFlows); now the lock is
// held for the lookups and the copy.
func (l *Ledger) snapshotOpen(opt ReportOptions, open []Event) *Report {
	if len(open) == 0 {
		return l.snapshot(opt)
	}
	// Keyed and hashed before the lock (the seed never changes); the
	// events themselves are not copied (65,536 of them are 45 MB).
	type openFlow struct {
		i  int
		id flowID
		h  uint64
	}
	bounded := func(i int) Event {
		ev := open[i]
		ev.Bound()
		ev.Filtered, ev.expanded = "", 0 // ech counts come with the event
		return ev
	}
	flows := make([]openFlow, 0, len(open))
	for i := range open {
		if ev := &open[i]; ev.Kind != KindFlow || !opt.Since.IsZero() && ev.Time.Before(opt.Since) {
			continue
		}
		ev := bounded(i)
		id := flowID{FlowKey: ev.Key(), kind: KindFlow}
		id.Proto = knownText(id.Proto)
		if !id.keyed() {
			continue
		}
		flows = append(flows, openFlow{i: i, id: id, h: id.hash(l.seed)})
	}
	// moved is a flow the ledger holds another report of that the open
	// one's event will move (the proxy's over capture's, a deny after a
	// reload, an allow of a would-be deny after a reload: moves): its
	// record as the ledger holds it, with the names of what it counts in,
	// is moved on the overlay.
	type movedFlow struct {
		f                openFlow
		rec              flowRec
		rule, denied     string
		hasRule, hasDeny bool
		drop             dropKey
		hasDrop          bool
		others           [][2]string // rec.others: each rule's name and dest, in its order
	}
	var moved []movedFlow
	l.mu.Lock()
	n := 0
	for _, f := range flows {
		rec := l.findLocked(f.id, f.h, open[f.i].Time.UTC())
		if rec == nil {
			flows[n] = f
			n++
			continue
		}
		// A flow the journal's detail budget held back stays where it is
		// (the ledger freezes one of an earlier interval: emitHold).
		if ev := &open[f.i]; rec.held == nil && moves(rec, ev) {
			m := movedFlow{f: f, rec: *rec}
			if rec.rule != nil {
				m.rule, m.hasRule = rec.rule.name, true
			}
			if rec.denied != nil {
				m.denied, m.hasDeny = rec.denied.name, true
			}
			if rec.drop != nil {
				m.drop, m.hasDrop = rec.drop.key, true
			}
			for c := rec.others; c != nil; c = c.next {
				m.others = append(m.others, [2]string{c.rule.name, c.dest})
			}
			moved = append(moved, m)
		}
	}
	flows = flows[:n]
	ov := l.copyLocked()
	l.mu.Unlock()
	gens := make(map[dropKey]uint64, len(ov.dropped)) // at the copy (keepAllowedLocked)
	for k, d := range ov.dropped {
		gens[k] = d.clients.gen
	}
	events, dups := ov.totals.Events, ov.totals.Duplicates
	ov.mu.Lock() // ov is this call's own: no one waits for it
	isMoved := map[*flowRec]bool{}
	for _, m := range moved {
		rec := new(flowRec)
		*rec = m.rec
		rec.rule, rec.drop, rec.denied, rec.held, rec.others = nil, nil, nil, nil, nil
		if m.hasRule {
			rec.rule = ov.rules[m.rule]
		}
		// The overlay's own rules: the ledger's are not this call's to
		// change (a reattribution takes the credits back).
		for _, o := range slices.Backward(m.others) {
			rec.others = &otherCredit{rule: ov.rules[o[0]], dest: o[1], next: rec.others}
		}
		if m.hasDeny {
			rec.denied = ov.rules[m.denied]
		}
		if m.hasDrop {
			rec.drop = ov.dropped[m.drop]
		}
		ov.rememberLocked(rec)
		isMoved[rec] = true
		ev := bounded(m.f.i)
		ov.addLocked(&ev)
	}
	for _, f := range flows {
		ev := bounded(f.i)
		ov.addLocked(&ev)
	}
	// Open flows are no events.
	ov.totals.Events, ov.totals.Duplicates = events, dups
	ov.mu.Unlock()
	byRule := map[string]uint64{}
	byDrop := map[dropKey]uint64{}
	var opened uint64
	for _, rec := range ov.ring {
		if isMoved[rec] {
			continue // in the event log already: moved, not open
		}
		opened++
		switch {
		case rec.rule != nil:
			byRule[rec.rule.name]++
			for c := rec.others; c != nil; c = c.next {
				byRule[c.rule.name]++
			}
		case rec.drop != nil:
			byDrop[rec.drop.key]++
		}
	}
	ov.mu.Lock()
	r := ov.buildLocked(opt)
	ov.mu.Unlock()
	l.mu.Lock()
	l.keepAllowedLocked(ov, gens)
	l.releaseLocked()
	l.mu.Unlock()
	r.OpenFlows = opened
	if r.OpenFlows > 0 {
		r.Notes = append(r.Notes, fmt.Sprintf("%d flow(s) open now are counted, not in the event log yet (capture records a UDP flow after 60 s of silence, any flow a minute after it began; the proxy a connection when it closes)", r.OpenFlows))
	}
	for i := range r.Rules {
		r.Rules[i].OpenFlows = byRule[r.Rules[i].Name]
	}
	for i := range r.Dropped {
		d := &r.Dropped[i]
		d.OpenFlows = byDrop[dropKey{d.Dest, d.Port, d.Proto}]
	}
	return r
}

// allowedNowLocked is allowedNow of ds under l's policy, whose rules
// expired of are expired at now: the entry's memo of an earlier report
// when none of what it rests on changed since (the policy, the rules
// expired, the clients and their MACs, the address, the reason), so a
// report of an unchanged full list decides nothing again.
func (l *Ledger) allowedNowLocked(ds *dropStats, as []netip.Addr, now time.Time, expired int) string {
	if l.eng == nil {
		return ""
	}
	m := allowedMemo{eng: l.eng, expired: expired, gen: ds.clients.gen, ip: ds.ip, reason: ds.reason}
	if was := ds.allowed; was.eng != nil {
		rule := was.rule
		if was.rule = ""; was == m {
			return rule
		}
	}
	if allowedNowHook != nil {
		allowedNowHook()
	}
	m.rule = allowedNow(l.eng, ds, as, now)
	ds.allowed = m
	return m.rule
}

// coverageLocked says what the ledger's counts rest on.
func (l *Ledger) coverageLocked() *Coverage {
	if l.arch != nil {
		ro := l.arch.cov
		return &Coverage{DetailFrom: ro.Until, RotatedOut: &ro}
	}
	if l.firstEvent.IsZero() {
		return nil
	}
	return &Coverage{DetailFrom: l.firstEvent}
}

// beforeDetail completes a report over a window that starts before the
// detailed log: rules the summary saw used inside the window are used,
// not unused, and the returned note says where the window's counts
// start. Rules the policy eng no longer has are listed too, marked (not
// InPolicy): the summary keeps the names events had.
func (r *Report) beforeDetail(arch *archInfo, eng *policy.Engine, since time.Time) string {
	used := map[string]bool{}
	for _, u := range r.Rules {
		used[u.Name] = true
	}
	var inPolicy map[string]bool
	if eng != nil {
		inPolicy = map[string]bool{}
		for _, rule := range eng.Rules() {
			inPolicy[rule.Name] = true
		}
	}
	kept := 0 // rules of the policy kept off the unused list
	for name, u := range arch.rules {
		if !u.last.Before(since) && !used[name] {
			in := inPolicy == nil || inPolicy[name]
			r.UsedBeforeDetail = append(r.UsedBeforeDetail, RuleBeforeDetail{Name: name, LastSeen: u.last, Uses: u.uses, InPolicy: in})
			used[name] = true
			if in {
				kept++
			}
		}
	}
	// The policy's rules first, then those it no longer has.
	slices.SortFunc(r.UsedBeforeDetail, func(a, b RuleBeforeDetail) int {
		if a.InPolicy != b.InPolicy {
			if a.InPolicy {
				return -1
			}
			return 1
		}
		return cmp.Compare(a.Name, b.Name)
	})
	r.UnusedRules = slices.DeleteFunc(r.UnusedRules, func(n string) bool { return used[n] })
	listed := map[dropKey]bool{}
	for _, d := range r.Dropped {
		listed[dropKey{d.Dest, d.Port, d.Proto}] = true
	}
	drops := 0
	for k, last := range arch.drops {
		if !last.Before(since) && !listed[k] {
			drops++
		}
	}
	note := fmt.Sprintf("counts in this window start at %s: older events were rotated out of the event log, and only a summary of them is kept (since %s)",
		fmtTime(arch.cov.Until), fmtTime(arch.cov.From))
	switch n := kept; {
	case n == 1:
		note += "; 1 rule used in the window before then is listed as used before the detailed log, not as unused"
	case n > 1:
		note += fmt.Sprintf("; %d rules used in the window before then are listed as used before the detailed log, not as unused", n)
	}
	switch n := len(r.UsedBeforeDetail) - kept; {
	case n == 1:
		note += "; 1 rule used in the window before then is not in the current policy (renamed or removed since): it is listed there, marked so"
	case n > 1:
		note += fmt.Sprintf("; %d rules used in the window before then are not in the current policy (renamed or removed since): they are listed there, marked so", n)
	}
	if drops > 0 {
		note += fmt.Sprintf("; %d dropped entries seen in the window before then are not listed (the report without a window lists them)", drops)
	}
	return note
}

// reportBuildHook, set by tests, is called while a report is built (before
// its dropped list, the costly part) with the ledger it is built from.
var reportBuildHook func(*Ledger)

// reportWaitHook, set by tests, is called when Report waits for another's
// report to be made.
var reportWaitHook func()

// windowWaitHook, set by tests, is called when a window's report waits
// for another window's read of the event log (windowReads).
var windowWaitHook func()

// windowEventHook, set by tests, is called with each event a window's read
// of the event log passes on, with the report's context and the events
// passed on so far.
var windowEventHook func(ctx context.Context, events uint64)

// allowedNowHook, set by tests, is called each time a report decides a
// dropped entry's allowed_now (not from its memo).
var allowedNowHook func()

// snapshot builds l's report from a copy of its counts (copyLocked), so
// that l's lock is held for the copy only, not for the build: at the
// ledger's bounds a build takes about a second of CPU
// (BenchmarkReportDroppedFull), and every event recorded meanwhile would
// wait for it (TestReportDoesNotStallRecording). The copy shares the
// clients' sets copy-on-write (clientSet.clone), so it costs the entries,
// not their clients. Then each dropped entry's allowed_now memo the build
// decided is kept on l for the next report, unless the entry's clients
// changed since the copy (the memo would not hold for them anyway), and
// l's clients' sets are l's own again (releaseLocked).
func (l *Ledger) snapshot(opt ReportOptions) *Report {
	l.mu.Lock()
	c := l.copyLocked()
	l.mu.Unlock()
	c.mu.Lock() // c is this call's own: no one waits for it
	r := c.buildLocked(opt)
	c.mu.Unlock()
	l.mu.Lock()
	l.keepAllowedLocked(c, nil)
	l.releaseLocked()
	l.mu.Unlock()
	return r
}

// keepAllowedLocked keeps on l each dropped entry's allowed_now memo the
// build of c, a copy of l's counts (copyLocked), decided, for the next
// report: unless the entry's clients changed since the copy, on l (the
// memo would not hold for them anyway) or on c. gens are the entries'
// clients' generations at the copy when c changed since (the open flows
// counted on it, snapshotOpen), nil when c did not: an entry c changed
// is not kept, nor one c added. Its generation on c can equal l's
// though the clients differ (an open flow's client added on c, an
// event's on l), so the generations at the copy are the test, not c's.
func (l *Ledger) keepAllowedLocked(c *Ledger, gens map[dropKey]uint64) {
	for k, d := range c.dropped {
		ds := l.dropped[k]
		if ds == nil || d.allowed == ds.allowed || d.allowed.gen != ds.clients.gen {
			continue
		}
		if gens != nil {
			if g, ok := gens[k]; !ok || g != d.allowed.gen {
				continue
			}
		}
		ds.allowed = d.allowed
	}
}

// buildLocked makes the report of l's counts. It records allowed_now
// memos on l's dropped entries.
func (l *Ledger) buildLocked(opt ReportOptions) *Report {
	r := &Report{
		GeneratedAt:  opt.Now.UTC(),
		Rules:        []RuleReport{},
		UnusedRules:  []string{},
		ExpiredRules: []ExpiredRule{},
		Dropped:      []DroppedReport{},
		Totals:       l.totals,
	}
	if opt.Since.IsZero() {
		r.UnwrittenEvents = l.unwritten
	}
	if !opt.Since.IsZero() {
		s := opt.Since.UTC()
		r.Since = &s
	}
	for _, a := range l.alarms {
		if opt.Since.IsZero() || !a.LastSeen.Before(opt.Since) {
			r.Alarms = append(r.Alarms, *a)
		}
	}
	slices.SortFunc(r.Alarms, func(a, b AlarmReport) int {
		if c := cmp.Compare(b.DistinctNames, a.DistinctNames); c != 0 {
			return c
		}
		return cmp.Compare(a.Client+" "+a.Zone, b.Client+" "+b.Zone)
	})
	r.AlarmsDropped = l.alarmsDropped
	if e := &l.ech; e.stripped+e.wouldStrip > 0 {
		cl := e.clients.list()
		r.ECH = &ECHReport{Stripped: e.stripped, WouldStrip: e.wouldStrip, Clients: cl, ClientCount: len(cl),
			ClientsTruncated: e.clients.truncated, Names: e.names.top(l.opt.TopDestinations)}
	}
	for _, m := range l.shedMarks {
		if opt.Since.IsZero() || !m.t.Before(opt.Since) {
			r.ShedEvents += m.n
		}
	}
	order := map[string]int{}
	expiredRules := 0 // of l.eng at opt.Now (allowedNowLocked)
	r.Mode = l.lastMode
	if l.eng != nil {
		if !opt.EventMode || r.Mode == "" {
			r.Mode = l.eng.Mode()
		}
		r.Policy = l.eng.Policy().File
		for i, rule := range l.eng.Rules() {
			order[rule.Name] = i
			rs := l.rules[rule.Name]
			expired := !rule.Expires.IsZero() && !opt.Now.Before(rule.Expires)
			if expired {
				expiredRules++
				var n uint64
				if rs != nil {
					n = rs.denied
				}
				r.ExpiredRules = append(r.ExpiredRules, ExpiredRule{Name: rule.Name, Expires: rule.Expires.UTC(), Flows: n})
				continue
			}
			if rs == nil || rs.flows == 0 && rs.queries == 0 && rs.requests == 0 {
				r.UnusedRules = append(r.UnusedRules, rule.Name)
			}
		}
	}
	for _, rs := range l.rules {
		if rs.flows == 0 && rs.queries == 0 && rs.requests == 0 {
			continue
		}
		_, in := order[rs.name]
		in = in || l.eng == nil
		top := rs.dests.top(l.opt.TopDestinations)
		names := make([]string, len(top))
		for i, d := range top {
			names[i] = d.Dest
		}
		cl := rs.clients.list()
		r.Rules = append(r.Rules, RuleReport{
			Name: rs.name, Flows: rs.flows, Queries: rs.queries, Requests: rs.requests,
			BytesOut: rs.bytesOut, BytesIn: rs.bytesIn,
			Clients: cl, ClientCount: len(cl), ClientsTruncated: rs.clients.truncated, ClientDevices: rs.clients.report(),
			Destinations: names, TopDestinations: top,
			FirstSeen: rs.first, LastSeen: rs.last, InPolicy: in, AnswersWithheld: rs.withheld,
		})
	}
	slices.SortFunc(r.Rules, func(a, b RuleReport) int {
		if c := cmp.Compare(b.Flows, a.Flows); c != 0 {
			return c
		}
		if c := cmp.Compare(b.Queries, a.Queries); c != 0 {
			return c
		}
		ia, oka := order[a.Name]
		ib, okb := order[b.Name]
		if oka && okb && ia != ib {
			return cmp.Compare(ia, ib)
		}
		return cmp.Compare(a.Name, b.Name)
	})
	if reportBuildHook != nil {
		reportBuildHook(l)
	}
	for _, ds := range l.dropped {
		if ds.flows == 0 && ds.queries == 0 && ds.requests == 0 {
			continue // its only flow was counted elsewhere after all (reattributeLocked)
		}
		as := ds.clients.addrs() // sorted once, for the list and allowedNow
		cl := addrStrings(as)
		ip := ""
		if ds.ip.IsValid() {
			ip = ds.ip.String()
		}
		var ips []string
		if l := ds.ipList(); l != nil {
			ips = addrStrings(l)
		}
		r.Dropped = append(r.Dropped, DroppedReport{
			Dest: ds.key.dest, IP: ip, IPs: ips, IPsTruncated: ds.ipsTruncated, Port: ds.key.port, Proto: ds.key.proto,
			Flows: ds.flows, Queries: ds.queries, Requests: ds.requests, BytesOut: ds.bytesOut, BytesIn: ds.bytesIn,
			Clients: cl, ClientCount: len(cl), ClientsTruncated: ds.clients.truncated, ClientDevices: ds.clients.report(),
			Enforced: ds.enforced, EnforcedFlows: ds.enforcedFlows,
			Reason: ds.reason, Rule: ds.rule, FirstSeen: ds.first, LastSeen: ds.last,
			AllowedNow: l.allowedNowLocked(ds, as, opt.Now, expiredRules),
		})
	}
	if n := wrongClockNote(r); n != "" {
		r.Notes = append(r.Notes, n)
	}
	slices.SortFunc(r.Dropped, func(a, b DroppedReport) int {
		if c := cmp.Compare(b.Flows+b.Queries+b.Requests, a.Flows+a.Queries+a.Requests); c != 0 {
			return c
		}
		if c := cmp.Compare(a.Dest, b.Dest); c != 0 {
			return c
		}
		if c := cmp.Compare(a.Port, b.Port); c != 0 {
			return c
		}
		return cmp.Compare(a.Proto, b.Proto)
	})
	return r
}

// WriteJSON writes the report as indented JSON (DESIGN.md's report JSON).
func (r *Report) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	if err := enc.Encode(r); err != nil {
		return fmt.Errorf("audit: write report: %w", err)
	}
	return nil
}

// ReadReportJSON decodes a report written by WriteJSON (the admin API's
// /report.json).
func ReadReportJSON(rd io.Reader) (*Report, error) {
	var r Report
	if err := json.NewDecoder(io.LimitReader(rd, 256<<20)).Decode(&r); err != nil {
		return nil, fmt.Errorf("audit: read report: %w", err)
	}
	return &r, nil
}

// WriteText writes the report as terminal tables.
func (r *Report) WriteText(w io.Writer) error {
	ew := &errWriter{w: w}
	mode := string(r.Mode)
	if mode == "" {
		mode = "unknown"
	}
	fmt.Fprintf(ew, "egressd report: mode %s, generated %s", mode, fmtTime(r.GeneratedAt))
	if r.Since != nil {
		fmt.Fprintf(ew, ", since %s", fmtTime(*r.Since))
	}
	fmt.Fprintln(ew)
	if r.Policy != "" {
		fmt.Fprintf(ew, "policy: %s\n", r.Policy)
	}
	fmt.Fprintf(ew, "%s (%d allowed, %d dropped), %s, %s shed\n", plural(r.Totals.Flows, "flow", "flows"),
		r.Totals.Allowed, r.Totals.Dropped, plural(r.Totals.Queries, "DNS query", "DNS queries"), plural(r.ShedEvents, "event", "events"))
	if r.Totals.Requests > 0 {
		fmt.Fprintf(ew, "%s on plain-HTTP and inspected connections (%d dropped), decided one by one\n", plural(r.Totals.Requests, "further HTTP request", "further HTTP requests"), r.Totals.DroppedRequests)
	}
	if r.ShedEvents > 0 {
		fmt.Fprintf(ew, "WARNING: %s shed (the event log could not keep up); they are in no count below\n", plural(r.ShedEvents, "event was", "events were"))
	}
	if r.UnwrittenEvents > 0 {
		fmt.Fprintf(ew, "WARNING: %s could not be written to the event log (disk full?); they are counted below but will be missing after a restart\n", plural(r.UnwrittenEvents, "event", "events"))
	}
	if c := r.Coverage; c != nil {
		fmt.Fprintf(ew, "covers: every event since %s in full detail", fmtTime(c.DetailFrom))
		if ro := c.RotatedOut; ro != nil {
			fmt.Fprintf(ew, "; before that, %s of %s rotated out of it (%s to %s) are counted from a summary: counts and first/last seen, not the events", plural(ro.Events, "event", "events"), plural(ro.Files, "file", "files"), fmtTime(ro.From), fmtTime(ro.Until))
		}
		fmt.Fprintln(ew)
	}
	for _, n := range r.Notes {
		fmt.Fprintf(ew, "note: %s\n", n)
	}

	// The REQUESTS column (later requests of plain-HTTP and inspected
	// connections, refused 407 challenges) is there when any were
	// counted: a rule or dropped entry may have requests and no flow.
	reqHead, reqCell := "", func(uint64) string { return "" }
	if r.Totals.Requests > 0 {
		reqHead, reqCell = "REQUESTS\t", func(n uint64) string { return fmt.Sprintf("%d\t", n) }
	}
	// The DEVICES column (how many LAN devices the clients are, by MAC)
	// is there when some client was seen with a MAC; without one, each
	// address is a device of its own.
	devHead, devCell := "", func(ClientDevices) string { return "" }
	if r.anyMACs() {
		devHead, devCell = "DEVICES\t", func(d ClientDevices) string { return fmtCount(d.DeviceCount, d.DevicesTruncated) + "\t" }
	}
	fmt.Fprintf(ew, "\nRULES BY USE (%d)\n", len(r.Rules))
	if len(r.Rules) == 0 {
		fmt.Fprintln(ew, "  (none used)")
	} else {
		tw := tabwriter.NewWriter(ew, 0, 0, 2, ' ', 0)
		fmt.Fprintf(tw, "  RULE\tFLOWS\tQUERIES\t%sOUT\tIN\tCLIENTS\t%sFIRST SEEN\tLAST SEEN\tTOP DESTINATIONS\n", reqHead, devHead)
		for _, u := range r.Rules {
			name := u.Name
			if !u.InPolicy {
				name += " (not in policy)"
			}
			fmt.Fprintf(tw, "  %s\t%d\t%d\t%s%s\t%s\t%s\t%s%s\t%s\t%s\n", name, u.Flows, u.Queries, reqCell(u.Requests),
				fmtBytes(u.BytesOut), fmtBytes(u.BytesIn), fmtCount(u.ClientCount, u.ClientsTruncated), devCell(u.ClientDevices),
				fmtTime(u.FirstSeen), fmtTime(u.LastSeen), shortList(textNames(u.Destinations), 3))
		}
		tw.Flush()
		for _, u := range r.Rules {
			if u.AnswersWithheld > 0 {
				fmt.Fprintf(ew, "  %s: %s\n", u.Name, withheldNote(u))
			}
		}
		fmt.Fprintf(ew, "\nCLIENTS BY RULE\n")
		for _, u := range r.Rules {
			fmt.Fprintf(ew, "  %s: %s\n", u.Name, clientList(u.Clients, u.ClientsTruncated, u.ClientDevices))
		}
	}

	fmt.Fprintf(ew, "\nUNUSED RULES (%d)\n", len(r.UnusedRules))
	for _, n := range r.UnusedRules {
		fmt.Fprintf(ew, "  %s\n", n)
	}
	if len(r.UsedBeforeDetail) > 0 {
		fmt.Fprintf(ew, "\nUSED IN THE WINDOW BEFORE THE DETAILED LOG BEGINS (%d)\n", len(r.UsedBeforeDetail))
		for _, u := range r.UsedBeforeDetail {
			name := u.Name
			if !u.InPolicy {
				name += " (not in policy)"
			}
			fmt.Fprintf(ew, "  %s  last seen %s; %s in the summary of rotated-out files\n", name, fmtTime(u.LastSeen), plural(u.Uses, "flow, query or request", "flows, queries and requests"))
		}
	}
	if len(r.ExpiredRules) > 0 {
		fmt.Fprintf(ew, "\nEXPIRED RULES (%d)\n", len(r.ExpiredRules))
		for _, e := range r.ExpiredRules {
			fmt.Fprintf(ew, "  %s  expires: %s, %s denied that only it would allow\n", e.Name, expiresDate(e.Expires), plural(e.Flows, "flow", "flows"))
		}
	}

	if len(r.Alarms) > 0 {
		fmt.Fprintf(ew, "\nALARMS (%d)\n", len(r.Alarms))
		for _, a := range r.Alarms {
			who := a.Client
			if who == "" {
				who = "all clients"
			}
			if a.ClientMAC != "" {
				who += " (" + textName(a.ClientMAC) + ")"
			}
			if len(a.TopClients) > 0 {
				who += " (most names from " + strings.Join(textNames(a.TopClients), ", ") + ")"
			}
			fmt.Fprintf(ew, "  %s  %s  zone %s: %s in a window (%s, rule %s), %s to %s\n",
				textName(a.Reason), who, textName(a.Zone), plural(a.DistinctNames, "distinct name", "distinct names"), plural(a.Alarms, "alarm", "alarms"), textName(a.Rule), a.FirstSeen.Format(time.RFC3339), a.LastSeen.Format(time.RFC3339))
		}
		if r.AlarmsDropped > 0 {
			fmt.Fprintf(ew, "  %s not kept (bound)\n", plural(r.AlarmsDropped, "more alarm", "more alarms"))
		}
	}
	if e := r.ECH; e != nil {
		fmt.Fprintf(ew, "\nECH CONFIGS IN DNS ANSWERS (they hide the name a client connects to)\n")
		if e.Stripped > 0 {
			fmt.Fprintf(ew, "  %s of egressd's DNS forwarder had theirs stripped (in every mode)", plural(e.Stripped, "answer", "answers"))
			if len(e.Names) > 0 {
				names := make([]string, len(e.Names))
				for i, n := range e.Names {
					names[i] = fmt.Sprintf("%s (%d)", textName(n.Dest), n.Count)
				}
				fmt.Fprintf(ew, ": %s", shortList(names, 5))
			}
			fmt.Fprintln(ew)
		}
		if e.WouldStrip > 0 {
			fmt.Fprintf(ew, "  %s with other resolvers kept theirs: in enforce mode every LAN query goes to the forwarder, which strips them\n", plural(e.WouldStrip, "DNS exchange", "DNS exchanges"))
		}
		fmt.Fprintf(ew, "  clients: %s\n", shortList(e.Clients, 5))
	}

	title := "DROPPED"
	if r.Mode == policy.ModeAudit {
		title = "WOULD BE DROPPED (audit mode: not blocked)"
	}
	fmt.Fprintf(ew, "\n%s (%d)\n", title, len(r.Dropped))
	if len(r.Dropped) == 0 {
		fmt.Fprintln(ew, "  (nothing)")
	} else {
		tw := tabwriter.NewWriter(ew, 0, 0, 2, ' ', 0)
		fmt.Fprintf(tw, "  DEST\tIP\tPORT\tFLOWS\tQUERIES\t%sCLIENTS\t%sENFORCED\tREASON\tFIRST SEEN\tLAST SEEN\n", reqHead, devHead)
		for _, d := range r.Dropped {
			ip := d.IP
			if ip == "" || ip == d.Dest {
				ip = "-"
			} else if others := d.otherIPs(); others != "" {
				ip += " " + others
			}
			enf := d.enforcedText()
			reason := d.reasonText()
			fmt.Fprintf(tw, "  %s\t%s\t%s\t%d\t%d\t%s%s\t%s%s\t%s\t%s\t%s\n", textName(d.Dest), ip, d.portText(),
				d.Flows, d.Queries, reqCell(d.Requests), fmtCount(d.ClientCount, d.ClientsTruncated), devCell(d.ClientDevices), enf, reason,
				fmtTime(d.FirstSeen), fmtTime(d.LastSeen))
		}
		tw.Flush()
		several := false
		for _, d := range r.Dropped {
			if len(d.IPs) > 1 || d.IPsTruncated {
				if !several {
					fmt.Fprintf(ew, "\nADDRESSES (entries whose flows went to more than one; IP above is the latest)\n")
					several = true
				}
				fmt.Fprintf(ew, "  %s %s: %s\n", textName(d.Dest), d.portText(), d.ipsText())
			}
		}
		who := "CLIENTS THAT TRIED (by entry above)"
		fmt.Fprintf(ew, "\n%s\n", who)
		for _, d := range r.Dropped {
			fmt.Fprintf(ew, "  %s %s: %s\n", textName(d.Dest), d.portText(), clientList(d.Clients, d.ClientsTruncated, d.ClientDevices))
		}
	}
	return ew.err
}

// maxTextClients is how many clients a line of the text report lists.
const maxTextClients = 10

// clientList is a rule's or a dropped entry's clients as the text report
// lists them: each address with its MAC (ClientDevices.clientTexts),
// at most maxTextClients, then how many more.
func clientList(clients []string, truncated bool, d ClientDevices) string {
	if len(clients) == 0 {
		return "-"
	}
	s := shortList(d.clientTexts(clients), maxTextClients)
	if truncated {
		s += ", and more not kept"
	}
	return s
}

// reasonText is d's reason as the text and HTML reports show it: the
// deny reason, the expired rule that would allow it, and the rule of the
// running policy that allows it now (AllowedNow), as the JSON says.
func (d DroppedReport) reasonText() string {
	s := d.Reason
	if d.Rule != "" {
		s += " (" + d.Rule + ")"
	}
	if d.AllowedNow != "" {
		s += " (allowed now by rule " + d.AllowedNow + ")"
	}
	return strings.TrimPrefix(s, " ")
}

// portText is d's port as the text and HTML reports show it: "443/tcp";
// for a flow without ports (capture's other protocols: port 0), "icmp"
// for an ICMP or ICMPv6 echo the policy decided, as a rule's ports and
// policy explain --port say it, else the protocol's name ("gre", "esp",
// "253"; "icmp" for a request that is not an echo, denied
// protocol-not-allowed, as its reason says).
func (d DroppedReport) portText() string {
	switch {
	case d.Port != 0 || d.Proto == "tcp" || d.Proto == "udp" || d.Proto == "dns":
		return fmt.Sprintf("%d/%s", d.Port, d.Proto)
	case (d.Proto == "icmp" || d.Proto == "ipv6-icmp") && d.Reason != "protocol-not-allowed":
		return "icmp"
	}
	return d.Proto
}

// enforcedText says how much of a dropped entry was blocked: "yes" (all
// of it), "no", or "N/M" flows when some were (an audit run, then an
// enforce run). The text and HTML reports both print it.
func (d DroppedReport) enforcedText() string {
	switch {
	case d.EnforcedFlows > 0 && d.EnforcedFlows != d.Flows:
		return fmt.Sprintf("%d/%d", d.EnforcedFlows, d.Flows)
	case d.EnforcedFlows > 0 || d.Enforced:
		return "yes"
	}
	return "no"
}

type errWriter struct {
	w   io.Writer
	err error
}

func (e *errWriter) Write(p []byte) (int, error) {
	if e.err != nil {
		return 0, e.err
	}
	n, err := e.w.Write(p)
	if err != nil {
		e.err = fmt.Errorf("audit: write report: %w", err)
	}
	return n, err
}

func fmtTime(t time.Time) string {
	if t.IsZero() {
		return "-"
	}
	return t.UTC().Format("2006-01-02 15:04:05Z")
}

// plural is n and its noun: one when n is 1, else many ("1 flow", "2
// flows"), as the text and HTML reports count.
func plural[T int | uint64](n T, one, many string) string {
	if n == 1 {
		return "1 " + one
	}
	return fmt.Sprintf("%d %s", n, many)
}

func fmtCount(n int, more bool) string {
	if more {
		return fmt.Sprintf("%d+", n)
	}
	return fmt.Sprint(n)
}

func fmtBytes(n uint64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := uint64(unit), 0
	for m := n / unit; m >= unit && exp < 4; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTP"[exp])
}

// textName is a name as the terminal reports print it: as it is when it
// is printable ASCII without spaces (every valid name, every address),
// else quoted with Go's escapes. Names come off the wire (an SNI or Host
// header capture read) and may hold anything: printed raw, a control
// sequence would reach the operator's terminal and a newline would forge
// a row.
func textName(s string) string {
	for i := 0; i < len(s); i++ {
		if s[i] <= ' ' || s[i] >= 0x7f {
			return strconv.Quote(s)
		}
	}
	return s
}

func textNames(s []string) []string {
	out := make([]string, len(s))
	for i, n := range s {
		out[i] = textName(n)
	}
	return out
}

func shortList(s []string, n int) string {
	if len(s) <= n {
		return strings.Join(s, ", ")
	}
	return strings.Join(s[:n], ", ") + fmt.Sprintf(", +%d", len(s)-n)
}

// expiresDate is the date as written in the policy ("expires: 2026-12-31"
// stops matching at the start of 2027-01-01).
func expiresDate(t time.Time) string {
	return t.Add(-time.Nanosecond).Format("2006-01-02")
}

// wrongClockNote says, when a rule or a dropped destination of r was first
// seen before SourceFloor, that those times are not real: the events were
// recorded while the clock was wrong, as on a gateway without a real-time
// clock that starts at 1970 and runs until NTP sets its clock. The events
// count all the same; their times say nothing.
func wrongClockNote(r *Report) string {
	var earliest time.Time
	n := 0
	see := func(t time.Time) {
		if t.IsZero() || !t.Before(SourceFloor) {
			return
		}
		n++
		if earliest.IsZero() || t.Before(earliest) {
			earliest = t
		}
	}
	for _, rr := range r.Rules {
		see(rr.FirstSeen)
	}
	for _, d := range r.Dropped {
		see(d.FirstSeen)
	}
	if n == 0 {
		return ""
	}
	return fmt.Sprintf("%d rule(s) or dropped destination(s) first seen before %s (the earliest %s): events recorded while the clock was wrong (a gateway without a real-time clock before NTP set it); they count, but their times are not real",
		n, SourceFloor.Format("2006-01-02"), fmtTime(earliest))
}
