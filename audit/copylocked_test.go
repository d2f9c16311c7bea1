package audit

import (
	"net/netip"
	"reflect"
	"testing"
	"time"
	"unsafe"

	"egressd/policy"
)

// ledgerCopied are the Ledger fields copyLocked copies into the live
// report's overlay (snapshotOpen); ledgerLeftOut those it leaves out, and
// why. TestCopyLockedCoversLedger fails for a field in neither: a field
// added to Ledger and not copied would make the live report with open
// flows miss what it counts, or share (and race on) what the ledger
// changes.
var (
	ledgerCopied = []string{"opt", "eng", "seed", "rules", "dropped", "totals", "lastMode",
		"shed", "unwritten", "shedMarks", "firstEvent", "ech", "alarms", "alarmsDropped"}
	ledgerLeftOut = map[string]string{
		"mu":        "the overlay has its own lock",
		"reporting": "a report takes the ledger's turn to build, never the overlay's",
		"windows":   "a window's report takes the ledger's turn to read, never the overlay's",
		"flows":     "no flow records: the overlay's table holds only the open flows counted on it",
		"ring":      "no flow records: snapshotOpen counts the open flows from the overlay's ring",
		"ringPos":   "no flow records",
		"history":   "Report reads a window from the ledger's history, never the overlay's",
		"metrics":   "open flows are no events: the live metrics must not count them",
		"arch":      "Report reads the summary's coverage from the ledger after the snapshot",
		"archNote":  "Report reads it from the ledger",
		"holding":   "set only within emitHold's hold of the lock, false at the copy",
		"holdGen":   "read only while holding is set",
		"moved":     "read only within emitHold's hold of the lock, which clears it first: between calls it means nothing",
		"open":      "Report reads it from the ledger before the copy",
		"loadWait":  "Report reads it from the ledger before the copy",
	}
)

// ledgerField returns l's (unexported) field name, readable.
func ledgerField(l *Ledger, name string) reflect.Value {
	f := reflect.ValueOf(l).Elem().FieldByName(name)
	return reflect.NewAt(f.Type(), unsafe.Pointer(f.UnsafeAddr())).Elem()
}

// sameValue is reflect.DeepEqual but for an empty slice or map, equal to
// a nil one, and funcs, equal when they are the same.
func sameValue(a, b reflect.Value) bool {
	if a.Type() != b.Type() {
		return false
	}
	switch a.Kind() {
	case reflect.Func:
		return a.Pointer() == b.Pointer()
	case reflect.Pointer:
		if a.IsNil() || b.IsNil() {
			return a.IsNil() == b.IsNil()
		}
		return a.Pointer() == b.Pointer() || sameValue(a.Elem(), b.Elem())
	case reflect.Slice, reflect.Array:
		if a.Len() != b.Len() {
			return false
		}
		for i := range a.Len() {
			if !sameValue(a.Index(i), b.Index(i)) {
				return false
			}
		}
		return true
	case reflect.Map:
		if a.Len() != b.Len() {
			return false
		}
		for _, k := range a.MapKeys() {
			bv := b.MapIndex(k)
			if !bv.IsValid() || !sameValue(a.MapIndex(k), bv) {
				return false
			}
		}
		return true
	case reflect.Struct:
		for i := range a.NumField() {
			if a.Type() == reflect.TypeFor[clientSet]() && (a.Type().Field(i).Name == "lent" || a.Type().Field(i).Name == "borrowed") {
				continue // which side lent the map, not what it holds
			}
			if !sameValue(a.Field(i), b.Field(i)) {
				return false
			}
		}
		return true
	case reflect.Interface:
		if a.IsNil() || b.IsNil() {
			return a.IsNil() == b.IsNil()
		}
		return sameValue(a.Elem(), b.Elem())
	case reflect.Bool:
		return a.Bool() == b.Bool()
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		return a.Int() == b.Int()
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64, reflect.Uintptr:
		return a.Uint() == b.Uint()
	case reflect.Float32, reflect.Float64:
		return a.Float() == b.Float()
	case reflect.String:
		return a.String() == b.String()
	}
	panic("sameValue: kind " + a.Kind().String())
}

// TestCopyLockedCoversLedger: every Ledger field is either copied by
// copyLocked or listed as deliberately left out; each copied field
// equals the ledger's, and the copy's report does not change when the
// ledger counts more (it shares nothing the ledger changes).
func TestCopyLockedCoversLedger(t *testing.T) {
	known := map[string]bool{}
	for _, n := range ledgerCopied {
		known[n] = true
	}
	for n := range ledgerLeftOut {
		if known[n] {
			t.Errorf("Ledger.%s is listed both as copied and as left out", n)
		}
		known[n] = true
	}
	typ := reflect.TypeFor[Ledger]()
	fields := map[string]bool{}
	for i := range typ.NumField() {
		n := typ.Field(i).Name
		fields[n] = true
		if !known[n] {
			t.Errorf("Ledger.%s is neither copied by copyLocked nor listed in ledgerLeftOut: copy it (and clone what it references) or say why the live report's overlay leaves it out", n)
		}
	}
	for n := range known {
		if !fields[n] {
			t.Errorf("ledgerCopied/ledgerLeftOut name Ledger.%s, which is no field", n)
		}
	}

	// A ledger whose copied fields are all set.
	eng := loadPolicy(t, "policy.yaml")
	l := NewLedger(eng, LedgerOptions{})
	for _, ev := range fixtureEvents(t, eng) {
		l.Emit(ev)
	}
	ech := fev{kind: KindDNS, src: SourceDNS, at: 20 * time.Minute, client: "192.168.10.5", cport: 5000, dest: "192.168.10.1", dport: 53,
		proto: "udp", name: "ech.example.com", qtype: "HTTPS"}.event(eng)
	ech.Filtered = "ech"
	l.Emit(ech)
	l.addShed(t0.Add(21*time.Minute), 3)
	l.addUnwritten(2)
	l.Emit(Event{Kind: KindAlarm, Source: SourceDNS, Time: t0.Add(22 * time.Minute), Client: netip.MustParseAddr("192.168.10.5"),
		Name: "t.example.com", Count: 501, Verdict: policy.Allow, Mode: policy.ModeAudit, Reason: "dns-tunnel"})
	l.mu.Lock()
	l.alarmsDropped = 1
	c := l.copyLocked()
	l.mu.Unlock()
	for _, n := range ledgerCopied {
		lv, cv := ledgerField(l, n), ledgerField(c, n)
		if n != "opt" && lv.IsZero() {
			t.Errorf("test setup: Ledger.%s is zero: set it so the copy is checked", n)
		}
		if !sameValue(lv, cv) {
			t.Errorf("copyLocked: %s differs from the ledger's", n)
		}
	}
	now := reportNow
	before := c.snapshot(ReportOptions{Now: now})
	// The ledger counts more of every kind; the copy's report stays.
	for _, ev := range fixtureEvents(t, eng) {
		ev.Time = ev.Time.Add(time.Hour)
		ev.ClientPort++
		ev.ClientMAC = "02:00:00:00:99:99"
		l.Emit(ev)
	}
	ech.Time, ech.QueryID, ech.ClientMAC = ech.Time.Add(time.Hour), 7, "02:00:00:00:99:98"
	l.Emit(ech)
	l.addShed(t0.Add(90*time.Minute), 5)
	after := c.snapshot(ReportOptions{Now: now})
	if !reflect.DeepEqual(before, after) {
		t.Errorf("the copy's report changed when the ledger counted more: it shares state with the ledger")
	}
}
