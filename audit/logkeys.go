package audit

// Attribute keys for slog lines, shared by every component so that one
// canonical line per decision reads the same everywhere.
const (
	LogComponent  = "component"
	LogClient     = "client"
	LogClientMAC  = "client_mac"
	LogDest       = "dest"
	LogDestPort   = "dest_port"
	LogProto      = "proto"
	LogName       = "name"
	LogNameSource = "name_source"
	LogPath       = "path"
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
	LogError      = "error"

	// CanonicalMessage is the message of the one line per decision.
	CanonicalMessage = "decision"
)
