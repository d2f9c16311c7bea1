package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"egressd/audit"
	"egressd/capture"
	"egressd/policy"
)

func init() {
	commands["audit"] = command{"audit --policy FILE (CAPTURE.pcap | --replay STATE_DIR_OR_EVENTS) [--json | --html OUT] [--mode audit|enforce] [--nat64-prefix PREFIX,...] [--tcp-ports all|LIST] [--gateway-addr ADDR,...] [--no-progress]",
		"classify every flow of a pcap/pcapng capture, or replay recorded events, under a policy and print the report (no root needed)", cmdAudit}
}

func cmdAudit(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := newFlags("audit", stderr)
	policyFile := fs.String("policy", "", "policy file, or profile:NAME (required)")
	asJSON := fs.Bool("json", false, "print the report as JSON")
	htmlOut := fs.String("html", "", "write the report as HTML to this file")
	mode := fs.String("mode", "", "override the policy's mode: audit or enforce")
	noProgress := fs.Bool("no-progress", false, "no progress bar, even on a terminal")
	replay := fs.String("replay", "", "replay the events of a state directory or event log under the policy instead of reading a capture")
	var nat64, tcpPorts string
	var gwAddrs listFlag
	nat64Flag(fs, &nat64)
	tcpPortsFlag(fs, &tcpPorts)
	gatewayAddrFlag(fs, &gwAddrs)
	pos, err := parseArgs(fs, args)
	if err != nil {
		return flagErr(err)
	}
	if *asJSON && *htmlOut != "" {
		fmt.Fprintln(stderr, "egressd audit: --json and --html exclude each other")
		return exitUsage
	}
	var m policy.Mode
	if *mode != "" {
		var ok bool
		if m, ok = policy.ParseMode(*mode); !ok {
			fmt.Fprintf(stderr, "egressd audit: --mode %q: expected audit or enforce\n", *mode)
			return exitUsage
		}
	}
	nat, ok := nat64Prefixes("audit", nat64, stderr)
	if !ok {
		return exitUsage
	}
	ports, ok := tcpPortsList("audit", tcpPorts, stderr)
	if !ok {
		return exitUsage
	}
	own, ok := gatewayAddrs("audit", gwAddrs, stderr)
	if !ok {
		return exitUsage
	}
	if *replay != "" && *htmlOut != "" {
		// A replay prints what would change as text or JSON; there is no
		// HTML form, and ignoring --html would leave no file and no word.
		fmt.Fprintln(stderr, "egressd audit: --replay prints text or --json; --html is for a capture's report")
		return exitUsage
	}
	if *replay != "" {
		// The recorded events were decided by the gateway that recorded
		// them, with its own --tcp-ports and addresses; a replay decides
		// names and addresses again, which neither changes. Ignoring
		// them would leave the operator believing they counted.
		var capOnly []string
		fs.Visit(func(f *flag.Flag) {
			if f.Name == "tcp-ports" || f.Name == "gateway-addr" {
				capOnly = append(capOnly, "--"+f.Name)
			}
		})
		if len(capOnly) > 0 {
			fmt.Fprintf(stderr, "egressd audit: %s: for a capture's audit; a replay's events were decided under the recording gateway's\n", strings.Join(capOnly, " and "))
			return exitUsage
		}
		if *mode != "" {
			// A replay lists what the candidate would allow and deny that
			// the recording policy did not; the mode changes neither, so
			// an accepted --mode would be a flag that does nothing.
			fmt.Fprintln(stderr, "egressd audit: --mode: for a capture's audit; a replay says what the candidate policy allows and denies, which the mode does not change")
			return exitUsage
		}
	}
	if *replay != "" && *policyFile != "" && len(pos) == 0 {
		eng, err := loadEngine(*policyFile, stderr)
		if err != nil {
			fmt.Fprintln(stderr, "egressd:", err)
			return exitFail
		}
		return runReplay(eng.WithNAT64(nat), *replay, stdout, stderr, *asJSON)
	}
	if *policyFile == "" || len(pos) != 1 || *replay != "" {
		fmt.Fprintln(stderr, "usage: egressd "+commands["audit"].usage)
		return exitUsage
	}
	eng, err := loadEngine(*policyFile, stderr)
	if err != nil {
		fmt.Fprintln(stderr, "egressd:", err)
		return exitFail
	}
	eng = eng.WithMode(m).WithNAT64(nat)
	if eng.HasMACs() {
		// egressd run's proxy and DNS forwarder read a client's MAC from
		// the LAN's neighbour table; a capture holds frames only.
		fmt.Fprintln(stderr, "note: the policy names clients by MAC: offline, a client's MAC is its frames' source address; a client behind a router carries the router's there, which egressd run's proxy and DNS forwarder never see (it has no MAC for them): its flows may be allowed here and refused there")
	}
	ledger := audit.NewLedger(eng, audit.LedgerOptions{})
	// Judged as egressd run's capture with the same --tcp-ports and the
	// gateway's addresses (OwnAddrs: none unless given; ReadFile reads
	// no interface's).
	c, err := capture.New(capture.Config{TCPPorts: ports, OwnAddrs: own}, capture.Deps{Policy: policy.NewStore(eng), Sink: ledger})
	if err != nil {
		fmt.Fprintln(stderr, "egressd:", err)
		return exitFail
	}
	defer c.Close()

	var bar *progressBar
	if !*noProgress && isTerminal(stderr) {
		bar = &progressBar{w: stderr, name: pos[0]}
	}
	var progress func(done, total int64)
	if bar != nil {
		progress = bar.update
	}
	stats, rerr := c.ReadFile(ctx, pos[0], progress)
	if bar != nil {
		bar.finish()
	}
	if rerr != nil {
		// A truncated capture (tcpdump killed mid-write) still has a
		// report for what it holds; anything else is a failure.
		if !strings.Contains(rerr.Error(), "truncated") {
			fmt.Fprintln(stderr, "egressd:", rerr)
			return exitFail
		}
		fmt.Fprintln(stderr, "egressd: warning:", rerr)
	}
	fmt.Fprintf(stderr, "capture: %d packets, %d flows (%d denied), %d malformed packets skipped, %d flows evicted\n",
		stats.Packets, stats.Flows, stats.Denied, stats.Malformed, stats.Evicted)
	if own != nil {
		fmt.Fprintf(stderr, "capture: %d flows to or from the gateway's own addresses (--gateway-addr), not reported\n", stats.Own)
	}

	rep := ledger.Report(audit.ReportOptions{})
	switch {
	case *asJSON:
		err = rep.WriteJSON(stdout)
	case *htmlOut != "":
		err = writeFileWith(*htmlOut, rep.WriteHTML)
		if err == nil {
			fmt.Fprintf(stderr, "report written to %s\n", *htmlOut)
		}
	default:
		err = rep.WriteText(stdout)
	}
	if err != nil {
		fmt.Fprintln(stderr, "egressd:", err)
		return exitFail
	}
	return exitOK
}

func writeFileWith(path string, write func(io.Writer) error) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := write(f); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// isTerminal reports whether w is a terminal.
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}

// progressBar draws "name [#####.....] 45% 12.3/27.0 MB" on one terminal
// line, at most ten times a second, for files big enough to wait for.
type progressBar struct {
	w     io.Writer
	name  string
	last  time.Time
	shown bool
}

const progressMinSize = 8 << 20

func (b *progressBar) update(done, total int64) {
	if total < progressMinSize || time.Since(b.last) < 100*time.Millisecond {
		return
	}
	b.last = time.Now()
	b.shown = true
	const width = 30
	frac := float64(done) / float64(total)
	frac = min(max(frac, 0), 1)
	n := int(frac * width)
	fmt.Fprintf(b.w, "\r%s [%s%s] %3.0f%% %.1f/%.1f MB", b.name, strings.Repeat("#", n), strings.Repeat(".", width-n),
		frac*100, float64(done)/1e6, float64(total)/1e6)
}

func (b *progressBar) finish() {
	if b.shown {
		fmt.Fprint(b.w, "\r\033[K")
	}
}
