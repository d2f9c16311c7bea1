package audit

import (
	"errors"
	"math"
	"net/netip"
	"strconv"
	"time"

	"egressd/internal/jsonenc"
)

// appendJSON appends ev as one line of the journal: the bytes that
// json.NewEncoder(w).Encode(ev) writes, newline included, without the
// reflection (BenchmarkJournalWrite: 4.1-4.6 µs per event with
// encoding/json, 2.1-2.3 µs with this). The differential test and fuzz
// target hold it to encoding/json's output for every field; a new field of
// Event must be added here too (TestAppendJSONCoversEvent fails until it
// is). The readers decode with decodeFast (eventdecode.go), which must
// learn a new field too (it leaves a line with an unknown key to
// encoding/json, correct but slow).
func (ev *Event) appendJSON(b []byte) ([]byte, error) {
	b = append(b, `{"kind":`...)
	b = jsonenc.AppendStringHTML(b, string(ev.Kind))
	b = append(b, `,"source":`...)
	b = jsonenc.AppendStringHTML(b, string(ev.Source))
	b = append(b, `,"time":`...)
	if y := ev.Time.Year(); y < 0 || y >= 10000 {
		return b, errEventTime
	}
	if _, off := ev.Time.Zone(); off <= -24*3600 || off >= 24*3600 {
		return b, errEventTime
	}
	b = append(b, '"')
	b = ev.Time.AppendFormat(b, time.RFC3339Nano)
	b = append(b, '"')
	b = append(b, `,"client":`...)
	b = appendAddr(b, ev.Client)
	if ev.ClientPort != 0 {
		b = append(b, `,"client_port":`...)
		b = strconv.AppendUint(b, uint64(ev.ClientPort), 10)
	}
	b = appendStringField(b, `,"client_mac":`, ev.ClientMAC)
	if ev.Dest.IsValid() {
		b = append(b, `,"dest_ip":`...)
		b = appendAddr(b, ev.Dest)
	}
	if ev.DestPort != 0 {
		b = append(b, `,"dest_port":`...)
		b = strconv.AppendUint(b, uint64(ev.DestPort), 10)
	}
	b = append(b, `,"proto":`...)
	b = jsonenc.AppendStringHTML(b, ev.Proto)
	b = appendStringField(b, `,"name":`, ev.Name)
	b = appendIntField(b, `,"name_len":`, ev.NameLen)
	b = appendStringField(b, `,"name_source":`, string(ev.NameSource))
	b = appendStringField(b, `,"path":`, ev.Path)
	b = appendIntField(b, `,"path_len":`, ev.PathLen)
	if ev.NoPath {
		b = append(b, `,"no_path":true`...)
	}
	b = appendStringField(b, `,"front":`, ev.Front)
	b = appendIntField(b, `,"front_len":`, ev.FrontLen)
	b = append(b, `,"verdict":`...)
	b = jsonenc.AppendStringHTML(b, string(ev.Verdict))
	b = appendStringField(b, `,"rule":`, ev.Rule)
	b = append(b, `,"mode":`...)
	b = jsonenc.AppendStringHTML(b, string(ev.Mode))
	b = appendStringField(b, `,"reason":`, ev.Reason)
	if ev.Enforced {
		b = append(b, `,"enforced":true`...)
	}
	if ev.BytesOut != 0 {
		b = append(b, `,"bytes_out":`...)
		b = strconv.AppendUint(b, ev.BytesOut, 10)
	}
	if ev.BytesIn != 0 {
		b = append(b, `,"bytes_in":`...)
		b = strconv.AppendUint(b, ev.BytesIn, 10)
	}
	var err error
	if b, err = appendFloatField(b, `,"duration_seconds":`, ev.Duration); err != nil {
		return b, err
	}
	b = appendStringField(b, `,"close":`, ev.Close)
	if ev.Revised {
		b = append(b, `,"revised":true`...)
	}
	b = appendStringField(b, `,"qtype":`, ev.QType)
	if ev.QueryID != 0 {
		b = append(b, `,"query_id":`...)
		b = strconv.AppendUint(b, uint64(ev.QueryID), 10)
	}
	b = appendStringField(b, `,"rcode":`, ev.RCode)
	if ev.CacheHit {
		b = append(b, `,"cache_hit":true`...)
	}
	b = appendStringField(b, `,"upstream":`, ev.Upstream)
	if b, err = appendFloatField(b, `,"latency_seconds":`, ev.Latency); err != nil {
		return b, err
	}
	b = appendStringField(b, `,"filtered":`, ev.Filtered)
	if ev.Count != 0 {
		b = append(b, `,"count":`...)
		b = strconv.AppendUint(b, ev.Count, 10)
	}
	if !ev.Until.IsZero() {
		if y := ev.Until.Year(); y < 0 || y >= 10000 {
			return b, errEventTime
		}
		if _, off := ev.Until.Zone(); off <= -24*3600 || off >= 24*3600 {
			return b, errEventTime
		}
		b = append(b, `,"until":"`...)
		b = ev.Until.AppendFormat(b, time.RFC3339Nano)
		b = append(b, '"')
	}
	if ev.Duplicates != 0 {
		b = append(b, `,"duplicates":`...)
		b = strconv.AppendUint(b, ev.Duplicates, 10)
	}
	b = appendStringsField(b, `,"top_clients":[`, ev.TopClients)
	b = appendStringsField(b, `,"other_names":[`, ev.OtherNames)
	b = appendStringField(b, `,"learned_name":`, ev.LearnedName)
	return append(b, "}\n"...), nil
}

var (
	errEventTime  = errors.New("audit: event time outside the years 0 to 9999 or its zone offset a day or more")
	errEventFloat = errors.New("audit: event holds NaN or an infinity")
)

// appendAddr appends a as a JSON string of its MarshalText form (empty for
// the zero Addr). Without a zone the text is digits, hex, dots and colons,
// which need no escaping; a zone may hold anything, so it is escaped.
func appendAddr(b []byte, a netip.Addr) []byte {
	switch {
	case !a.IsValid():
		return append(b, `""`...)
	case a.Zone() != "":
		return jsonenc.AppendStringHTML(b, a.String())
	}
	b = append(b, '"')
	b = a.AppendTo(b)
	return append(b, '"')
}

// appendStringField appends key and s unless s is empty (omitempty).
func appendStringField(b []byte, key, s string) []byte {
	if s == "" {
		return b
	}
	return jsonenc.AppendStringHTML(append(b, key...), s)
}

// appendIntField appends key and n unless n is 0 (omitempty).
func appendIntField(b []byte, key string, n int) []byte {
	if n == 0 {
		return b
	}
	return strconv.AppendInt(append(b, key...), int64(n), 10)
}

// appendFloatField appends key and f unless f is 0 (omitempty), in
// encoding/json's format.
func appendFloatField(b []byte, key string, f float64) ([]byte, error) {
	if f == 0 {
		return b, nil
	}
	if math.IsNaN(f) || math.IsInf(f, 0) {
		return b, errEventFloat
	}
	return jsonenc.AppendFloat(append(b, key...), f), nil
}

// appendStringsField appends key (which ends in its array's opening
// bracket) and list, as encoding/json writes a []string with omitempty:
// nothing for an empty list.
func appendStringsField(b []byte, key string, list []string) []byte {
	if len(list) == 0 {
		return b
	}
	b = append(b, key...)
	for i, c := range list {
		if i > 0 {
			b = append(b, ',')
		}
		b = jsonenc.AppendStringHTML(b, c)
	}
	return append(b, ']')
}
