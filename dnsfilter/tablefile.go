package dnsfilter

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"time"

	"egressd/policy"
)

// The table's file: what Save writes and Load reads, so that the table
// survives a restart of egressd (cmd/egressd keeps it in the state
// directory). Clients that resolved once and keep the address (chrony's
// NTP servers, a VPN client reconnecting to the address it cached) go on
// being let out by the firewall's learned sets, which are seeded from the
// table at install, and vouched for by the proxy, as before the restart.
//
// The format is JSON lines: a header line (tableFileHeader: the format's
// name and version), one line per item (client, name, address, rule, and
// the answer's expiry and the firewall's hold as Unix nanoseconds; a
// link-local client with its zone, as the table keys it), and an
// end line {"end":N,"saved":T} with the number of items, so a file cut
// short is known, and the clock's time of the save, so a clock that went
// back since is known. Load trusts nothing in it: a file that is not
// exactly what Save writes is refused whole. Nor does it take a policy's
// word from the file: the file may have been written under another policy
// or answer filter, and Load with Config.WouldLearn keeps only what the
// running forwarder would have learned.

const (
	// tableFileHeader is the first line of a table file.
	tableFileHeader = `{"egressd":"learned-addresses","version":2}`
	// tableFileMaxLine bounds a line of a table file (an item's line is
	// at most about 500 bytes: a name of 253, a rule, two addresses).
	tableFileMaxLine = 1024
	// maxLoadAhead is how far ahead of the clock an item's times may be.
	// Learn holds an address at most policy.LearnedMaxTTL, and Save
	// writes no answer's expiry further ahead than that; the margin
	// allows a small step back of the clock between the save and the
	// load. A file with a time further ahead did not come from Save on
	// this clock: it is refused rather than let an address in for longer.
	maxLoadAhead = policy.LearnedMaxTTL + maxClockBack
	// maxClockBack is how far behind the save's time the clock may be
	// at a load (a step of NTP). Further, the file is refused whole: its
	// times, read on this clock, would let every address in for as much
	// longer as the clock is behind (a gateway without a real-time clock,
	// started before NTP set it).
	maxClockBack = 5 * time.Minute
	// maxRuleLen bounds a rule name in the file (the policy's are 63
	// bytes at most).
	maxRuleLen = 255
)

// tableFileLine is one line of a table file after the header: an item,
// or the end line (End set, nothing else).
type tableFileLine struct {
	Client  string `json:"client,omitempty"`
	Name    string `json:"name,omitempty"`
	Addr    string `json:"addr,omitempty"`
	Rule    string `json:"rule,omitempty"`
	Expires int64  `json:"expires,omitempty"`
	Held    int64  `json:"held,omitempty"`
	End     *int   `json:"end,omitempty"`
	Saved   int64  `json:"saved,omitempty"` // the end line's
}

// Save writes the table's live items (those the table still keeps: the
// answer's TTL or the firewall's hold ahead) to w and returns how many it
// wrote. It takes each shard's read lock in turn and writes outside it.
// An answer's expiry further ahead than policy.LearnedMaxTTL is written
// as that (never longer); items Load would refuse (a client or name that
// is not one the forwarder learns from) are left out.
func (t *Table) Save(w io.Writer) (int, error) {
	bw := bufio.NewWriterSize(w, 64<<10)
	bw.WriteString(tableFileHeader + "\n")
	now := t.now().UnixNano()
	maxExp := now + int64(policy.LearnedMaxTTL)
	type saved struct {
		addr netip.Addr
		it   tableItem
	}
	var batch []saved
	enc := json.NewEncoder(bw)
	enc.SetEscapeHTML(false)
	n := 0
	for i := range t.shards {
		sh := &t.shards[i]
		batch = batch[:0]
		sh.mu.RLock()
		for a, items := range sh.m {
			for _, it := range items {
				if it.keep() > now {
					batch = append(batch, saved{a, it})
				}
			}
		}
		sh.mu.RUnlock()
		for _, s := range batch {
			l := tableFileLine{Client: s.it.client.String(), Name: s.it.name, Addr: s.addr.String(), Rule: s.it.rule,
				Expires: min(s.it.expires, maxExp), Held: s.it.held}
			if _, _, err := l.item(0, now+int64(maxLoadAhead)); err != nil {
				continue
			}
			if err := enc.Encode(&l); err != nil {
				return n, fmt.Errorf("dnsfilter: save learned table: %w", err)
			}
			n++
		}
	}
	fmt.Fprintf(bw, "{\"end\":%d,\"saved\":%d}\n", n, now)
	if err := bw.Flush(); err != nil {
		return n, fmt.Errorf("dnsfilter: save learned table: %w", err)
	}
	return n, nil
}

// Load reads a table file (what Save wrote) from r and adds its items
// that the table would still keep (the answer's TTL or the firewall's
// hold ahead), with their times as written: a restart never lengthens an
// answer or a hold. It returns how many items it added. An item the
// table already has (the same client, name and address) stays as it is.
// Nothing is added before the whole file has been read and checked: a
// file that is not one Save writes (another format or version, cut
// short, a malformed line, an address, name or rule the forwarder would
// not have learned, a time further ahead than the firewall holds an
// address, more items than the table holds, a line over 1 KiB, a save
// time more than 5 minutes ahead of the clock: it went back since, and
// every time in the file would last that much longer) is refused with an
// error saying where, and the table is left as it was.
// Load reads at most one line past the table's bound. Items are not
// published to subscribers.
//
// With admit, only the items it returns true for are added, with the rule
// it sets (Config.WouldLearn: what the running forwarder would have
// learned; the file may have been written under another policy or answer
// filter); an item it refuses is left out, not an error. Nil admits all.
func (t *Table) Load(r io.Reader, admit func(*Learned) bool) (int, error) {
	now := t.now().UnixNano()
	limit := now + int64(maxLoadAhead)
	capacity := t.perCap * tableShards
	type loaded struct {
		addr netip.Addr
		it   tableItem
	}
	var items []loaded
	br := bufio.NewReaderSize(r, tableFileMaxLine)
	lineNo, ended := 0, false
	for {
		line, err := br.ReadSlice('\n')
		switch {
		case errors.Is(err, bufio.ErrBufferFull):
			return 0, fmt.Errorf("dnsfilter: learned table: line %d too long (over %d bytes)", lineNo+1, tableFileMaxLine)
		case errors.Is(err, io.EOF) && len(line) > 0:
			if lineNo == 0 {
				return 0, errors.New("dnsfilter: learned table: not a table file (no header line)")
			}
			return 0, fmt.Errorf("dnsfilter: learned table: truncated (line %d has no end)", lineNo+1)
		case errors.Is(err, io.EOF):
		case err != nil:
			return 0, fmt.Errorf("dnsfilter: learned table: read: %w", err)
		}
		if err != nil {
			break
		}
		lineNo++
		line = line[:len(line)-1]
		if lineNo == 1 {
			if string(line) != tableFileHeader {
				return 0, fmt.Errorf("dnsfilter: learned table: not a table file of this version (header %.60q, want %s)", line, tableFileHeader)
			}
			continue
		}
		if ended {
			return 0, fmt.Errorf("dnsfilter: learned table: line %d after the end line", lineNo)
		}
		var l tableFileLine
		dec := json.NewDecoder(bytes.NewReader(line))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&l); err != nil {
			return 0, fmt.Errorf("dnsfilter: learned table: line %d: %v", lineNo, err)
		}
		if dec.More() {
			return 0, fmt.Errorf("dnsfilter: learned table: line %d: more than one JSON value", lineNo)
		}
		if l.End != nil {
			if l != (tableFileLine{End: l.End, Saved: l.Saved}) {
				return 0, fmt.Errorf("dnsfilter: learned table: line %d: an end line with an item's fields", lineNo)
			}
			if *l.End != len(items) {
				return 0, fmt.Errorf("dnsfilter: learned table: the end line says %d items, the file has %d", *l.End, len(items))
			}
			if l.Saved <= 0 {
				return 0, fmt.Errorf("dnsfilter: learned table: line %d: the end line has no save time", lineNo)
			}
			if l.Saved > now+int64(maxClockBack) {
				return 0, fmt.Errorf("dnsfilter: learned table: saved at %s, %s after the clock's now: the clock went back since (no real-time clock, not yet set by NTP?), and its times would hold addresses that much longer",
					time.Unix(0, l.Saved).UTC().Format(time.RFC3339), time.Duration(l.Saved-now).Round(time.Second))
			}
			ended = true
			continue
		}
		if l.Saved != 0 {
			return 0, fmt.Errorf("dnsfilter: learned table: line %d: an item with a save time", lineNo)
		}
		if len(items) >= capacity {
			return 0, fmt.Errorf("dnsfilter: learned table: more than %d items, the table's bound", capacity)
		}
		addr, it, err := l.item(0, limit)
		if err != nil {
			return 0, fmt.Errorf("dnsfilter: learned table: line %d: %w", lineNo, err)
		}
		items = append(items, loaded{addr, it})
	}
	if lineNo == 0 {
		return 0, errors.New("dnsfilter: learned table: empty file (no header line)")
	}
	if !ended {
		return 0, fmt.Errorf("dnsfilter: learned table: truncated (no end line after %d items)", len(items))
	}
	n := 0
	for _, l := range items {
		if l.it.keep() <= now {
			continue
		}
		if admit != nil {
			ll := Learned{Client: l.it.client, Name: l.it.name, Addr: l.addr, Rule: l.it.rule, Expires: time.Unix(0, l.it.expires)}
			if !admit(&ll) {
				continue
			}
			if validRule(ll.Rule) {
				l.it.rule = ll.Rule
			}
		}
		n += t.restore(l.addr, l.it, now)
	}
	return n, nil
}

// WouldLearn returns the admit test of Load for a forwarder run with c
// under eng: whether it would learn the item now. The forwarder learns
// the addresses of the answers eng allows, and in audit mode those of the
// names no rule allows too (with no rule: they are answered from
// upstream there), so eng must let the item's client resolve its name
// unless eng is in audit mode; the name must not be the canary nor an
// iCloud Private Relay canary eng does not allow, which the forwarder
// answers itself; and the address must be one the answer
// filter leaves in the name's answers (the rebinding filter, with c's
// AllowPrivateAnswers and PrivateSuffixes, and the special ranges of this
// version). The item's rule becomes the one eng credits, or none. So an
// answer given in audit mode for a name the enforce policy of the next
// start allows comes back under that policy's rule. A file written
// under another policy, another filter or by a version whose filter
// lacked a range so brings back only what the running forwarder would
// have given out.
//
// When eng names clients by MAC, each item's client is asked its MAC
// through macs (nil: no client has one), once per client, as the
// forwarder would ask it now. The test is for one Load: it is not safe
// for concurrent use.
func (c Config) WouldLearn(eng *policy.Engine, macs ClientMACs) func(*Learned) bool {
	c = c.withDefaults()
	var seen map[netip.Addr]net.HardwareAddr
	return func(l *Learned) bool {
		if l.Name == canaryName || c.rebinds(l.Name) && isSpecialNAT64(l.Addr, eng.NAT64()) {
			return false
		}
		var mac net.HardwareAddr
		if macs != nil && eng.HasMACs() {
			var ok bool
			if mac, ok = seen[l.Client]; !ok {
				if seen == nil {
					seen = map[netip.Addr]net.HardwareAddr{}
				}
				mac = macs.ClientMAC(l.Client.Unmap())
				seen[l.Client] = mac
			}
		}
		d := eng.DecideName(policy.Input{Client: l.Client, ClientMAC: mac, Name: l.Name})
		if !d.Allowed() && policy.IsPrivateRelay(l.Name) {
			return false
		}
		rule, ok := learnedRule(d)
		if !ok {
			return false
		}
		l.Rule = rule
		return true
	}
}

// item checks a line of the file and returns its item. Its times must be
// after min and at most limit.
func (l *tableFileLine) item(minTime, limit int64) (netip.Addr, tableItem, error) {
	client, err := netip.ParseAddr(l.Client)
	if err != nil || client.Zone() != "" && !(client.IsLinkLocalUnicast() && validZone(client.Zone())) {
		return netip.Addr{}, tableItem{}, fmt.Errorf("client %.60q is not an IP address (nor a link-local one with an interface's zone)", l.Client)
	}
	addr, err := netip.ParseAddr(l.Addr)
	if err != nil || addr.Zone() != "" {
		return netip.Addr{}, tableItem{}, fmt.Errorf("address %.60q is not an IP address", l.Addr)
	}
	if n, ok := policy.NormalizeName(l.Name); !ok || n != l.Name {
		return netip.Addr{}, tableItem{}, fmt.Errorf("name %.60q is not a normalised hostname", l.Name)
	}
	if !validRule(l.Rule) {
		return netip.Addr{}, tableItem{}, fmt.Errorf("rule %.60q is not a rule name", l.Rule)
	}
	if l.Expires <= minTime || l.Held <= minTime {
		return netip.Addr{}, tableItem{}, fmt.Errorf("times %d, %d: want both after %d", l.Expires, l.Held, minTime)
	}
	if l.Expires > limit || l.Held > limit {
		return netip.Addr{}, tableItem{}, fmt.Errorf("times %s, %s: further ahead than the firewall holds an address (%s; the clock went back?)",
			time.Unix(0, l.Expires).UTC().Format(time.RFC3339), time.Unix(0, l.Held).UTC().Format(time.RFC3339), policy.LearnedMaxTTL)
	}
	return addr.Unmap(), tableItem{client: client.Unmap(), name: l.Name, rule: l.Rule, expires: l.Expires, held: l.Held}, nil
}

// validZone reports whether s may be the zone of a link-local client in
// the table: as the forwarder's socket names it, an interface's name (at
// most 15 bytes, IFNAMSIZ, of printable ASCII without the '/', ':' and
// whitespace Linux refuses in one, nor '%'; not "." or "..") or its
// index.
func validZone(s string) bool {
	if len(s) == 0 || len(s) > 15 || s == "." || s == ".." {
		return false
	}
	for i := 0; i < len(s); i++ {
		if c := s[i]; c <= ' ' || c >= 0x7f || c == '/' || c == ':' || c == '%' {
			return false
		}
	}
	return true
}

// validRule reports whether s may be a rule name in the table: empty (an
// answer no rule allowed, in audit mode) or the letters, digits, '-', '_'
// and '.' of the policy's rule names.
func validRule(s string) bool {
	if len(s) > maxRuleLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_' || c == '.') {
			return false
		}
	}
	return true
}

// restore adds an item read from a file with its own times, unless the
// table has one for the same client, name and address, or maxPerAddr for
// the address. A full shard makes room as for Learn (an item with no rule
// pushes out no allowed one). It returns by how many items the table grew
// (0 or 1).
func (t *Table) restore(addr netip.Addr, it tableItem, now int64) int {
	sh := t.shard(addr)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	items := sh.m[addr]
	if len(items) >= maxPerAddr {
		return 0
	}
	for i := range items {
		if items[i].client == it.client && items[i].name == it.name {
			return 0
		}
	}
	before := sh.n
	if sh.n >= t.perCap {
		if ok, _ := t.makeRoomLocked(sh, now, it.rule == "", it.client); !ok {
			return 0
		}
		items = sh.m[addr] // the victim may have been of this address
	}
	items = append(items, it)
	sh.m[addr] = items
	sh.n++
	sh.norule += noRule(it.rule)
	sh.countClient(it.client, 1)
	sh.noteItem(addr, &items[len(items)-1])
	t.size.Add(1)
	return sh.n - before
}
