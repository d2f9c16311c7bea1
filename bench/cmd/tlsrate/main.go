// Command tlsrate is an open-loop load generator for bench/proxy-latency.sh:
// it starts new TLS connections at a fixed rate, whatever the system under
// test does, sends one HTTP/1.1 request with "Connection: close" on each
// and reads the response to its end. Each latency is counted from the time
// the connection was due to start, not from when it started, so a system
// that falls behind shows it in the tail instead of slowing the load down
// (wrk's closed loop measures the rate a system saturates at, and its
// latency there is mostly that rate's queue).
//
// Arrivals are Poisson at -rate per second from a fixed seed, so every
// system sees the same schedule. The load is bounded: -d of arrivals,
// at most -max-inflight connections at once (an arrival beyond it counts
// as a connect error), -timeout per connection.
//
// With -wrk as its first argument it takes wrk's arguments (-d, --timeout, -H, the URL;
// -t, -c and --latency are accepted and ignored) and prints what the
// shared peers script reads from wrk: "Requests/sec:", the "99%" line of
// the latency distribution, "Socket errors:" and "Non-2xx or 3xx
// responses:". proxy-latency.sh puts a script named wrk that runs it so
// first on the peers script's PATH.
//
// The client is Go's crypto/tls with its defaults (X25519MLKEM768 first:
// a ClientHello of about 1.8 KB, two TCP segments on a 1500-byte MTU, as
// current browsers send) unless -groups classic; certificates are not
// verified (the benchmark's origin is self-signed, as wrk and curl -k).
package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/url"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

type config struct {
	url         *url.URL
	rate        float64
	dur         time.Duration
	timeout     time.Duration
	maxInflight int
	headers     []string
	classic     bool
	seed        uint64
}

type headerList []string

func (h *headerList) String() string     { return strings.Join(*h, ", ") }
func (h *headerList) Set(v string) error { *h = append(*h, v); return nil }

func main() {
	cfg, err := parseArgs(os.Args[1:])
	if err != nil {
		fmt.Fprintln(os.Stderr, "tlsrate:", err)
		os.Exit(2)
	}
	res := run(cfg)
	res.print(os.Stdout, cfg)
}

func parseArgs(args []string) (config, error) {
	var cfg config
	// -wrk first: the rest are wrk's arguments, its -t, -c and --latency
	// accepted and ignored.
	wrk := len(args) > 0 && (args[0] == "-wrk" || args[0] == "--wrk")
	if wrk {
		args = args[1:]
	}
	fs := flag.NewFlagSet("tlsrate", flag.ContinueOnError)
	rate := fs.Float64("rate", 0, "new connections per second (default $TLSRATE_RATE)")
	maxIn := fs.Int("max-inflight", 2000, "connections open at once at most; an arrival beyond it is a connect error")
	groups := fs.String("groups", os.Getenv("TLSRATE_GROUPS"), "key exchange groups: \"\" (Go's defaults, ML-KEM first) or classic (X25519 and P-256 only); default $TLSRATE_GROUPS")
	seed := fs.Uint64("seed", 1, "seed of the arrival schedule")
	dur := fs.Duration("d", 10*time.Second, "how long arrivals come")
	timeout := fs.Duration("timeout", 5*time.Second, "per connection, from its due time to the response's end")
	var headers headerList
	fs.Var(&headers, "H", "request header line (repeatable)")
	if wrk {
		fs.Int("t", 2, "wrk's threads (ignored)")
		fs.Int("c", 50, "wrk's connections (ignored)")
		fs.Bool("latency", true, "wrk's latency flag (ignored)")
	}
	if err := fs.Parse(args); err != nil {
		return cfg, err
	}
	rest := fs.Args()
	if len(rest) != 1 {
		return cfg, fmt.Errorf("want one https URL, got %q", rest)
	}
	u, err := url.Parse(rest[0])
	if err != nil || u.Scheme != "https" || u.Hostname() == "" {
		return cfg, fmt.Errorf("want an https URL, got %q", rest[0])
	}
	if *rate == 0 {
		if v := os.Getenv("TLSRATE_RATE"); v != "" {
			if _, err := fmt.Sscan(v, rate); err != nil {
				return cfg, fmt.Errorf("TLSRATE_RATE: %v", err)
			}
		}
	}
	switch {
	case *rate <= 0 || *rate > 100000:
		return cfg, fmt.Errorf("-rate (or TLSRATE_RATE) must be in (0, 100000], got %v", *rate)
	case *dur <= 0 || *dur > 10*time.Minute:
		return cfg, fmt.Errorf("-d must be in (0, 10m], got %v", *dur)
	case *timeout <= 0 || *timeout > time.Minute:
		return cfg, fmt.Errorf("-timeout must be in (0, 1m], got %v", *timeout)
	case *maxIn <= 0:
		return cfg, fmt.Errorf("-max-inflight must be positive")
	case *groups != "" && *groups != "classic":
		return cfg, fmt.Errorf("-groups: \"\" or classic, got %q", *groups)
	}
	cfg = config{url: u, rate: *rate, dur: *dur, timeout: *timeout, maxInflight: *maxIn,
		headers: headers, classic: *groups == "classic", seed: *seed}
	return cfg, nil
}

// result is what run measured.
type result struct {
	wall                                  time.Duration
	lat                                   []time.Duration // of the connections that got a 2xx or 3xx
	connectErr, readErr, writeErr, tmoErr int64
	non2xx                                int64
	bytes                                 int64
	late                                  time.Duration // how far behind the schedule the starts ran at worst
}

func run(cfg config) *result {
	host := cfg.url.Hostname()
	port := cfg.url.Port()
	if port == "" {
		port = "443"
	}
	addr := net.JoinHostPort(host, port)
	path := cfg.url.RequestURI()
	var req bytes.Buffer
	fmt.Fprintf(&req, "GET %s HTTP/1.1\r\nHost: %s\r\n", path, cfg.url.Host)
	hasConn := false
	for _, h := range cfg.headers {
		if k, _, _ := strings.Cut(h, ":"); strings.EqualFold(strings.TrimSpace(k), "connection") {
			hasConn = true
		}
		req.WriteString(h + "\r\n")
	}
	if !hasConn {
		req.WriteString("Connection: close\r\n")
	}
	req.WriteString("\r\n")
	tcfg := &tls.Config{ServerName: host, InsecureSkipVerify: true, NextProtos: []string{"http/1.1"}}
	if cfg.classic {
		tcfg.CurvePreferences = []tls.CurveID{tls.X25519, tls.CurveP256}
	}
	// Resolve once, before the clock starts (the peers script's /etc/hosts).
	if ips, err := net.DefaultResolver.LookupHost(context.Background(), host); err == nil && len(ips) > 0 {
		addr = net.JoinHostPort(ips[0], port)
	}

	res := &result{}
	var (
		mu       sync.Mutex
		wg       sync.WaitGroup
		inflight atomic.Int64
	)
	rng := rand.New(rand.NewPCG(cfg.seed, 0x746c7372617465))
	start := time.Now()
	due := time.Duration(0)
	for {
		due += time.Duration(rng.ExpFloat64() / cfg.rate * float64(time.Second))
		if due >= cfg.dur {
			break
		}
		at := start.Add(due)
		if d := time.Until(at); d > 0 {
			time.Sleep(d)
		} else if -d > res.late {
			res.late = -d
		}
		if inflight.Load() >= int64(cfg.maxInflight) {
			mu.Lock()
			res.connectErr++
			mu.Unlock()
			continue
		}
		inflight.Add(1)
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer inflight.Add(-1)
			kind, n, code := oneConn(addr, tcfg, req.Bytes(), at.Add(cfg.timeout))
			lat := time.Since(at)
			mu.Lock()
			defer mu.Unlock()
			res.bytes += n
			switch kind {
			case errConnect:
				res.connectErr++
			case errWrite:
				res.writeErr++
			case errRead:
				res.readErr++
			case errTimeout:
				res.tmoErr++
			default:
				if code < 200 || code > 399 {
					res.non2xx++
					return
				}
				res.lat = append(res.lat, lat)
			}
		}()
	}
	wg.Wait()
	res.wall = time.Since(start)
	return res
}

type errKind int

const (
	errNone errKind = iota
	errConnect
	errWrite
	errRead
	errTimeout
)

// oneConn dials, shakes hands, sends req and reads the response to EOF
// (at most 1 MiB), all before deadline. It returns the HTTP status.
func oneConn(addr string, tcfg *tls.Config, req []byte, deadline time.Time) (errKind, int64, int) {
	d := net.Dialer{Deadline: deadline}
	raw, err := d.Dial("tcp", addr)
	if err != nil {
		return classify(err, errConnect), 0, 0
	}
	defer raw.Close()
	raw.SetDeadline(deadline)
	c := tls.Client(raw, tcfg)
	if err := c.Handshake(); err != nil {
		return classify(err, errConnect), 0, 0
	}
	if _, err := c.Write(req); err != nil {
		return classify(err, errWrite), 0, 0
	}
	br := bufio.NewReaderSize(io.LimitReader(c, 1<<20), 4096)
	line, err := br.ReadSlice('\n')
	if err != nil {
		return classify(err, errRead), int64(len(line)), 0
	}
	code := 0
	if f := bytes.Fields(line); len(f) >= 2 {
		fmt.Sscan(string(f[1]), &code)
	}
	n, err := io.Copy(io.Discard, br)
	n += int64(len(line))
	if err != nil && !errors.Is(err, io.EOF) {
		return classify(err, errRead), n, code
	}
	return errNone, n, code
}

func classify(err error, k errKind) errKind {
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return errTimeout
	}
	return k
}

func pct(s []time.Duration, p float64) time.Duration {
	if len(s) == 0 {
		return 0
	}
	i := int(p/100*float64(len(s))+0.5) - 1
	return s[min(max(i, 0), len(s)-1)]
}

func ms(d time.Duration) string { return fmt.Sprintf("%.2fms", float64(d)/float64(time.Millisecond)) }

func (r *result) print(w io.Writer, cfg config) {
	slices.Sort(r.lat)
	ok := len(r.lat)
	fmt.Fprintf(w, "tlsrate: %.0f new TLS connections/s (Poisson, seed %d) for %v @ %s, groups %s\n",
		cfg.rate, cfg.seed, cfg.dur, cfg.url, map[bool]string{false: "Go default", true: "classic"}[cfg.classic])
	fmt.Fprintf(w, "  Latency from due time (%d responses; starts ran at most %v behind)\n", ok, r.late.Round(time.Microsecond))
	fmt.Fprintf(w, "  Latency Distribution\n")
	for _, p := range []float64{50, 75, 90, 99, 99.9} {
		fmt.Fprintf(w, "  %5s%%  %s\n", fmt.Sprint(p), ms(pct(r.lat, p)))
	}
	if ok > 0 {
		fmt.Fprintf(w, "  max    %s\n", ms(r.lat[ok-1]))
	}
	fmt.Fprintf(w, "  %d requests in %.2fs, %d bytes read\n", ok+int(r.non2xx), r.wall.Seconds(), r.bytes)
	if e := r.connectErr + r.readErr + r.writeErr + r.tmoErr; e > 0 {
		fmt.Fprintf(w, "  Socket errors: connect %d, read %d, write %d, timeout %d\n", r.connectErr, r.readErr, r.writeErr, r.tmoErr)
	}
	if r.non2xx > 0 {
		fmt.Fprintf(w, "  Non-2xx or 3xx responses: %d\n", r.non2xx)
	}
	// The rate the responses came at over the arrivals' span: the offered
	// rate when the system kept up.
	fmt.Fprintf(w, "Requests/sec: %10.2f\n", float64(ok)/cfg.dur.Seconds())
}
