package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"

	"egressd/admin"
	"egressd/audit"
	"egressd/policy"
)

// defaultStateDir is where `egressd run` keeps its event log by default.
const defaultStateDir = "/var/lib/egressd"

func init() {
	commands["report"] = command{"report [--json | --html OUT] [--state-dir DIR] [--admin ADDR] [--since DUR] [--suggest] [--policy FILE]",
		"the rule-usage report, from the running daemon or else the state directory", cmdReport}
}

func cmdReport(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := newFlags("report", stderr)
	asJSON := fs.Bool("json", false, "print the report as JSON")
	htmlOut := fs.String("html", "", "write the report as one self-contained HTML page to this file")
	stateDir := fs.String("state-dir", defaultStateDir, "the daemon's state directory, read when the daemon is not running")
	adminAddr := fs.String("admin", admin.DefaultAddr, "the running daemon's admin address")
	since := fs.String("since", "", "only events since this long ago (24h, 7d) or this RFC 3339 time")
	suggest := fs.Bool("suggest", false, "print a YAML snippet of rules that would allow what was dropped")
	policyFile := fs.String("policy", "", "policy file (or profile:NAME) for unused and expired rules when reading the state directory")
	pos, err := parseArgs(fs, args)
	if err != nil {
		return flagErr(err)
	}
	if len(pos) != 0 {
		fmt.Fprintln(stderr, "usage: egressd "+commands["report"].usage)
		return exitUsage
	}
	outputs := 0
	for _, b := range []bool{*asJSON, *htmlOut != "", *suggest} {
		if b {
			outputs++
		}
	}
	if outputs > 1 {
		fmt.Fprintln(stderr, "egressd report: --json, --html and --suggest exclude each other")
		return exitUsage
	}
	sinceT, err := admin.ParseSince(*since, time.Now())
	if err != nil {
		// The admin package's message, without its prefix: the flag
		// is what the user wrote.
		fmt.Fprintln(stderr, "egressd report: --since:", strings.TrimPrefix(err.Error(), "admin: since "))
		return exitUsage
	}
	set := map[string]bool{}
	fs.Visit(func(f *flagT) { set[f.Name] = true })

	// Where the report comes from: the daemon when it answers, unless
	// --state-dir names a directory to read; an explicit --admin must
	// answer.
	var rep *audit.Report
	if !set["state-dir"] || set["admin"] {
		rep, err = fetchReport(ctx, *adminAddr, *since)
		switch {
		case err == nil:
			fmt.Fprintf(stderr, "report from the daemon at %s\n", *adminAddr)
			if set["policy"] {
				fmt.Fprintln(stderr, "warning: --policy is not used: the daemon reports under the policy it runs (give --state-dir to read the state directory under --policy)")
			}
		case set["admin"] || !errors.Is(err, errNoDaemon):
			fmt.Fprintln(stderr, "egressd report:", err)
			return exitFail
		}
	}
	if rep == nil {
		var eng *policy.Engine
		name := *policyFile
		if *policyFile == "" {
			// The daemon keeps a copy of the policy it runs in the state
			// directory, so that unused rules can be listed without it,
			// and where it came from, the name the report gives it.
			if p := filepath.Join(*stateDir, runningPolicyFile); fileExists(p) {
				*policyFile, name = p, p
				if b, err := os.ReadFile(filepath.Join(*stateDir, runningSourceFile)); err == nil && strings.TrimSpace(string(b)) != "" {
					name = strings.TrimSpace(string(b))
				}
			}
		}
		if *policyFile != "" {
			if eng, err = loadEngineAs(*policyFile, name, stderr); err != nil {
				fmt.Fprintln(stderr, "egressd:", err)
				return exitFail
			}
		}
		if fi, err := os.Stat(*stateDir); err != nil {
			if set["state-dir"] {
				// No daemon was asked: the directory named is the
				// whole question.
				fmt.Fprintf(stderr, "egressd report: state directory: %v\n", err)
			} else {
				fmt.Fprintf(stderr, "egressd report: no daemon at %s and no state directory: %v\n", *adminAddr, err)
			}
			return exitFail
		} else if !fi.IsDir() {
			fmt.Fprintf(stderr, "egressd report: state directory %s is not a directory\n", *stateDir)
			return exitFail
		}
		log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
		l, st, err := audit.LoadDir(*stateDir, eng, audit.LedgerOptions{}, log)
		if err != nil {
			fmt.Fprintln(stderr, "egressd report:", err)
			return exitFail
		}
		fmt.Fprintf(stderr, "report from %s: %d files, %d events", *stateDir, st.Files, st.Events)
		if st.SummarizedFiles > 0 {
			fmt.Fprintf(stderr, ", and a summary of %d events of %d files rotated out", st.Summarized, st.SummarizedFiles)
		}
		if st.Damaged > 0 {
			fmt.Fprintf(stderr, "; %d compressed files damaged (their events past the damage are lost)", st.Damaged)
		}
		fmt.Fprintln(stderr)
		// The events' mode: the policy copy's is the file's, not the
		// daemon's --mode.
		rep = l.Report(audit.ReportOptions{Since: sinceT, EventMode: true})
		if eng == nil {
			rep.Notes = append(rep.Notes, "no policy given (--policy): unused and expired rules are not listed")
		}
	}

	switch {
	case *asJSON:
		err = rep.WriteJSON(stdout)
	case *htmlOut != "":
		err = writeFileWith(*htmlOut, rep.WriteHTML)
		if err == nil {
			fmt.Fprintf(stderr, "report written to %s\n", *htmlOut)
		}
	case *suggest:
		err = rep.WriteSuggestions(stdout)
	default:
		err = rep.WriteText(stdout)
	}
	if err != nil {
		fmt.Fprintln(stderr, "egressd report:", err)
		return exitFail
	}
	return exitOK
}

// errNoDaemon means nothing listens at the admin address.
var errNoDaemon = errors.New("no daemon answering")

// daemonWait is how long fetchReport waits for the daemon to answer at
// all (its /healthz), and reportWait for its report: the daemon sends
// nothing while it reads a since= window, for up to admin.MaxReportTime,
// so a report's wait can only be long, and a daemon that does not answer
// is told by its /healthz first. Variables: shorter in tests.
var (
	daemonWait = 10 * time.Second
	reportWait = admin.MaxReportTime + time.Minute
)

// fetchReport reads /report.json from the daemon's admin API: once its
// /healthz answered within daemonWait, waiting for the report up to
// reportWait (a long window's read takes minutes).
func fetchReport(ctx context.Context, addr, since string) (*audit.Report, error) {
	client := &http.Client{Transport: &http.Transport{
		Proxy:       nil, // the admin API is local: never through a proxy
		DialContext: (&net.Dialer{Timeout: 2 * time.Second}).DialContext,
	}}
	defer client.CloseIdleConnections()
	get := func(path, query string, wait time.Duration) (*http.Response, context.CancelFunc, error) {
		ctx, cancel := context.WithTimeout(ctx, wait)
		u := url.URL{Scheme: "http", Host: addr, Path: path, RawQuery: query}
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
		if err != nil {
			cancel()
			return nil, nil, fmt.Errorf("admin address %q: %w", addr, err)
		}
		resp, err := client.Do(req)
		if err != nil {
			cancel()
			var op *net.OpError
			if errors.As(err, &op) && op.Op == "dial" {
				return nil, nil, fmt.Errorf("%w at %s: %v", errNoDaemon, addr, err)
			}
			if errors.Is(err, context.DeadlineExceeded) && ctx.Err() != nil && path == "/healthz" {
				return nil, nil, fmt.Errorf("daemon at %s: not answering (its /healthz within %v): %w", addr, wait, err)
			}
			return nil, nil, fmt.Errorf("daemon at %s: %w", addr, err)
		}
		return resp, cancel, nil
	}
	resp, cancel, err := get("/healthz", "", daemonWait)
	if err != nil {
		return nil, err
	}
	io.Copy(io.Discard, io.LimitReader(resp.Body, 512))
	resp.Body.Close()
	cancel()
	var q string
	if since != "" {
		q = url.Values{"since": {since}}.Encode()
	}
	if resp, cancel, err = get("/report.json", q, reportWait); err != nil {
		return nil, err
	}
	defer cancel()
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return nil, fmt.Errorf("daemon at %s: %s: %s", addr, resp.Status, b)
	}
	return audit.ReadReportJSON(resp.Body)
}
