package main

import (
	"bytes"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

func TestParseWrkArgs(t *testing.T) {
	t.Setenv("TLSRATE_RATE", "250")
	cfg, err := parseArgs(strings.Fields("-wrk -t 2 -c 50 -d 3s --timeout 2s --latency -H Connection:close https://www.allowed.test/1k.bin"))
	if err != nil {
		t.Fatal(err)
	}
	if cfg.rate != 250 || cfg.dur != 3*time.Second || cfg.timeout != 2*time.Second || cfg.url.Host != "www.allowed.test" ||
		len(cfg.headers) != 1 || cfg.classic {
		t.Errorf("parsed %+v", cfg)
	}
	for _, bad := range []string{
		"-rate 0 https://a.test/",
		"-rate 10 http://a.test/",
		"-rate 10",
		"-rate 10 -d 0s https://a.test/",
		"-rate 10 -groups pq https://a.test/",
		"-rate 10 -max-inflight 0 https://a.test/",
	} {
		t.Setenv("TLSRATE_RATE", "")
		if _, err := parseArgs(strings.Fields(bad)); err == nil {
			t.Errorf("%q parsed", bad)
		}
	}
}

func testURL(t *testing.T, h http.HandlerFunc) string {
	srv := httptest.NewTLSServer(h)
	t.Cleanup(srv.Close)
	return srv.URL + "/1k.bin"
}

func mustParse(t *testing.T, args string) config {
	t.Helper()
	cfg, err := parseArgs(strings.Fields(args))
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// The schedule is kept and latencies are counted from the due time: a
// server that takes 30 ms puts the median at 30 ms or more.
func TestRunAgainstTLSServer(t *testing.T) {
	u := testURL(t, func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Connection") != "close" || !r.Close {
			w.WriteHeader(400)
			return
		}
		time.Sleep(30 * time.Millisecond)
		w.Write(make([]byte, 1024))
	})
	// 50 handshakes a second with a 10 s timeout: at 200/s and 2 s, -race
	// on a loaded 2-core box timed out 183 of them (CI, session 28).
	cfg := mustParse(t, "-rate 50 -d 2s -timeout 10s "+u)
	res := run(cfg)
	if e := res.connectErr + res.readErr + res.writeErr + res.tmoErr + res.non2xx; e != 0 {
		t.Fatalf("%d errors: %+v", e, res)
	}
	// Poisson arrivals at 50/s for 2 s: 100 expected (sd 10), far outside 60..140 is a broken schedule.
	if n := len(res.lat); n < 60 || n > 140 {
		t.Errorf("%d responses for 50/s over 2 s", n)
	}
	res.print(&bytes.Buffer{}, cfg)
	if p := pct(res.lat, 50); p < 30*time.Millisecond {
		t.Errorf("p50 %v below the server's own 30 ms", p)
	}
	if res.bytes < int64(len(res.lat))*1024 {
		t.Errorf("%d bytes for %d responses of 1 KiB", res.bytes, len(res.lat))
	}
	// The same seed gives the same schedule.
	if n2 := len(run(cfg).lat); n2 != len(res.lat) {
		t.Errorf("seed 1 gave %d then %d arrivals", len(res.lat), n2)
	}
}

// Errors are counted by kind and the run still ends on time.
func TestRunCountsErrors(t *testing.T) {
	u := testURL(t, func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(503) })
	res := run(mustParse(t, "-rate 100 -d 300ms "+u))
	if res.non2xx == 0 || len(res.lat) != 0 {
		t.Errorf("503s: non2xx %d, ok %d", res.non2xx, len(res.lat))
	}

	// A listener that accepts and never answers: every connection times out.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var held []net.Conn
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			held = append(held, c)
		}
	}()
	t0 := time.Now()
	res = run(mustParse(t, "-rate 50 -d 200ms -timeout 300ms https://"+ln.Addr().String()+"/"))
	if res.tmoErr == 0 || len(res.lat) != 0 {
		t.Errorf("silent server: timeouts %d, ok %d", res.tmoErr, len(res.lat))
	}
	if el := time.Since(t0); el > 5*time.Second {
		t.Errorf("run took %v, bounded by -d plus -timeout", el)
	}

	// Nothing listening: connect errors.
	addr := ln.Addr().String()
	ln.Close()
	res = run(mustParse(t, "-rate 50 -d 200ms https://"+addr+"/"))
	if res.connectErr == 0 {
		t.Errorf("closed port: %+v", res)
	}
}

// What the peers script's awk reads from wrk's output.
func TestWrkOutput(t *testing.T) {
	r := &result{lat: []time.Duration{time.Millisecond, 2 * time.Millisecond, 4 * time.Millisecond}, tmoErr: 2, non2xx: 1}
	var b bytes.Buffer
	r.print(&b, mustParse(t, "-rate 3 -d 1s https://a.test/"))
	out := b.String()
	for _, want := range []string{"\n     99%  4.00ms\n", "Socket errors: connect 0, read 0, write 0, timeout 2\n", "Non-2xx or 3xx responses: 1\n", "Requests/sec:       3.00\n"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
}
