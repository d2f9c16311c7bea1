package proxy

import (
	"bufio"
	"crypto/sha256"
	"encoding/base64"
	"fmt"
	"io"
	"net"
	"net/http"
	"testing"
	"time"
)

// BenchmarkExplicitConnect: CONNECTs per second through the explicit
// proxy on loopback, each on a new connection that ends once the tunnel
// is up (the proxy dials the origin, a TLS server on loopback, and
// answers 200), 8 clients at once; open (no users), a SHA-256 user, and
// a bcrypt user whose password is in the cache (the first CONNECT, before
// the timer, paid the one bcrypt check).
//
//	go test -run '^$' -bench BenchmarkExplicitConnect -benchtime 3000x -count 3 ./proxy/
func BenchmarkExplicitConnect(b *testing.B) {
	const pass = "s3cret"
	for _, c := range []struct {
		name  string
		users map[string]UserSecret
	}{
		{"open", nil},
		{"sha256", map[string]UserSecret{"alice": SHA256Secret(sha256.Sum256([]byte(pass)))}},
		{"bcrypt-cached", map[string]UserSecret{"alice": mustBcryptCost(b, pass, DefaultBcryptCost)}},
	} {
		b.Run(c.name, func(b *testing.B) {
			addr, _, tlsPort, _ := loopbackExplicit(b, `version: 1
mode: enforce
rules:
  - name: docs
    to: ["docs.paths.test"]
    ports: [%d/tcp, %d/tcp]
`, func(cfg *Config) {
				cfg.ProxyUserDigests = c.users
				cfg.Inspect = false
			})
			head := fmt.Sprintf("CONNECT docs.paths.test:%d HTTP/1.1\r\nHost: docs.paths.test:%d\r\n", tlsPort, tlsPort)
			if c.users != nil {
				head += "Proxy-Authorization: Basic " + base64.StdEncoding.EncodeToString([]byte("alice:"+pass)) + "\r\n"
			}
			head += "\r\n"
			connect := func() error {
				conn, err := net.Dial("tcp", addr)
				if err != nil {
					return err
				}
				defer conn.Close()
				conn.SetDeadline(time.Now().Add(10 * time.Second))
				if _, err := io.WriteString(conn, head); err != nil {
					return err
				}
				resp, err := http.ReadResponse(bufio.NewReader(conn), &http.Request{Method: http.MethodConnect})
				if err != nil {
					return err
				}
				resp.Body.Close()
				if resp.StatusCode != http.StatusOK {
					return fmt.Errorf("CONNECT: %d", resp.StatusCode)
				}
				return nil
			}
			if err := connect(); err != nil { // warms the cache
				b.Fatal(err)
			}
			b.SetParallelism(4) // 8 clients on 2 CPUs
			b.ResetTimer()
			start := time.Now()
			b.RunParallel(func(pb *testing.PB) {
				for pb.Next() {
					if err := connect(); err != nil {
						b.Error(err)
						return
					}
				}
			})
			b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "connects/s")
		})
	}
}

// BenchmarkAuthCheck: the proxy's check of one request's Basic
// credentials, alone: a SHA-256 user, a bcrypt user whose password is in
// the cache (an HMAC-SHA-256 and a map look-up instead of bcrypt), and
// the same after each reload of the users (bcrypt at the default cost).
//
//	go test -run '^$' -bench BenchmarkAuthCheck -count 5 ./proxy/
func BenchmarkAuthCheck(b *testing.B) {
	const pass = "s3cret"
	for _, c := range []struct {
		name   string
		secret UserSecret
		reload bool
	}{
		{"sha256", SHA256Secret(sha256.Sum256([]byte(pass))), false},
		{"bcrypt-cached", mustBcryptCost(b, pass, DefaultBcryptCost), false},
		{"bcrypt-reloaded", mustBcryptCost(b, pass, DefaultBcryptCost), true},
	} {
		b.Run(c.name, func(b *testing.B) {
			p, _ := authProxy(b, map[string]UserSecret{"alice": c.secret})
			r, err := http.NewRequest(http.MethodConnect, "http://docs.paths.test:443", nil)
			if err != nil {
				b.Fatal(err)
			}
			r.RemoteAddr = "127.0.0.1:40000"
			r.Header.Set("Proxy-Authorization", "Basic "+base64.StdEncoding.EncodeToString([]byte("alice:"+pass)))
			if p.authOK(r) != authGranted {
				b.Fatal("not granted")
			}
			b.ReportAllocs()
			b.ResetTimer()
			users := map[string]UserSecret{"alice": c.secret}
			for b.Loop() {
				if c.reload {
					b.StopTimer()
					// A new set, as a reload of a changed file makes
					// (SetProxyUserDigests keeps the set of the same
					// users and secrets).
					p.userDigests.Store(newUserSet(users))
					b.StartTimer()
				}
				if p.authOK(r) != authGranted {
					b.Fatal("not granted")
				}
			}
			if n := p.slow.checks.Load(); !c.reload && n > 1 {
				b.Fatalf("%d bcrypt checks, want at most 1", n)
			}
		})
	}
}
