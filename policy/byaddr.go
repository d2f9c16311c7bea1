package policy

// DecideLearned finishes the decision of a flow that shows no name of its
// own (no SNI, no Host) once its address alone did not allow it: d is
// Decide(in) with in.Name empty, which the caller made first, as the
// transparent proxy does (a CIDR rule that allows the address decides
// before any name). names are the names egressd's DNS gave the address out
// for, best first. The first that a rule allows decides, and its index is
// returned. When none does, d stands, except that the first name's
// decision replaces it where it says path-unseen (why that name's
// host/path rule does not allow the flow), or where d says only no-rule
// and the name's says more (its rule lacks the port or the client, or
// has expired: what policy explain says of the name), and the index is
// 0: the first name is still the best one known, for the record. With no names the
// index is -1. The proxy and capture both decide so, so that audit mode
// reports what enforce mode does.
func (e *Engine) DecideLearned(in Input, d Decision, names []string) (Decision, int) {
	if d.Allowed() || len(names) == 0 {
		return d, -1
	}
	for i, n := range names {
		in.Name = n
		dd := e.Decide(in)
		if dd.Allowed() {
			return dd, i
		}
		if i == 0 && (dd.Reason == ReasonPathUnseen || d.Reason == ReasonNoRule && dd.Reason != ReasonNoRule) {
			d = dd
		}
	}
	return d, 0
}
