package policy

import (
	"slices"
	"time"
)

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

// LearnedNames returns the name patterns of r's targets (names, and the
// hosts of host/path targets), sorted, without duplicates: the names
// whose answers feed r's learned sets in the enforce firewall.
func LearnedNames(r Rule) []string {
	var names []string
	for _, t := range r.To {
		if t.Kind == TargetName || t.Kind == TargetHostPath {
			names = append(names, t.Pattern)
		}
	}
	slices.Sort(names)
	return slices.Compact(names)
}

// KeepsLearned reports whether a rule whose LearnedNames are now still
// counts for a connection that the rule of the same name, whose
// LearnedNames were was, let out by a learned address: was has names,
// and now holds every one of them. The firewall's sweep keeps such a
// connection at a reload (firewall/sweep.go, admits) however long ago
// its answer expired; capture predicts that sweep in audit mode
// (capture/reload.go, keptByMark) with this same test. A rule that drops
// one of its names is changed: its connections are judged again as
// first packets.
func KeepsLearned(was, now []string) bool {
	return len(was) > 0 && NamesSubset(was, now)
}

// NamesSubset reports whether every element of the sorted a is in the
// sorted b.
func NamesSubset(a, b []string) bool {
	for _, s := range a {
		if _, ok := slices.BinarySearch(b, s); !ok {
			return false
		}
	}
	return true
}
