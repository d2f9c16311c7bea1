package audit

import "log/slog"

// Attribute keys for slog lines, shared by every component so that one
// canonical line per decision reads the same everywhere.
const (
	LogComponent  = "component"
	LogKind       = "kind" // flow, request or dns, as Event.Kind
	LogClient     = "client"
	LogClientMAC  = "client_mac"
	LogClientPort = "client_port" // a firewall cut's line: conntrack names the flow by it
	LogDest       = "dest"
	LogDestPort   = "dest_port"
	LogProto      = "proto"
	LogName       = "name"
	LogNameLen    = "name_len" // as Event.NameLen: the length of a cut name
	LogNameSource = "name_source"
	LogPath       = "path"
	LogPathLen    = "path_len" // as Event.PathLen
	LogFront      = "front"    // as Event.Front
	LogFrontLen   = "front_len"
	LogVerdict    = "verdict"
	LogRule       = "rule_id"
	LogMode       = "mode"
	LogReason     = "reason"
	LogEnforced   = "enforced"
	LogBytesOut   = "bytes_out"
	LogBytesIn    = "bytes_in"
	LogDuration   = "duration_seconds"
	LogClose      = "close"
	LogQType      = "qtype"
	LogRCode      = "rcode"
	LogCacheHit   = "cache_hit"
	LogUpstream   = "upstream"
	LogLatency    = "latency_seconds"
	LogFiltered   = "filtered" // as Event.Filtered
	LogError      = "error"
	// LogPrevRule is the rule a flow ran under before a policy reload
	// (or a rule's expiry) cut it: the firewall's line of the cut.
	LogPrevRule = "prev_rule_id"

	// CanonicalMessage is the message of the one line per decision.
	CanonicalMessage = "decision"
)

// FlowAttrsMax is the most attributes AppendFlowAttrs appends.
const FlowAttrsMax = 22

// AppendFlowAttrs appends the attributes of the canonical line of a flow
// event to attrs, with the keys above, so that the proxy's and capture's
// lines read alike. Callers append what only they know (the listener, an
// error: ErrorText); with an array of their own as attrs (FlowAttrsMax and
// room for theirs), the line allocates no slice. The client's text is
// bounded as Bound bounds it in the journal (e is not changed): the line
// and the event log show the same value.
func (e *Event) AppendFlowAttrs(attrs []slog.Attr) []slog.Attr {
	if e.needsBound() {
		b := *e
		b.Bound()
		e = &b
	}
	attrs = append(attrs, slog.String(LogKind, string(e.Kind)), slog.String(LogClient, e.Client.String()))
	if e.ClientMAC != "" {
		attrs = append(attrs, slog.String(LogClientMAC, e.ClientMAC))
	}
	dest := ""
	if e.Dest.IsValid() { // no address: a name that did not resolve
		dest = e.Dest.String()
	}
	attrs = append(attrs,
		slog.String(LogDest, dest),
		slog.Int(LogDestPort, int(e.DestPort)),
		slog.String(LogProto, e.Proto),
		slog.String(LogName, e.Name),
	)
	if e.NameLen != 0 {
		attrs = append(attrs, slog.Int(LogNameLen, e.NameLen))
	}
	attrs = append(attrs, slog.String(LogNameSource, string(e.NameSource)))
	if e.Path != "" {
		attrs = append(attrs, slog.String(LogPath, e.Path))
	}
	if e.PathLen != 0 {
		attrs = append(attrs, slog.Int(LogPathLen, e.PathLen))
	}
	if e.Front != "" {
		attrs = append(attrs, slog.String(LogFront, e.Front))
	}
	if e.FrontLen != 0 {
		attrs = append(attrs, slog.Int(LogFrontLen, e.FrontLen))
	}
	return append(attrs,
		slog.String(LogVerdict, string(e.Verdict)),
		slog.String(LogRule, e.Rule),
		slog.String(LogMode, string(e.Mode)),
		slog.String(LogReason, e.Reason),
		slog.Bool(LogEnforced, e.Enforced),
		slog.Uint64(LogBytesOut, e.BytesOut),
		slog.Uint64(LogBytesIn, e.BytesIn),
		slog.Float64(LogDuration, e.Duration),
		slog.String(LogClose, e.Close),
	)
}

// ErrorText is err's text for a log line, cut to MaxErrorBytes (Clip): an
// error may quote what a client sent (a server name, a request line).
func ErrorText(err error) string {
	return Clip(err.Error(), MaxErrorBytes)
}
