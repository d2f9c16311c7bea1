package policy

import "time"

// How long a learned address lives. egressd's DNS forwarder gives the
// firewall every address of an allowed answer, for the rules that let the
// client resolve the name (Engine.NameRules), and the enforce firewall
// keeps it in those rules' sets for the answer's TTL, at least
// LearnedMinTTL (a client needs time to use an answer with a tiny TTL) and
// at most LearnedMaxTTL (old kernels refuse longer set timeouts; a day is
// plenty for DNS). They are here, the leaf, because audit mode must judge
// forwarded flows with the same lifetime as the firewall (capture/, fed by
// dnsfilter/), and those packages may not import the firewall.
const (
	LearnedMinTTL = 60 * time.Second
	LearnedMaxTTL = 24 * time.Hour
)

// LearnedLifetime returns how long the enforce firewall keeps an address
// learned from an answer valid for ttl: ttl, at least minTTL (LearnedMinTTL
// when minTTL <= 0), at most LearnedMaxTTL.
func LearnedLifetime(ttl, minTTL time.Duration) time.Duration {
	if minTTL <= 0 {
		minTTL = LearnedMinTTL
	}
	return min(max(ttl, minTTL), LearnedMaxTTL)
}
