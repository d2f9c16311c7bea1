package admin_test

import (
	"context"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"

	"egressd/admin"
	"egressd/audit"
	"egressd/policy"
)

// Example shows how `egressd run` wires the audit path: one registry, a
// ledger rebuilt from the state directory's event log by the journal, the
// journal as the sink every component emits into, and the admin API.
func Example() {
	ctx := context.Background()
	eng, _ := policy.Compile("policy.yaml", []byte("version: 1\nrules: []\n"))
	reg := prometheus.NewRegistry()

	ledger := audit.NewLedger(eng, audit.LedgerOptions{})
	_ = ledger.RegisterMetrics(reg)
	journal, _, err := audit.OpenJournal(audit.JournalConfig{Dir: "/var/lib/egressd", Logger: slog.Default()}, ledger)
	if err != nil {
		return // the daemon reports the error and exits
	}
	_ = journal.RegisterMetrics(reg)
	var sink audit.Sink = journal // pass to proxy, dnsfilter and capture
	_ = sink

	srv, _ := admin.New(admin.Config{Addr: admin.DefaultAddr}, admin.Deps{
		Reporter: ledger, Registry: reg,
		Checks: []admin.Check{{Name: "event log write failing", Fn: journal.Err}},
	})
	srv.ConfigLoaded(true, time.Now())
	// On SIGHUP: compile the new policy; on success swap it in the store,
	// then ledger.SetPolicy(newEng) and srv.ConfigLoaded(true, time.Now());
	// on failure srv.ConfigLoaded(false, time.Now()).

	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error { return journal.Run(ctx) })
	g.Go(func() error { return srv.Run(ctx) })
	_ = g.Wait()
}
