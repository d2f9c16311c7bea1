package proxy

import (
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"
)

// BenchmarkInspectedRequests: HTTPS requests per second through the
// explicit proxy on loopback, over kept-alive connections (8 clients at
// once, one connection each, made before the timer): "inspected" with a
// host/path rule (the proxy terminates TLS, runs the cleartext through
// the request follower, goproxy's net/http reads it, and the request goes
// on over the proxy's own pooled TLS connection to the origin), and
// "tunnel" with a host rule (the same requests end to end through the
// CONNECT tunnel, not inspected) for comparison. The origin is a TLS
// server on loopback answering a short body.
//
//	go test -run '^$' -bench BenchmarkInspectedRequests -benchtime 20000x -count 5 ./proxy/
func BenchmarkInspectedRequests(b *testing.B) {
	for _, c := range []struct{ name, rule string }{
		{"inspected", "docs.paths.test/public/*"},
		{"tunnel", "docs.paths.test"},
	} {
		b.Run(c.name, func(b *testing.B) {
			addr, _, tlsPort, caPool := loopbackExplicit(b, `version: 1
mode: enforce
rules:
  - name: docs
    to: [`+c.rule+`]
    ports: [%d/tcp, %d/tcp]
`, nil)
			const clients = 8
			tr := &http.Transport{
				Proxy: http.ProxyURL(&url.URL{Scheme: "http", Host: addr}),
				// Inspected, the proxy's CA signs the leaf. Through the
				// tunnel the client meets the origin's leaf, whose test
				// CA loopbackExplicit keeps to itself: not verified
				// there (a throughput figure, not a test).
				TLSClientConfig:     &tls.Config{RootCAs: caPool, InsecureSkipVerify: c.name == "tunnel"},
				MaxIdleConnsPerHost: clients,
				MaxConnsPerHost:     clients,
				DisableCompression:  true,
				ForceAttemptHTTP2:   false,
			}
			defer tr.CloseIdleConnections()
			client := &http.Client{Transport: tr, Timeout: 10 * time.Second}
			u := fmt.Sprintf("https://docs.paths.test:%d/public/x", tlsPort)
			get := func() error {
				req, _ := http.NewRequest(http.MethodGet, u, nil)
				// A browser's head is some 500 bytes; Go's is under 100.
				req.Header.Set("User-Agent", "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0")
				req.Header.Set("Accept", "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8")
				req.Header.Set("Accept-Language", "en-US,en;q=0.5")
				req.Header.Set("Cookie", "session="+strings.Repeat("c", 120))
				resp, err := client.Do(req)
				if err != nil {
					return err
				}
				body, err := io.ReadAll(resp.Body)
				resp.Body.Close()
				if err != nil {
					return err
				}
				if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), "path=/public/x") {
					return fmt.Errorf("GET %s: %d %q", u, resp.StatusCode, body)
				}
				return nil
			}
			// The connections (CONNECT, handshakes, the leaf) before the
			// timer.
			errs := make(chan error, clients)
			for range clients {
				go func() { errs <- get() }()
			}
			for range clients {
				if err := <-errs; err != nil {
					b.Fatal(err)
				}
			}
			b.SetParallelism(clients / 2) // GOMAXPROCS is 2 on the box
			b.ResetTimer()
			start := time.Now()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if err := get(); err != nil {
						b.Error(err)
						return
					}
				}
			})
			b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "req/s")
		})
	}
}

// BenchmarkClearStream: the request follower of an inspected connection
// alone, per request: a browser-sized GET head fed as net/http's reader
// reads it (one read) and its verdict taken, as handleRequest does.
//
//	go test -run '^$' -bench BenchmarkClearStream -benchmem ./proxy/
func BenchmarkClearStream(b *testing.B) {
	head := []byte("GET /public/x HTTP/1.1\r\nHost: docs.paths.test:443\r\n" +
		"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n" +
		"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n" +
		"Accept-Language: en-US,en;q=0.5\r\nCookie: session=" + strings.Repeat("c", 120) + "\r\n\r\n")
	cs := newClearStream(64 << 10)
	cs.s.TLS = true
	b.SetBytes(int64(len(head)))
	b.ReportAllocs()
	for b.Loop() {
		cs.feed(head)
		if err := cs.next(); err != nil {
			b.Fatal(err)
		}
	}
}
