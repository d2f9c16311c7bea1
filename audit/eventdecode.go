package audit

import (
	"encoding/json"
	"math"
	"net/netip"
	"strconv"
	"unicode/utf8"

	"egressd/policy"
)

// decodeEvent decodes one line of the event log into ev as
// json.Unmarshal(b, ev) does, into a zero ev, and says whether it went
// well (json.Unmarshal's nil error). Reading the log at a start is most of
// a restart's time and encoding/json's reflection most of the reading
// (BenchmarkReadRotated); decodeFast does the lines appendJSON writes
// without it and leaves anything else to encoding/json.
func decodeEvent(b []byte, ev *Event) bool {
	if decodeFast(b, ev) {
		return true
	}
	*ev = Event{}
	return json.Unmarshal(b, ev) == nil
}

// decodeFast decodes b into the zero ev when b is of the form appendJSON
// writes: one object, no whitespace, each key once and spelt as Event's
// tag, strings without escapes or control characters and in valid UTF-8,
// integers in decimal without sign or fraction that fit their field,
// and no null. For such a line it sets ev exactly as json.Unmarshal does
// (time.Time and netip.Addr through their own unmarshal methods, floats
// through strconv.ParseFloat, as encoding/json does), and json.Unmarshal
// accepts the line. Anything else (false; ev is then partly set) is left
// to encoding/json: a false is never a wrong answer, only a slow one.
// TestDecodeFastMatchesJSON and FuzzDecodeEvent hold it to encoding/json.
func decodeFast(b []byte, ev *Event) bool {
	if len(b) < 2 || b[0] != '{' {
		return false
	}
	i := 1
	if b[i] == '}' {
		return i+1 == len(b)
	}
	var seen uint64
	for {
		key, j, ok := rawString(b, i)
		if !ok || j >= len(b) || b[j] != ':' {
			return false
		}
		i = j + 1
		var bit uint
		switch string(key) {
		case "kind":
			var s string
			s, i, ok = stringValue(b, i)
			ev.Kind, bit = Kind(s), 0
		case "source":
			var s string
			s, i, ok = stringValue(b, i)
			ev.Source, bit = Source(s), 1
		case "time":
			i, ok = timeValue(b, i, ev, false)
			bit = 2
		case "client":
			i, ok = addrValue(b, i, &ev.Client)
			bit = 3
		case "client_port":
			var n uint64
			n, i, ok = uintValue(b, i, math.MaxUint16)
			ev.ClientPort, bit = uint16(n), 4
		case "client_mac":
			ev.ClientMAC, i, ok = stringValue(b, i)
			bit = 5
		case "dest_ip":
			i, ok = addrValue(b, i, &ev.Dest)
			bit = 6
		case "dest_port":
			var n uint64
			n, i, ok = uintValue(b, i, math.MaxUint16)
			ev.DestPort, bit = uint16(n), 7
		case "proto":
			ev.Proto, i, ok = stringValue(b, i)
			bit = 8
		case "name":
			ev.Name, i, ok = stringValue(b, i)
			bit = 9
		case "name_len":
			var n uint64
			n, i, ok = uintValue(b, i, math.MaxInt)
			ev.NameLen, bit = int(n), 10
		case "name_source":
			var s string
			s, i, ok = stringValue(b, i)
			ev.NameSource, bit = NameSource(s), 11
		case "path":
			ev.Path, i, ok = stringValue(b, i)
			bit = 12
		case "path_len":
			var n uint64
			n, i, ok = uintValue(b, i, math.MaxInt)
			ev.PathLen, bit = int(n), 13
		case "no_path":
			ev.NoPath, i, ok = boolValue(b, i)
			bit = 14
		case "front":
			ev.Front, i, ok = stringValue(b, i)
			bit = 15
		case "front_len":
			var n uint64
			n, i, ok = uintValue(b, i, math.MaxInt)
			ev.FrontLen, bit = int(n), 16
		case "verdict":
			var s string
			s, i, ok = stringValue(b, i)
			ev.Verdict, bit = policy.Verdict(s), 17
		case "rule":
			ev.Rule, i, ok = stringValue(b, i)
			bit = 18
		case "mode":
			var s string
			s, i, ok = stringValue(b, i)
			ev.Mode, bit = policy.Mode(s), 19
		case "reason":
			ev.Reason, i, ok = stringValue(b, i)
			bit = 20
		case "enforced":
			ev.Enforced, i, ok = boolValue(b, i)
			bit = 21
		case "bytes_out":
			ev.BytesOut, i, ok = uintValue(b, i, math.MaxUint64)
			bit = 22
		case "bytes_in":
			ev.BytesIn, i, ok = uintValue(b, i, math.MaxUint64)
			bit = 23
		case "duration_seconds":
			ev.Duration, i, ok = floatValue(b, i)
			bit = 24
		case "close":
			ev.Close, i, ok = stringValue(b, i)
			bit = 25
		case "qtype":
			ev.QType, i, ok = stringValue(b, i)
			bit = 26
		case "query_id":
			var n uint64
			n, i, ok = uintValue(b, i, math.MaxUint16)
			ev.QueryID, bit = uint16(n), 27
		case "rcode":
			ev.RCode, i, ok = stringValue(b, i)
			bit = 28
		case "cache_hit":
			ev.CacheHit, i, ok = boolValue(b, i)
			bit = 29
		case "upstream":
			ev.Upstream, i, ok = stringValue(b, i)
			bit = 30
		case "latency_seconds":
			ev.Latency, i, ok = floatValue(b, i)
			bit = 31
		case "filtered":
			ev.Filtered, i, ok = stringValue(b, i)
			bit = 32
		case "count":
			ev.Count, i, ok = uintValue(b, i, math.MaxUint64)
			bit = 33
		case "until":
			i, ok = timeValue(b, i, ev, true)
			bit = 34
		case "duplicates":
			ev.Duplicates, i, ok = uintValue(b, i, math.MaxUint64)
			bit = 35
		case "top_clients":
			ev.TopClients, i, ok = stringsValue(b, i)
			bit = 36
		case "other_names":
			ev.OtherNames, i, ok = stringsValue(b, i)
			bit = 37
		case "learned_name":
			ev.LearnedName, i, ok = stringValue(b, i)
			bit = 38
		case "revised":
			ev.Revised, i, ok = boolValue(b, i)
			bit = 39
		default: // another spelling (encoding/json folds case), or unknown
			return false
		}
		if !ok || seen&(1<<bit) != 0 || i >= len(b) {
			return false
		}
		seen |= 1 << bit
		switch b[i] {
		case ',':
			i++
		case '}':
			return i+1 == len(b)
		default:
			return false
		}
	}
}

// rawString returns the bytes of the string at b[i] between its quotes
// and the index after it: false for a string with an escape or a control
// character, or not in valid UTF-8 (which encoding/json would change).
func rawString(b []byte, i int) ([]byte, int, bool) {
	if i >= len(b) || b[i] != '"' {
		return nil, i, false
	}
	ascii := true
	for j := i + 1; j < len(b); j++ {
		switch c := b[j]; {
		case c == '"':
			s := b[i+1 : j]
			if !ascii && !utf8.Valid(s) {
				return nil, j, false
			}
			return s, j + 1, true
		case c == '\\' || c < 0x20:
			return nil, j, false
		case c >= utf8.RuneSelf:
			ascii = false
		}
	}
	return nil, len(b), false
}

// stringsValue reads an array of strings, as rawString takes them, with
// no whitespace: [] is an empty slice, not nil, as encoding/json has it.
func stringsValue(b []byte, i int) ([]string, int, bool) {
	if i >= len(b) || b[i] != '[' {
		return nil, i, false
	}
	i++
	out := []string{}
	if i < len(b) && b[i] == ']' {
		return out, i + 1, true
	}
	for {
		s, j, ok := rawString(b, i)
		if !ok || j >= len(b) {
			return nil, j, false
		}
		out = append(out, string(s))
		switch b[j] {
		case ',':
			i = j + 1
		case ']':
			return out, j + 1, true
		default:
			return nil, j, false
		}
	}
}

func stringValue(b []byte, i int) (string, int, bool) {
	s, j, ok := rawString(b, i)
	if !ok {
		return "", j, false
	}
	return intern(s), j, true
}

// intern returns the few values most lines repeat without a new string
// each.
func intern(s []byte) string {
	switch string(s) {
	case "flow":
		return "flow"
	case "dns":
		return "dns"
	case "request":
		return "request"
	case "proxy":
		return "proxy"
	case "dnsfilter":
		return "dnsfilter"
	case "capture":
		return "capture"
	case "tcp":
		return "tcp"
	case "udp":
		return "udp"
	case "sni":
		return "sni"
	case "host":
		return "host"
	case "A":
		return "A"
	case "AAAA":
		return "AAAA"
	case "NOERROR":
		return "NOERROR"
	case "NXDOMAIN":
		return "NXDOMAIN"
	}
	return string(s)
}

func timeValue(b []byte, i int, ev *Event, until bool) (int, bool) {
	_, j, ok := rawString(b, i)
	if !ok {
		return j, false
	}
	t := &ev.Time
	if until {
		t = &ev.Until
	}
	// encoding/json hands time.Time the literal, quotes and all.
	return j, t.UnmarshalJSON(b[i:j]) == nil
}

func addrValue(b []byte, i int, a *netip.Addr) (int, bool) {
	s, j, ok := rawString(b, i)
	if !ok {
		return j, false
	}
	// encoding/json hands a TextUnmarshaler the unquoted string.
	return j, a.UnmarshalText(s) == nil
}

// uintValue reads a decimal integer of at most max: no sign, no leading
// zero, no fraction or exponent (the caller then finds no ',' or '}').
func uintValue(b []byte, i int, max uint64) (uint64, int, bool) {
	start := i
	var n uint64
	for ; i < len(b) && b[i] >= '0' && b[i] <= '9'; i++ {
		d := uint64(b[i] - '0')
		if n > (max-d)/10 {
			return 0, i, false
		}
		n = n*10 + d
	}
	if i == start || (b[start] == '0' && i-start > 1) {
		return 0, i, false
	}
	return n, i, true
}

// floatValue reads a JSON number and converts it as encoding/json does.
func floatValue(b []byte, i int) (float64, int, bool) {
	start := i
	if i < len(b) && b[i] == '-' {
		i++
	}
	digits := func() bool {
		d := i
		for i < len(b) && b[i] >= '0' && b[i] <= '9' {
			i++
		}
		return i > d
	}
	first := i
	if !digits() || (b[first] == '0' && i-first > 1) {
		return 0, i, false
	}
	if i < len(b) && b[i] == '.' {
		i++
		if !digits() {
			return 0, i, false
		}
	}
	if i < len(b) && (b[i] == 'e' || b[i] == 'E') {
		i++
		if i < len(b) && (b[i] == '+' || b[i] == '-') {
			i++
		}
		if !digits() {
			return 0, i, false
		}
	}
	f, err := strconv.ParseFloat(string(b[start:i]), 64)
	return f, i, err == nil
}

func boolValue(b []byte, i int) (bool, int, bool) {
	switch {
	case len(b)-i >= 4 && string(b[i:i+4]) == "true":
		return true, i + 4, true
	case len(b)-i >= 5 && string(b[i:i+5]) == "false":
		return false, i + 5, true
	}
	return false, i, false
}
