package main

import (
	"fmt"
	"io"
	"time"

	"egressd/audit"
	"egressd/policy"
)

// runReplay runs the flows and queries recorded at path (a state directory
// or an events file) against the candidate policy eng and prints what
// would change: newly dropped, newly allowed, allowed by another rule.
// `egressd audit --policy NEW.yaml --replay PATH` calls it.
func runReplay(eng *policy.Engine, path string, stdout, stderr io.Writer, asJSON bool) int {
	r := audit.NewReplayer(eng, time.Now())
	st, err := audit.ReplayPath(path, r)
	if err != nil {
		fmt.Fprintln(stderr, "egressd replay:", err)
		return exitFail
	}
	if st.Skipped > 0 || st.Torn {
		fmt.Fprintf(stderr, "warning: %s: %d lines were not events, torn last line: %v\n", path, st.Skipped, st.Torn)
	}
	if st.Damaged > 0 {
		fmt.Fprintf(stderr, "warning: %s: %d compressed event log files are damaged: the events past the damage are not replayed\n", path, st.Damaged)
	}
	if st.Events == 0 {
		fmt.Fprintf(stderr, "warning: %s holds no recorded events\n", path)
	}
	if st.Summarized > 0 {
		fmt.Fprintf(stderr, "warning: %s: %d events of %d event log files rotated out are only in the summary of counts and cannot be replayed: flows before the oldest kept file are not judged\n", path, st.Summarized, st.SummarizedFiles)
	}
	res := r.Result()
	if res.NoMAC > 0 {
		fmt.Fprintf(stderr, "warning: %s: %d recorded flows, requests or queries carry no client MAC (the proxy and the DNS forwarder record one only while the running policy names MAC addresses; a client behind a router has none): the candidate's MAC rules matched none of them, though in enforce mode they may\n", path, res.NoMAC)
	}
	if asJSON {
		err = res.WriteJSON(stdout)
	} else {
		err = res.WriteText(stdout)
	}
	if err != nil {
		fmt.Fprintln(stderr, "egressd replay:", err)
		return exitFail
	}
	return exitOK
}
