// Command dnsbench starts egressd's filtering DNS forwarder (dnsfilter) on
// its own, for bench/dns.sh: it allows one name pattern in enforce mode and
// forwards to one upstream. egressd run will wire the same package.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"runtime/pprof"
	"syscall"
	"time"

	"egressd/audit"
	"egressd/dnsfilter"
	"egressd/internal/logbuf"
	"egressd/internal/logjson"
	"egressd/internal/sysmon"
	"egressd/policy"
)

func main() {
	// As egressd run does (package sysmon).
	if err := sysmon.Reexec(); err != nil {
		fmt.Fprintln(os.Stderr, "dnsbench:", err)
	}
	listen := flag.String("listen", "127.0.0.1:5399", "listen address (UDP and TCP)")
	upstream := flag.String("upstream", "127.0.0.1:5300", "upstream resolver")
	allow := flag.String("allow", "*.allowed.test", "name pattern the policy allows")
	noCache := flag.Bool("no-cache", false, "disable the answer cache")
	logLevel := flag.String("log", "none", "canonical log lines: none, or a slog level (info, warn) to stderr")
	cpuProfile := flag.String("cpuprofile", "", "write a CPU profile to this file")
	memProfile := flag.String("memprofile", "", "write an allocation profile to this file at exit")
	readers := flag.Int("readers", 0, "UDP sockets and readers (0: the forwarder's default, one per processor)")
	rawReads := flag.Bool("raw-reads", false, "take the IPv4 UDP listeners off Go's netpoller (Config.UDPRawReads)")
	journal := flag.Bool("journal", false, "record every query through the audit journal, as egressd run does, in a temporary state directory removed at exit")
	flag.Parse()
	if *cpuProfile != "" {
		f, err := os.Create(*cpuProfile)
		if err != nil {
			fmt.Fprintln(os.Stderr, "dnsbench:", err)
			os.Exit(1)
		}
		_ = pprof.StartCPUProfile(f)
		defer pprof.StopCPUProfile()
	}
	err := run(*listen, *upstream, *allow, *noCache, *logLevel, *readers, *rawReads, *journal)
	if *memProfile != "" {
		if f, ferr := os.Create(*memProfile); ferr == nil {
			_ = pprof.Lookup("allocs").WriteTo(f, 0)
			f.Close()
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "dnsbench:", err)
		pprof.StopCPUProfile()
		os.Exit(1)
	}
}

func run(listen, upstream, allow string, noCache bool, logLevel string, readers int, rawReads, journal bool) error {
	src := fmt.Sprintf("version: 1\nmode: enforce\nrules:\n  - name: bench\n    to: [%q]\n    ports: [443/tcp]\n", allow)
	eng, err := policy.Compile("bench-policy.yaml", []byte(src))
	if err != nil {
		return err
	}
	logger := slog.New(slog.DiscardHandler)
	if logLevel != "none" {
		var lv slog.Level
		if err := lv.UnmarshalText([]byte(logLevel)); err != nil {
			return err
		}
		lw := logbuf.New(os.Stderr, 50*time.Millisecond) // batched, as egressd run's
		defer lw.Close()
		logger = slog.New(logjson.New(lw, &slog.HandlerOptions{Level: lv}))
	}
	cfg := dnsfilter.Config{Listen: []string{listen}, Upstreams: []string{upstream}, ClientRate: -1, UDPReaders: readers, UDPRawReads: rawReads}
	if noCache {
		cfg.CacheSize = -1
	}
	var sink audit.Sink = audit.Discard
	if journal {
		dir, err := os.MkdirTemp("", "dnsbench-state.")
		if err != nil {
			return err
		}
		defer os.RemoveAll(dir)
		j, _, err := audit.OpenJournal(audit.JournalConfig{Dir: dir, Logger: logger.With(audit.LogComponent, "audit")}, audit.NewLedger(eng, audit.LedgerOptions{}))
		if err != nil {
			return err
		}
		go j.Run(context.Background())
		defer func() {
			j.Close()
			fmt.Fprintf(os.Stderr, "dnsbench: journal: %d events written, %d shed\n", j.Written(), j.Shed())
		}()
		sink = j
	}
	s, err := dnsfilter.New(cfg, dnsfilter.Deps{Policy: policy.NewStore(eng), Logger: logger, Sink: sink})
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	return s.Run(ctx)
}
