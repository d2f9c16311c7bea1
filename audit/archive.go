package audit

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"egressd/internal/atomicfile"
	"egressd/internal/setaside"
	"egressd/policy"
)

// ArchiveFile is the summary of the events of rotated-out event log
// files, in the state directory: before rotation deletes a file, its
// events are folded into it, so that counts, first/last seen times and
// would-be drops survive a restart. A summary the load cannot read is
// set aside as ArchiveFile+".refused.N" (internal/setaside: each one
// kept, the newest setaside.Max), except one of a later format
// version (a newer egressd's, after a rollback): that one is left in
// place, unread and not written over.
const ArchiveFile = "ledger-archive.json"

// maxArchiveBytes bounds the summary read; a larger file is refused.
// A variable for tests.
var maxArchiveBytes = 64 << 20

const (
	archiveVersion = 1
	// maxArchiveRules bounds the rules the summary keeps (the most
	// recently used): rule names come from policies, renamed over time.
	maxArchiveRules = 1024
)

// maxArchiveFlows bounds the flows the summary remembers at its end
// (archive.Open): the latest recorded, as the ledger's table of recent
// flows keeps them, of those that ended within archiveFlowWindow of the
// latest end. Another component's report of a flow is written when it
// ends too, within capture's TCP idle time (5 minutes) of the first.
const (
	maxArchiveFlows   = 4096
	archiveFlowWindow = 10 * time.Minute
)

// archive is the summary's file: the ledger's counts over the folded
// events, bounded as the ledger bounds them. Flows are deduplicated
// within what was folded and across a fold's boundary: the summary
// remembers the latest flows and queries it counted (Open), so that a
// flow reported at the end of a folded file and again in the next one
// (capture's report and the proxy's, written a moment apart) counts once,
// whether the next file is folded in too or read after the summary.
type archive struct {
	Version int `json:"version"`
	// From and Until are the oldest and newest event times folded in:
	// every event after Until is in the kept files.
	From  time.Time `json:"from"`
	Until time.Time `json:"until"`
	// LastFile is the base name of the newest file folded in: kept files
	// with that name or an older one (left by a crash between the write
	// and the delete) are already in the summary and are not read.
	LastFile string      `json:"last_file"`
	Files    uint64      `json:"files"`
	Events   uint64      `json:"events"`
	Mode     policy.Mode `json:"mode,omitempty"`
	Totals   Totals      `json:"totals"`
	Shed     uint64      `json:"shed"`
	Rules    []archRule  `json:"rules"`
	Dropped  []archDrop  `json:"dropped"`
	ECH      archECH     `json:"ech"`
	// Alarms are the ledger's alarms (THREATS.md E2: the DNS
	// forwarder's dns-tunnel), AlarmsDropped those past its bound.
	Alarms        []AlarmReport `json:"alarms,omitempty"`
	AlarmsDropped uint64        `json:"alarms_dropped,omitempty"`
	// Open are the latest flows and queries counted (at most
	// maxArchiveFlows, the oldest first), with where each counts.
	Open []archFlow `json:"open_flows,omitempty"`
}

// archFlow is one remembered flow or query (a flowRec): its identity and
// span, the bytes counted for it, and where it counts: Rule (allowed),
// the dropped entry DropDest/DropPort/DropProto (denied), Denied (the
// expired rule that would have allowed it).
type archFlow struct {
	Kind       Kind       `json:"kind"`
	Client     netip.Addr `json:"client"`
	ClientPort uint16     `json:"client_port,omitempty"`
	DestIP     netip.Addr `json:"dest_ip,omitzero"`
	DestPort   uint16     `json:"dest_port,omitempty"`
	Proto      string     `json:"proto,omitempty"`
	Name       string     `json:"name,omitempty"`
	QType      string     `json:"qtype,omitempty"`
	QueryID    uint16     `json:"query_id,omitempty"`
	Start      time.Time  `json:"start"`
	End        time.Time  `json:"end"`
	BytesOut   uint64     `json:"bytes_out,omitempty"`
	BytesIn    uint64     `json:"bytes_in,omitempty"`
	Enforced   bool       `json:"enforced,omitempty"`
	Source     Source     `json:"source,omitempty"`
	Rule       string     `json:"rule,omitempty"`
	Dest       string     `json:"dest,omitempty"` // allowed: the name counted in the rule's destinations
	DropDest   string     `json:"drop_dest,omitempty"`
	DropPort   uint16     `json:"drop_port,omitempty"`
	DropProto  string     `json:"drop_proto,omitempty"`
	Denied     string     `json:"denied,omitempty"`
}

type archRule struct {
	Name             string       `json:"name"`
	Flows            uint64       `json:"flows"`
	Queries          uint64       `json:"queries,omitempty"`
	Requests         uint64       `json:"requests,omitempty"`
	BytesOut         uint64       `json:"bytes_out,omitempty"`
	BytesIn          uint64       `json:"bytes_in,omitempty"`
	Denied           uint64       `json:"denied,omitempty"`
	Withheld         uint64       `json:"answers_withheld,omitempty"`
	Clients          []netip.Addr `json:"clients,omitempty"`
	ClientsTruncated bool         `json:"clients_truncated,omitempty"`
	ClientMACs       []archMACs   `json:"client_macs,omitempty"`
	Dests            []DestCount  `json:"dests,omitempty"`
	First            time.Time    `json:"first"`
	Last             time.Time    `json:"last"`
}

type archDrop struct {
	Dest             string       `json:"dest"`
	Port             uint16       `json:"port"`
	Proto            string       `json:"proto"`
	IP               netip.Addr   `json:"ip,omitzero"`
	IPs              []netip.Addr `json:"ips,omitempty"` // when more than one
	IPsTruncated     bool         `json:"ips_truncated,omitempty"`
	Flows            uint64       `json:"flows,omitempty"`
	Queries          uint64       `json:"queries,omitempty"`
	Requests         uint64       `json:"requests,omitempty"`
	EnforcedFlows    uint64       `json:"enforced_flows,omitempty"`
	Enforced         bool         `json:"enforced,omitempty"`
	BytesOut         uint64       `json:"bytes_out,omitempty"`
	BytesIn          uint64       `json:"bytes_in,omitempty"`
	Reason           string       `json:"reason,omitempty"`
	Rule             string       `json:"rule,omitempty"`
	Clients          []netip.Addr `json:"clients,omitempty"`
	ClientsTruncated bool         `json:"clients_truncated,omitempty"`
	ClientMACs       []archMACs   `json:"client_macs,omitempty"`
	First            time.Time    `json:"first"`
	Last             time.Time    `json:"last"`
}

// archMACs are the MACs seen with a client (macSeen): the latest last.
// A summary without them (written before session 21) has clients
// without MACs.
type archMACs struct {
	Client netip.Addr `json:"client"`
	MACs   []string   `json:"macs"`
	More   bool       `json:"more,omitempty"`
}

type archECH struct {
	Stripped         uint64       `json:"stripped,omitempty"`
	WouldStrip       uint64       `json:"would_strip,omitempty"`
	Clients          []netip.Addr `json:"clients,omitempty"`
	ClientsTruncated bool         `json:"clients_truncated,omitempty"`
	Names            []DestCount  `json:"names,omitempty"`
}

// archInfo is what a report needs of the summary beyond the counts the
// ledger took from it: what it covers, and when each rule and dropped
// entry was last seen in it (for windows that reach into it).
type archInfo struct {
	cov      RotatedOut
	lastFile string
	rules    map[string]archUse
	drops    map[dropKey]time.Time // last seen
}

type archUse struct {
	last time.Time
	uses uint64 // flows + queries + requests
}

func newArchInfo(a *archive) *archInfo {
	ai := &archInfo{
		cov:      RotatedOut{From: a.From, Until: a.Until, Files: a.Files, Events: a.Events},
		lastFile: a.LastFile,
		rules:    make(map[string]archUse, len(a.Rules)),
		drops:    make(map[dropKey]time.Time, len(a.Dropped)),
	}
	for _, r := range a.Rules {
		if n := r.Flows + r.Queries + r.Requests; n > 0 {
			ai.rules[r.Name] = archUse{r.Last, n}
		}
	}
	for _, d := range a.Dropped {
		if d.Flows+d.Queries+d.Requests > 0 {
			ai.drops[dropKey{d.Dest, d.Port, d.Proto}] = d.Last
		}
	}
	return ai
}

// newerArchiveError is a summary of a later format than this binary's:
// a newer egressd wrote it and the operator rolled back.
type newerArchiveError int

func (e newerArchiveError) Error() string {
	return fmt.Sprintf("version %d, this egressd reads version %d", int(e), archiveVersion)
}

// parseArchive decodes and checks a summary file.
func parseArchive(b []byte) (*archive, error) {
	if len(b) > maxArchiveBytes {
		return nil, fmt.Errorf("over %d bytes", maxArchiveBytes)
	}
	var a archive
	if err := json.Unmarshal(b, &a); err != nil {
		return nil, err
	}
	switch {
	case a.Version > archiveVersion:
		return nil, newerArchiveError(a.Version)
	case a.Version != archiveVersion:
		return nil, fmt.Errorf("version %d, want %d", a.Version, archiveVersion)
	case a.Until.Before(a.From):
		return nil, errors.New("its time span ends before it begins")
	case a.LastFile != "" && (!strings.HasPrefix(a.LastFile, rotatedPrefix) || filepath.Base(a.LastFile) != a.LastFile):
		return nil, fmt.Errorf("last file %q is not a rotated event log file", a.LastFile)
	}
	return &a, nil
}

// loadArchive reads the summary of dir. A missing one is nil. One that
// cannot be read or parsed is nil too, with a warning and a note for the
// report; with setAside it is renamed ArchiveFile+".refused.N" (kept for
// the operator, and out of the way of the next fold's write). One a newer
// egressd wrote (newer is true) is left where it is, whatever setAside:
// after a rollback the newer binary, upgraded to again, reads it; until
// then the counts start at the kept files and folds do not write it over.
func loadArchive(dir string, log *slog.Logger, setAside bool) (a *archive, note string, newer bool) {
	path := filepath.Join(dir, ArchiveFile)
	b, err := readRegular(path, int64(maxArchiveBytes))
	if errors.Is(err, os.ErrNotExist) {
		return nil, "", false
	}
	if err == nil {
		a, err = parseArchive(b)
	}
	if err == nil {
		return a, "", false
	}
	var ne newerArchiveError
	if errors.As(err, &ne) {
		log.Warn("audit: the summary of rotated-out event log files was written by a newer egressd; left in place for it, counts of events older than the kept files are missing here",
			"file", path, LogError, err)
		return nil, fmt.Sprintf("the summary of rotated-out event log files (%s) was written by a newer egressd (%v): left in place for it, events older than the kept files are in no count here, and files rotation deletes meanwhile are not added to it", ArchiveFile, err), true
	}
	kept := ""
	if setAside {
		if k, rerr := setaside.Keep(path); rerr == nil {
			kept = k
		}
	}
	log.Warn("audit: the summary of rotated-out event log files is unreadable; counts of events older than the kept files are missing",
		"file", path, LogError, err, "kept_as", kept)
	note = fmt.Sprintf("the summary of rotated-out event log files (%s) could not be read (%v): events older than the kept files are in no count", ArchiveFile, err)
	if kept != "" {
		note += "; it was set aside as " + kept
	}
	return nil, note, false
}

// readRegular reads a regular file of at most limit bytes, without
// following a link or blocking on a FIFO.
func readRegular(path string, limit int64) ([]byte, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if !fi.Mode().IsRegular() {
		return nil, errors.New("not a regular file")
	}
	if fi.Size() > limit {
		return nil, fmt.Errorf("%d bytes, over %d", fi.Size(), limit)
	}
	b, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err == nil && int64(len(b)) > limit {
		err = fmt.Errorf("over %d bytes", limit)
	}
	return b, err
}

// writeArchive replaces dir's summary atomically (atomicfile), mode 0640.
func writeArchive(dir string, a *archive) error {
	b, err := fitArchive(a)
	if err == nil {
		err = atomicfile.WriteFile(filepath.Join(dir, ArchiveFile), b, 0o640, atomicfile.Replace)
	}
	if err != nil {
		return fmt.Errorf("audit: write summary: %w", err)
	}
	return nil
}

// fitArchive encodes a summary in at most maxArchiveBytes, what the load
// accepts: while it is larger, it keeps half as many destinations (the
// most counted) and client addresses per rule, dropped entry and ECH
// names. Counts are never cut, so no rule is called unused for it. The
// ledger's bounds keep a summary far below the limit unless LAN clients
// chose long names that JSON escapes (six bytes a control character).
func fitArchive(a *archive) ([]byte, error) {
	for keep := -1; ; {
		b, err := json.Marshal(a)
		if err != nil || len(b) <= maxArchiveBytes {
			return b, err
		}
		if keep == 0 {
			return nil, fmt.Errorf("%d bytes, over %d with no destination or client kept", len(b), maxArchiveBytes)
		}
		if keep < 0 {
			keep = longestList(a)
			if len(a.Open) > 0 { // only deduplication needs them: they go first
				a.Open, keep = nil, -1
				continue
			}
		}
		keep /= 2
		for i := range a.Rules {
			r := &a.Rules[i]
			r.Dests = r.Dests[:min(len(r.Dests), keep)]
			r.Clients, r.ClientsTruncated = cutClients(r.Clients, r.ClientsTruncated, keep)
			r.ClientMACs = cutMACs(r.ClientMACs, r.Clients)
		}
		for i := range a.Dropped {
			d := &a.Dropped[i]
			d.Clients, d.ClientsTruncated = cutClients(d.Clients, d.ClientsTruncated, keep)
			d.ClientMACs = cutMACs(d.ClientMACs, d.Clients)
		}
		a.ECH.Names = a.ECH.Names[:min(len(a.ECH.Names), keep)]
		a.ECH.Clients, a.ECH.ClientsTruncated = cutClients(a.ECH.Clients, a.ECH.ClientsTruncated, keep)
	}
}

func cutClients(cs []netip.Addr, truncated bool, keep int) ([]netip.Addr, bool) {
	if len(cs) <= keep {
		return cs, truncated
	}
	return cs[:keep], true
}

// cutMACs keeps the MACs of the clients kept (both lists are sorted by
// address).
func cutMACs(ms []archMACs, kept []netip.Addr) []archMACs {
	if len(kept) == 0 {
		return nil
	}
	last := kept[len(kept)-1]
	n := 0
	for n < len(ms) && ms[n].Client.Compare(last) <= 0 {
		n++
	}
	return ms[:n]
}

// longestList is the length of a's longest destination or client list.
func longestList(a *archive) int {
	n := max(len(a.ECH.Names), len(a.ECH.Clients))
	for _, r := range a.Rules {
		n = max(n, len(r.Dests), len(r.Clients))
	}
	for _, d := range a.Dropped {
		n = max(n, len(d.Clients))
	}
	return n
}

// removeArchiveTemps removes the temporary files of summary writes that
// a kill interrupted.
func removeArchiveTemps(dir string) {
	atomicfile.RemoveTemps(filepath.Join(dir, ArchiveFile))
}

// importArchive starts a fresh ledger from a summary: its counts, bounded
// by the ledger's options whatever the file says.
func (l *Ledger) importArchive(a *archive) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.totals = a.Totals
	if a.Mode != "" {
		l.lastMode = a.Mode
	}
	if a.Shed > 0 {
		l.shed += a.Shed
		l.shedMarks = append(l.shedMarks, shedMark{a.Until.UTC(), a.Shed})
	}
	for i, r := range a.Rules {
		if i >= maxArchiveRules {
			break
		}
		rs := l.ruleLocked(Clip(r.Name, MaxNameBytes))
		rs.flows += r.Flows
		rs.queries += r.Queries
		rs.requests += r.Requests
		rs.bytesOut += r.BytesOut
		rs.bytesIn += r.BytesIn
		rs.denied += r.Denied
		rs.withheld += min(r.Withheld, r.Queries)
		importClients(&rs.clients, r.Clients, r.ClientMACs, r.ClientsTruncated, l.opt.MaxClients)
		rs.dests.set(r.Dests, l.opt.MaxDestinations)
		rs.seen(r.First.UTC())
		rs.seen(r.Last.UTC())
	}
	for _, d := range a.Dropped {
		k := dropKey{Clip(d.Dest, MaxNameBytes), d.Port, Clip(d.Proto, 8)}
		ds := l.dropped[k]
		if ds == nil {
			// As dropLocked: beyond the bound, into the overflow entry.
			if len(l.dropped) >= l.opt.MaxDropped-1 {
				k = overflowKey
				ds = l.dropped[k]
			}
			if ds == nil {
				ds = &dropStats{key: k}
				l.dropped[k] = ds
			}
		}
		ds.flows += d.Flows
		ds.queries += d.Queries
		ds.requests += d.Requests
		ds.enforcedFlows += d.EnforcedFlows
		ds.enforced = d.Enforced
		ds.bytesOut += d.BytesOut
		ds.bytesIn += d.BytesIn
		ds.reason, ds.rule = Clip(d.Reason, MaxNameBytes), Clip(d.Rule, MaxNameBytes)
		ds.ip = d.IP.Unmap()
		for _, a := range d.IPs {
			ds.addIP(a.Unmap())
		}
		ds.addIP(ds.ip)
		ds.ipsTruncated = ds.ipsTruncated || d.IPsTruncated
		importClients(&ds.clients, d.Clients, d.ClientMACs, d.ClientsTruncated, l.opt.MaxClients)
		ds.seen(d.First.UTC())
		ds.seen(d.Last.UTC())
	}
	l.ech.stripped += a.ECH.Stripped
	l.ech.wouldStrip += a.ECH.WouldStrip
	importClients(&l.ech.clients, a.ECH.Clients, nil, a.ECH.ClientsTruncated, l.opt.MaxClients)
	l.ech.names.set(a.ECH.Names, l.opt.MaxDestinations)
	l.importAlarmsLocked(a)
	l.importFlowsLocked(a.Open)
	l.arch = newArchInfo(a)
}

// importFlowsLocked remembers a summary's latest flows, for the
// deduplication of their later reports, pointing at the counts imported.
// One whose rule or dropped entry the import did not keep is left out
// (its later report then counts again): a later report must never take
// back a count that is not there. So is one past what its counts hold
// (a damaged or edited summary: more flows pointing at a rule than it
// counts, more bytes than it has): the remembered flows of a rule, a
// dropped entry and the totals never claim more than they count, so
// taking every one back (reattributeLocked) leaves them at zero at least.
func (l *Ledger) importFlowsLocked(fs []archFlow) {
	// claimed is what the flows remembered so far take of a count.
	type claimed struct{ flows, queries, denied, enforced, out, in uint64 }
	rules := map[*ruleStats]*claimed{}
	drops := map[*dropStats]*claimed{}
	var allowed, dropped uint64
	claimOf := func(c *claimed, f *archFlow, flows, queries, out, in uint64) bool {
		if f.Kind == KindFlow {
			return c.flows < flows && c.out+f.BytesOut <= out && c.in+f.BytesIn <= in &&
				c.out+f.BytesOut >= c.out && c.in+f.BytesIn >= c.in
		}
		return c.queries < queries && c.out+f.BytesOut <= out && c.in+f.BytesIn <= in &&
			c.out+f.BytesOut >= c.out && c.in+f.BytesIn >= c.in
	}
	take := func(c *claimed, f *archFlow) {
		if f.Kind == KindFlow {
			c.flows++
		} else {
			c.queries++
		}
		c.out += f.BytesOut
		c.in += f.BytesIn
	}
	for _, f := range fs[max(0, len(fs)-min(maxArchiveFlows, l.opt.MaxFlows)):] {
		if (f.Kind != KindFlow && f.Kind != KindDNS) || f.End.Before(f.Start) {
			continue
		}
		id := flowID{FlowKey: FlowKey{Client: f.Client.Unmap(), ClientPort: f.ClientPort, Dest: f.DestIP.Unmap(), DestPort: f.DestPort,
			Proto: knownText(Clip(f.Proto, 8))}, kind: KindFlow}
		if f.Kind == KindDNS {
			id.kind = KindDNS
			id.name, id.qtype, id.qid = lowerASCII(trimDot(Clip(f.Name, MaxNameBytes))), knownText(Clip(f.QType, 16)), f.QueryID
		}
		if !id.keyed() {
			continue
		}
		var rs, denied *ruleStats
		var ds *dropStats
		switch {
		case f.Rule != "":
			if rs = l.rules[Clip(f.Rule, MaxNameBytes)]; rs == nil {
				continue
			}
			c := rules[rs]
			if c == nil {
				c = &claimed{}
				rules[rs] = c
			}
			if !claimOf(c, &f, rs.flows, rs.queries, rs.bytesOut, rs.bytesIn) || (f.Kind == KindFlow && allowed >= l.totals.Allowed) {
				continue
			}
			take(c, &f)
			if f.Kind == KindFlow {
				allowed++
			}
		case f.DropDest != "":
			k := dropKey{Clip(f.DropDest, MaxNameBytes), f.DropPort, Clip(f.DropProto, 8)}
			if ds = l.dropped[k]; ds == nil {
				ds = l.dropped[overflowKey]
			}
			if ds == nil {
				continue
			}
			c := drops[ds]
			if c == nil {
				c = &claimed{}
				drops[ds] = c
			}
			if !claimOf(c, &f, ds.flows, ds.queries, ds.bytesOut, ds.bytesIn) || (f.Kind == KindFlow && dropped >= l.totals.Dropped) ||
				(f.Kind == KindFlow && f.Enforced && c.enforced >= ds.enforcedFlows) {
				continue
			}
			var dc *claimed
			if f.Denied != "" && f.Kind == KindFlow {
				if denied = l.rules[Clip(f.Denied, MaxNameBytes)]; denied == nil {
					continue
				}
				if dc = rules[denied]; dc == nil {
					dc = &claimed{}
					rules[denied] = dc
				}
				if dc.denied >= denied.denied {
					continue
				}
				dc.denied++
			}
			take(c, &f)
			if f.Kind == KindFlow {
				dropped++
				if f.Enforced {
					c.enforced++
				}
			}
		default:
			continue
		}
		h := id.hash(l.seed)
		rec := l.recLocked()
		rec.id, rec.h, rec.start, rec.end = id, h, f.Start.UTC(), f.End.UTC()
		rec.bytesOut, rec.bytesIn, rec.enforced, rec.source = f.BytesOut, f.BytesIn, f.Enforced, Source(knownText(Clip(string(f.Source), 16)))
		rec.rule, rec.drop, rec.denied = rs, ds, denied
		if rs != nil {
			// The rule's destinations' copy of the name, when they
			// count it: one string for the records of a name.
			rec.dest = Clip(f.Dest, MaxNameBytes)
			if e := rs.dests.idx[rec.dest]; e != nil {
				rec.dest = e.Dest
			}
			rec.shareName(rec.dest)
		} else {
			rec.shareName(ds.key.dest)
		}
		l.rememberLocked(rec)
	}
}

// exportFlowsLocked returns the latest remembered flows and queries, the
// oldest first, at most maxArchiveFlows.
func (l *Ledger) exportFlowsLocked() []archFlow {
	n := len(l.ring)
	var latest time.Time
	for _, r := range l.ring {
		if r.end.After(latest) {
			latest = r.end
		}
	}
	var out []archFlow
	for i := max(0, n-maxArchiveFlows); i < n; i++ {
		r := l.ring[(l.ringPos+i)%n] // the ring's oldest is at ringPos once it is full, at 0 before (ringPos 0)
		if r.end.Add(archiveFlowWindow).Before(latest) {
			continue
		}
		f := archFlow{Kind: r.id.kind, Client: r.id.Client, ClientPort: r.id.ClientPort, DestIP: r.id.Dest, DestPort: r.id.DestPort,
			Proto: r.id.Proto, Name: r.id.name, QType: r.id.qtype, QueryID: r.id.qid, Start: r.start, End: r.end,
			BytesOut: r.bytesOut, BytesIn: r.bytesIn, Enforced: r.enforced, Source: r.source}
		switch {
		case r.rule != nil:
			f.Rule, f.Dest = r.rule.name, r.dest
		case r.drop != nil:
			f.DropDest, f.DropPort, f.DropProto = r.drop.key.dest, r.drop.key.port, r.drop.key.proto
			if r.denied != nil {
				f.Denied = r.denied.name
			}
		default:
			continue
		}
		out = append(out, f)
	}
	return out
}

// importClients adds a summary's clients to c, with the MACs it kept of
// those clients (of no others: a cut summary, fitArchive, keeps the
// MACs of clients it cut), at most maxClientMACs an address.
func importClients(c *clientSet, as []netip.Addr, macs []archMACs, truncated bool, maxClients int) {
	for _, a := range as {
		c.add(a.Unmap(), "", maxClients)
	}
	for _, m := range macs {
		a := m.Client.Unmap()
		s, ok := c.m[a]
		if !ok {
			continue
		}
		c.own()
		for _, t := range m.MACs[max(0, len(m.MACs)-maxClientMACs):] {
			if mac, ok := parseMAC6(t); ok {
				s.see(mac)
			}
		}
		s.more = s.more || m.More || len(m.MACs) > maxClientMACs
		c.m[a] = s
	}
	c.truncated = c.truncated || truncated
	c.gen++
}

// macs returns the MACs seen with c's clients, as a summary keeps them.
func (c *clientSet) macs() []archMACs {
	var out []archMACs
	for _, a := range c.addrs() {
		s := c.m[a]
		if s.n == 0 {
			continue
		}
		m := archMACs{Client: a, MACs: make([]string, s.n), More: s.more}
		for i, mac := range s.list() {
			m.MACs[i] = mac.String()
		}
		out = append(out, m)
	}
	return out
}

// set adds entries with their counts (a summary's), keeping at most max:
// the most counted.
func (d *destCounter) set(es []DestCount, max int) {
	for _, e := range es {
		name := Clip(e.Dest, MaxNameBytes)
		if d.idx == nil {
			d.idx = map[string]*destEntry{}
		}
		if old := d.idx[name]; old != nil {
			old.Count += e.Count
			d.down(old.pos)
			continue
		}
		if len(d.h) < max {
			n := &destEntry{DestCount{name, e.Count}, len(d.h)}
			d.h = append(d.h, n)
			d.idx[name] = n
			d.up(n.pos)
			continue
		}
		if len(d.h) > 0 && e.Count > d.h[0].Count {
			low := d.h[0]
			delete(d.idx, low.Dest)
			low.DestCount = DestCount{name, e.Count}
			d.idx[name] = low
			d.down(0)
		}
	}
}

// export returns the ledger's counts as a summary (without its span,
// which the fold sets).
func (l *Ledger) export() *archive {
	l.mu.Lock()
	defer l.mu.Unlock()
	a := &archive{Version: archiveVersion, Mode: l.lastMode, Totals: l.totals, Shed: l.shed,
		Rules: []archRule{}, Dropped: []archDrop{}}
	for _, rs := range l.rules {
		a.Rules = append(a.Rules, archRule{Name: rs.name, Flows: rs.flows, Queries: rs.queries, Requests: rs.requests,
			BytesOut: rs.bytesOut, BytesIn: rs.bytesIn, Denied: rs.denied, Withheld: rs.withheld,
			Clients: rs.clients.addrs(), ClientsTruncated: rs.clients.truncated, ClientMACs: rs.clients.macs(),
			Dests: rs.dests.top(len(rs.dests.h)), First: rs.first, Last: rs.last})
	}
	// The most recently used first, so that a bound drops the oldest.
	slices.SortFunc(a.Rules, func(x, y archRule) int {
		if c := y.Last.Compare(x.Last); c != 0 {
			return c
		}
		return cmp.Compare(x.Name, y.Name)
	})
	if len(a.Rules) > maxArchiveRules {
		a.Rules = a.Rules[:maxArchiveRules]
	}
	for _, ds := range l.dropped {
		if ds.flows == 0 && ds.queries == 0 && ds.requests == 0 {
			continue
		}
		a.Dropped = append(a.Dropped, archDrop{Dest: ds.key.dest, Port: ds.key.port, Proto: ds.key.proto, IP: ds.ip,
			IPs: ds.ipList(), IPsTruncated: ds.ipsTruncated,
			Flows: ds.flows, Queries: ds.queries, Requests: ds.requests, EnforcedFlows: ds.enforcedFlows, Enforced: ds.enforced,
			BytesOut: ds.bytesOut, BytesIn: ds.bytesIn, Reason: ds.reason, Rule: ds.rule,
			Clients: ds.clients.addrs(), ClientsTruncated: ds.clients.truncated, ClientMACs: ds.clients.macs(), First: ds.first, Last: ds.last})
	}
	slices.SortFunc(a.Dropped, func(x, y archDrop) int {
		return cmp.Or(cmp.Compare(x.Dest, y.Dest), cmp.Compare(x.Port, y.Port), cmp.Compare(x.Proto, y.Proto))
	})
	a.ECH = archECH{Stripped: l.ech.stripped, WouldStrip: l.ech.wouldStrip, Clients: l.ech.clients.addrs(),
		ClientsTruncated: l.ech.clients.truncated, Names: l.ech.names.top(len(l.ech.names.h))}
	for _, al := range l.alarms {
		a.Alarms = append(a.Alarms, *al)
	}
	slices.SortFunc(a.Alarms, func(x, y AlarmReport) int {
		return cmp.Or(cmp.Compare(x.Reason, y.Reason), cmp.Compare(x.Client, y.Client), cmp.Compare(x.ClientMAC, y.ClientMAC), cmp.Compare(x.Zone, y.Zone))
	})
	a.AlarmsDropped = l.alarmsDropped
	a.Open = l.exportFlowsLocked()
	return a
}

// importAlarmsLocked adds a summary's alarms, bounded and clipped as
// addAlarmLocked keeps them whatever the file says.
func (l *Ledger) importAlarmsLocked(a *archive) {
	l.alarmsDropped += a.AlarmsDropped
	for _, al := range a.Alarms {
		k := alarmKey{knownText(al.Reason), Clip(al.Client, MaxNameBytes), Clip(al.ClientMAC, MaxNameBytes), lowerASCII(trimDot(Clip(al.Zone, MaxNameBytes)))}
		e := l.alarms[k]
		if e == nil {
			if len(l.alarms) >= maxAlarms {
				l.alarmsDropped += al.Alarms
				continue
			}
			if l.alarms == nil {
				l.alarms = map[alarmKey]*AlarmReport{}
			}
			e = &AlarmReport{Reason: k.reason, Client: k.client, ClientMAC: k.mac, Zone: k.zone, Rule: Clip(al.Rule, MaxNameBytes)}
			l.alarms[k] = e
		}
		e.Alarms += al.Alarms
		e.mergeWindow(al.DistinctNames, al.TopClients)
		e.seen(al.FirstSeen.UTC())
		e.seen(al.LastSeen.UTC())
	}
}

func (c *clientSet) addrs() []netip.Addr {
	as := make([]netip.Addr, 0, len(c.m))
	for a := range c.m {
		as = append(as, a)
	}
	slices.SortFunc(as, netip.Addr.Compare)
	return as
}

// fold compresses the rotated files still plain (with Compress), then
// folds the oldest rotated files beyond the limit (overLimit) into the
// summary and deletes them, until the rest fit. A file it cannot fold (the
// summary cannot be written: a full disk) is kept for the next rotation
// to try again, up to maxPendingFiles past the limit; beyond that the
// oldest is deleted unfolded, its counts lost (logged and counted). Rotation starts it in the
// background (reading or compressing a 64 MiB file must not stall the
// writer); one runs at a time, and Close waits for it.
func (j *Journal) fold() {
	defer j.folds.Done()
	j.foldMu.Lock()
	defer j.foldMu.Unlock()
	compress := j.cfg.Compress
	for range 1 << 16 { // bounded: each round deletes a file or returns
		// Each round first compresses what rotation added meanwhile: a
		// file counts at its plain size until then. After a failure
		// (an error line) the rest stay plain until the next fold.
		if compress {
			compress = j.compressRotated()
		}
		files, err := LogFiles(j.cfg.Dir)
		if err != nil {
			return
		}
		j.rotMu.RLock()
		last := j.archLast
		j.rotMu.RUnlock()
		var rotated, stale []string
		for _, f := range files {
			switch n := logName(f); {
			case n == CurrentLog:
			case last != "" && n <= last:
				stale = append(stale, f)
			default:
				rotated = append(rotated, f)
			}
		}
		if len(stale) > 0 { // folded already: a crash came before the delete
			j.remove(stale)
			continue
		}
		pending := j.overLimit(rotated)
		j.unfolded.Store(int64(max(0, pending)))
		if pending <= 0 {
			j.mu.Lock()
			j.foldErr = nil
			j.mu.Unlock()
			return
		}
		err = j.foldFile(rotated[0])
		j.mu.Lock()
		j.foldErr = err
		j.mu.Unlock()
		if err == nil {
			continue
		}
		if pending <= maxPendingFiles {
			j.log.Error("audit: could not add a rotated-out event log file to the summary; kept it, the next rotation tries again",
				"file", filepath.Base(rotated[0]), LogError, err, "pending_files", pending)
			return
		}
		j.log.Error("audit: could not add a rotated-out event log file to the summary, and more than two wait already; deleting it: its counts are lost",
			"file", filepath.Base(rotated[0]), LogError, err, "pending_files", pending-1)
		j.lost.Add(1)
		j.remove(rotated[:1])
	}
}

// overLimit returns how many of the rotated files (oldest first) are
// past the newest MaxFiles, compressed or not. Not counted by bytes on
// disk, though compressed files are some 10 times smaller: a start reads
// every kept file before egressd serves (1.5-2.2 s for 64 MiB of events on
// a 2-core box, BenchmarkReadRotated), so more files would hold more
// history at the cost of a longer outage at each restart.
func (j *Journal) overLimit(rotated []string) int {
	return len(rotated) - j.cfg.MaxFiles
}

// maxPendingFiles bounds the rotated files kept past the limit because
// the summary could not be written (a full disk): the disk stays bounded,
// and a passing failure loses no count.
const maxPendingFiles = 2

// foldFile adds the events of one rotated file to the summary and
// deletes the file. When the file cannot be read or the summary cannot
// be written, it leaves the file and returns the error (fold decides).
// A summary a newer egressd wrote (a rollback) is left as it is: the
// file is deleted without being added to it, as before there was one.
func (j *Journal) foldFile(path string) error {
	a, _, newer := loadArchive(j.cfg.Dir, j.log, true)
	if newer {
		j.log.Warn("audit: the summary of rotated-out event log files was written by a newer egressd; deleting a rotated-out event log file without adding it to the summary: its events will be missing after a restart",
			"file", path)
		j.lost.Add(1)
		j.remove([]string{path})
		return nil
	}
	tmp := NewLedger(nil, j.ledger.opt)
	if a != nil {
		tmp.importArchive(a)
	} else {
		a = &archive{}
	}
	from, until := a.From, a.Until
	var st LoadStats
	// A damaged compressed file (readFile logs it) is folded as far as it
	// can be read: reading it again would find the same damage.
	err := readFile(path, j.log, false, &st, func(ev Event) {
		if t := ev.Time.UTC(); !t.IsZero() {
			if from.IsZero() || t.Before(from) {
				from = t
			}
			if t.After(until) {
				until = t
			}
		}
		if ev.Kind == KindShed {
			tmp.addShed(ev.Time, ev.Count)
			return
		}
		tmp.add(&ev)
	})
	na := tmp.export()
	// LastFile names the file as it was plain, in whichever form it
	// was folded: names compare in that form (logName).
	na.From, na.Until, na.LastFile = from, until, logName(path)
	na.Files, na.Events = a.Files+1, a.Events+st.Events
	if errors.As(err, new(damagedError)) {
		err = nil
	}
	if err == nil {
		err = writeArchive(j.cfg.Dir, na)
	}
	if err != nil {
		return err
	}
	// The ledger learns what the summary now covers before a windowed
	// report's scan can miss the file: a report reads the ledger's
	// summary after its scan, so one that did not read the file sees
	// the file's events in the summary.
	info := newArchInfo(na)
	j.rotMu.Lock()
	j.ledger.mu.Lock()
	j.ledger.arch = info
	j.ledger.mu.Unlock()
	j.archLast = na.LastFile
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		j.log.Warn("audit: remove old event log", LogError, err)
	}
	j.rotMu.Unlock()
	if j.testHookFolded != nil {
		j.testHookFolded()
	}
	j.log.Info("audit: rotated-out event log file added to the summary", "file", filepath.Base(path), "events", st.Events,
		"summary_events", na.Events, "summary_until", na.Until)
	return nil
}

// remove deletes event log files (under rotMu: a windowed report's scan
// must not lose a file it listed).
func (j *Journal) remove(paths []string) {
	j.rotMu.Lock()
	defer j.rotMu.Unlock()
	for _, p := range paths {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			j.log.Warn("audit: remove old event log", LogError, err)
		}
	}
}
