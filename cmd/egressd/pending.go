package main

import (
	"encoding/json"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"slices"

	"egressd/audit"
	"egressd/firewall"
	"egressd/internal/atomicfile"
	"egressd/policy"
)

// pendingFile lists, in the state directory, the enforce policies whose
// rulesets egressd was putting in when it last wrote it, with what they
// ran with, written (synced) before the install or reload and removed
// once the copy and its record (runningPolicyFile, runningFirewallFile)
// are of the policy that went in and the marks carry its tags alone
// (firewall.Firewall.MarksSettled; until then the copy replaced is added
// to it: noteReplacedCopy). A kill between the two leaves it: the
// next start reads the marks as the copy's policy's or as one of these
// (firewall.Deps.Pending), not as the copy's alone, which may be older
// than the ruleset that wrote them.
const pendingFile = "policy.pending.json"

// pendingRecord is pendingFile's content.
type pendingRecord struct {
	Version  int             `json:"version"`
	Policies []pendingPolicy `json:"policies"` // oldest first
}

// pendingPolicy is a policy being put in, and the flags its ruleset
// depends on, as given.
type pendingPolicy struct {
	Source     string `json:"source"`
	TCPPorts   string `json:"tcp_ports"`
	NAT64      string `json:"nat64_prefix"`
	CTMarkBits string `json:"ct_mark_bits"`
	// FastPath is --fast-path; nil: not known (a note of an egressd
	// before the field, or of a copy without a record of it).
	FastPath *bool `json:"fast_path,omitempty"`
}

// pendingVersion is the version pendingFile is written with; one of
// another is not read.
const pendingVersion = 1

// maxPending bounds pendingFile: kills in a row before the copy (a crash
// right after each install) each add their policy, or move it last when
// it is there already; beyond, the oldest are dropped.
const maxPending = 8

// readPending returns pendingFile's policies; nil when there is none, or
// it cannot be read (said).
func (d *daemon) readPending() []pendingPolicy {
	p := filepath.Join(d.cfg.stateDir, pendingFile)
	b, err := os.ReadFile(p)
	if err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			d.log.Warn("cannot read the policies an earlier egressd was putting in; conntrack mark tags are read as the copy's", "file", p, audit.LogError, err.Error())
		}
		return nil
	}
	var rec pendingRecord
	if err := json.Unmarshal(b, &rec); err != nil || rec.Version != pendingVersion {
		if err == nil {
			err = errors.New("another version")
		}
		d.log.Warn("the policies an earlier egressd was putting in do not parse; conntrack mark tags are read as the copy's", "file", p, audit.LogError, err.Error())
		return nil
	}
	return rec.Policies
}

// pendingPolicies is readPending's policies as the firewall reads marks
// with them; one that does not compile or whose flags do not parse is
// left out (said).
func (d *daemon) pendingPolicies() []firewall.Prior {
	var out []firewall.Prior
	p := filepath.Join(d.cfg.stateDir, pendingFile)
	for _, pp := range d.readPending() {
		eng, err := policy.Compile(p, []byte(pp.Source))
		var ports []policy.PortRange
		var nat64 []netip.Prefix
		var bits uint32
		if err == nil {
			ports, err = parseTCPPorts(pp.TCPPorts)
		}
		if err == nil {
			nat64, err = policy.ParseNAT64(pp.NAT64)
		}
		if err == nil {
			bits, err = parseCTMarkBits(pp.CTMarkBits)
		}
		if err != nil {
			d.log.Warn("a policy an earlier egressd was putting in does not compile; its conntrack mark tags are read as the others'", "file", p, audit.LogError, err.Error())
			continue
		}
		out = append(out, firewall.Prior{Policy: eng.WithNAT64(nat64), TCPPorts: &ports, CTMarkBits: &bits, FastPath: pp.FastPath})
	}
	return out
}

// notePending adds src, the enforce policy about to go in, with this
// run's flags, to pendingFile, synced, before the firewall takes it. A
// failure is logged, and the install goes on: a kill before the copy is
// then read as before (the copy's policy alone).
func (d *daemon) notePending(src []byte) {
	d.note(pendingPolicy{Source: string(src), TCPPorts: d.cfg.tcpPorts, NAT64: d.cfg.nat64, CTMarkBits: d.cfg.ctMarkBits, FastPath: &d.cfg.fastPath})
}

// note adds pp to pendingFile, synced, the newest.
func (d *daemon) note(pp pendingPolicy) {
	// The newest last, once: past maxPending the oldest go.
	list := slices.DeleteFunc(d.readPending(), func(p pendingPolicy) bool { return p == pp })
	list = append(list, pp)
	if len(list) > maxPending {
		list = list[len(list)-maxPending:]
	}
	b, err := json.Marshal(pendingRecord{Version: pendingVersion, Policies: list})
	if err == nil {
		if err = os.MkdirAll(d.cfg.stateDir, 0o750); err == nil {
			err = writeAtomic(filepath.Join(d.cfg.stateDir, pendingFile), append(b, '\n'))
		}
	}
	if err != nil {
		d.log.Warn("cannot note the policy going in in the state directory", audit.LogError, err.Error())
	}
}

// settled reports whether the marks carry the installed ruleset's tags
// alone (firewall.Firewall.MarksSettled).
func (d *daemon) settled() bool {
	if d.marksSettled != nil {
		return d.marksSettled()
	}
	return d.fw == nil || d.fw.MarksSettled()
}

// noteReplacedCopy adds to pendingFile the policy whose marks the copy
// in place stands for (its record's MarksPolicy, or the copy), with the
// flags recorded for it (this run's where none are), before savePolicy
// replaces it while flows still carry its tags: the next start reads
// them as its too.
func (d *daemon) noteReplacedCopy() {
	old, err := os.ReadFile(filepath.Join(d.cfg.stateDir, runningPolicyFile))
	if err != nil {
		return
	}
	pp := pendingPolicy{Source: string(old), TCPPorts: d.cfg.tcpPorts, NAT64: d.cfg.nat64, CTMarkBits: d.cfg.ctMarkBits}
	if rec := d.readFirewallRecord(old); rec != nil {
		pp.TCPPorts = rec.TCPPorts
		if rec.MarksPolicy != "" {
			pp.Source = rec.MarksPolicy
		}
		if rec.NAT64 != nil {
			pp.NAT64 = *rec.NAT64
		}
		if rec.CTMarkBits != "" {
			pp.CTMarkBits = rec.CTMarkBits
		}
		pp.FastPath = rec.FastPath
	}
	d.note(pp)
}

// donePending removes pendingFile once the copy and its record are of the
// enforce policy that went in: the marks are its (and the sweep read
// those of the policies before it).
func (d *daemon) donePending() {
	// Synced: a power cut must not bring back a note of policies the
	// firewall's marks are no longer read as.
	if err := atomicfile.Remove(filepath.Join(d.cfg.stateDir, pendingFile)); err != nil && !errors.Is(err, os.ErrNotExist) {
		d.log.Warn("cannot remove the note of the policies going in from the state directory", audit.LogError, err.Error())
	}
}
