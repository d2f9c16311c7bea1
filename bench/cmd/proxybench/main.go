// Command proxybench runs egressd's proxy (package proxy) on its own, with
// a generated policy, for the benchmark scripts under bench/: they start it
// in a gateway network namespace behind an nftables REDIRECT (transparent)
// or as an explicit CONNECT proxy. It stands in for "egressd run" there.
//
// Names are resolved from a hosts file (the role dnsfilter's upstream
// lookups play in egressd), so no query leaves the namespace.
package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"runtime"
	"runtime/debug"
	"runtime/pprof"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"egressd/audit"
	"egressd/dnsfilter"
	"egressd/internal/logbuf"
	"egressd/internal/logjson"
	"egressd/internal/sysmon"
	"egressd/policy"
	"egressd/proxy"
)

// hostsResolver answers from a hosts file.
type hostsResolver map[string][]netip.Addr

func (h hostsResolver) LookupNetIP(_ context.Context, name string) ([]netip.Addr, error) {
	if a := h[strings.ToLower(strings.TrimSuffix(name, "."))]; len(a) > 0 {
		return a, nil
	}
	return nil, fmt.Errorf("proxybench: %s not in the hosts file", name)
}

func readHosts(path string, h hostsResolver) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(strings.SplitN(sc.Text(), "#", 2)[0])
		if len(fields) < 2 {
			continue
		}
		a, err := netip.ParseAddr(fields[0])
		if err != nil {
			continue
		}
		for _, n := range fields[1:] {
			h[strings.ToLower(n)] = append(h[strings.ToLower(n)], a)
		}
	}
	return sc.Err()
}

func main() {
	// As egressd run does (package sysmon).
	if err := sysmon.Reexec(); err != nil {
		fmt.Fprintln(os.Stderr, "proxybench:", err)
	}
	transparent := flag.String("transparent", "", "transparent listen address (REDIRECT target), e.g. :8441")
	explicit := flag.String("explicit", "", "explicit proxy listen address, e.g. 198.18.1.1:3131")
	allow := flag.String("allow", "*.allowed.test", "comma-separated name patterns the policy allows")
	ports := flag.String("ports", "443/tcp", "comma-separated ports of the allow rule")
	hosts := flag.String("hosts", "", "hosts file for name lookups")
	mapFlag := flag.String("map", "", "comma-separated name=ip lookups, in addition to -hosts")
	logLevel := flag.String("log", "info", "log level: debug, info, warn, error (egressd run's default is info)")
	logFormat := flag.String("log-format", "json", "json or text (egressd run's default is json)")
	logFlush := flag.Duration("log-flush", 50*time.Millisecond, "longest a log line waits in the batch before it is written, as egressd run's; 0: a write per line")
	stateDir := flag.String("state-dir", "", "audit event log directory (default: a temporary one, removed at exit); \"none\": discard events")
	cpuProfile := flag.String("cpuprofile", "", "write a CPU profile of the whole run to this file")
	blockProfile := flag.String("blockprofile", "", "write a block profile (every blocking event) at exit to this file")
	mutexProfile := flag.String("mutexprofile", "", "write a mutex contention profile at exit to this file")
	memProfile := flag.String("memprofile", "", "write an allocation profile (every allocation since the start, sampled) at exit to this file")
	metricsOut := flag.String("metrics", "", "write the proxy's metrics (Prometheus text format) at exit to this file")
	memProfileRate := flag.Int("memprofilerate", 0, "runtime.MemProfileRate: sample an allocation every this many bytes (1: every one; 0: the runtime's default)")
	heapProfile := flag.String("heapprofile", "", "on each SIGUSR1, after the collection, write a heap profile to FILE.heap and a goroutine profile to FILE.goroutine (what the open connections hold)")
	flag.Parse()
	if *memProfileRate > 0 {
		runtime.MemProfileRate = *memProfileRate
	}
	for _, pf := range []struct{ name, file string }{{"block", *blockProfile}, {"mutex", *mutexProfile}, {"allocs", *memProfile}} {
		if pf.file == "" {
			continue
		}
		switch pf.name {
		case "block":
			runtime.SetBlockProfileRate(1)
		case "mutex":
			runtime.SetMutexProfileFraction(1)
		}
		defer func() {
			if f, err := os.Create(pf.file); err == nil {
				pprof.Lookup(pf.name).WriteTo(f, 0)
				f.Close()
			}
		}()
	}
	if *cpuProfile != "" {
		f, err := os.Create(*cpuProfile)
		if err != nil {
			fmt.Fprintln(os.Stderr, "proxybench:", err)
			os.Exit(1)
		}
		pprof.StartCPUProfile(f)
		defer func() { pprof.StopCPUProfile(); f.Close() }()
	}

	var b strings.Builder
	b.WriteString("version: 1\nmode: enforce\nrules:\n  - name: bench\n    to: [")
	for i, p := range strings.Split(*allow, ",") {
		if i > 0 {
			b.WriteString(", ")
		}
		fmt.Fprintf(&b, "%q", strings.TrimSpace(p))
	}
	fmt.Fprintf(&b, "]\n    ports: [%s]\n", *ports)
	eng, err := policy.Compile("proxybench.yaml", []byte(b.String()))
	if err != nil {
		fmt.Fprintln(os.Stderr, "proxybench:", err)
		os.Exit(1)
	}
	res := hostsResolver{}
	if *hosts != "" {
		if err := readHosts(*hosts, res); err != nil {
			fmt.Fprintln(os.Stderr, "proxybench:", err)
			os.Exit(1)
		}
	}
	for _, kv := range strings.Split(*mapFlag, ",") {
		if n, ip, ok := strings.Cut(kv, "="); ok {
			a, err := netip.ParseAddr(ip)
			if err != nil {
				fmt.Fprintln(os.Stderr, "proxybench: -map:", err)
				os.Exit(1)
			}
			res[strings.ToLower(n)] = append(res[strings.ToLower(n)], a)
		}
	}
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(*logLevel)); err != nil {
		fmt.Fprintln(os.Stderr, "proxybench: -log:", err)
		os.Exit(1)
	}
	// As egressd run: JSON lines on stderr at info (one decision line per
	// connection), events through the journal (ledger and event log on
	// disk), metrics registered.
	hopts := &slog.HandlerOptions{Level: lvl}
	lw := logbuf.New(os.Stderr, *logFlush)
	defer lw.Close()
	var log *slog.Logger
	switch *logFormat {
	case "json":
		log = slog.New(logjson.New(lw, hopts))
	case "text":
		log = slog.New(slog.NewTextHandler(lw, hopts))
	default:
		fmt.Fprintln(os.Stderr, "proxybench: -log-format: expected json or text")
		os.Exit(1)
	}
	var sink audit.Sink = audit.Discard
	if *stateDir != "none" {
		dir := *stateDir
		if dir == "" {
			if dir, err = os.MkdirTemp("", "proxybench-state."); err != nil {
				fmt.Fprintln(os.Stderr, "proxybench:", err)
				os.Exit(1)
			}
			defer os.RemoveAll(dir)
		}
		j, _, err := audit.OpenJournal(audit.JournalConfig{Dir: dir, Logger: log.With(audit.LogComponent, "audit")}, audit.NewLedger(eng, audit.LedgerOptions{}))
		if err != nil {
			fmt.Fprintln(os.Stderr, "proxybench:", err)
			os.Exit(1)
		}
		go j.Run(context.Background())
		defer j.Close()
		sink = j
	}
	reg := prometheus.NewRegistry()
	p, err := proxy.New(proxy.Config{
		TransparentAddr:   *transparent,
		ExplicitAddr:      *explicit,
		MaxConns:          -1,
		MaxConnsPerClient: -1,
	}, proxy.Deps{
		Policy:     policy.NewStore(eng),
		Sink:       sink,
		Logger:     log,
		Resolver:   res,
		Registerer: reg,
		DNS:        dnsfilter.NewTable(0), // empty: the bench client resolves from a hosts file, so every SNI is vouched by lookup
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "proxybench:", err)
		os.Exit(1)
	}
	if *metricsOut != "" {
		defer func() {
			if err := prometheus.WriteToTextfile(*metricsOut, reg); err != nil {
				fmt.Fprintln(os.Stderr, "proxybench:", err)
			}
		}()
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	// SIGUSR1: collect garbage and return free memory to the OS, so that
	// bench/proxy-idle.sh can also read a settled RSS (the runtime does the
	// same on its own within minutes).
	usr1 := make(chan os.Signal, 1)
	signal.Notify(usr1, syscall.SIGUSR1)
	go func() {
		for range usr1 {
			debug.FreeOSMemory()
			if *heapProfile != "" {
				var ms runtime.MemStats
				runtime.ReadMemStats(&ms)
				fmt.Fprintf(os.Stderr, "proxybench: goroutines %d heap_inuse %d stack_inuse %d sys %d\n", runtime.NumGoroutine(), ms.HeapInuse, ms.StackInuse, ms.Sys)
				for _, name := range []string{"heap", "goroutine"} {
					f, err := os.Create(*heapProfile + "." + name)
					if err != nil {
						fmt.Fprintln(os.Stderr, "proxybench:", err)
						continue
					}
					pprof.Lookup(name).WriteTo(f, 0)
					f.Close()
				}
			}
		}
	}()
	fmt.Fprintf(os.Stderr, "proxybench: pid %d transparent %q explicit %q\n", os.Getpid(), *transparent, *explicit)
	if err := p.Run(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "proxybench:", err)
		pprof.StopCPUProfile()
		os.Exit(1) // the deferred cleanups do not run; a temporary state directory stays
	}
}
