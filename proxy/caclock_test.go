package proxy

import (
	"bufio"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"log/slog"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"egressd/audit"
	"egressd/policy"
)

// TestCAMadeOnAWrongClock: a gateway without a real-time clock starts at
// 1970 and makes its CA before NTP sets the clock. The CA must still be
// valid once the clock is right (ten years from the build floor), and
// also at the wrong time it was made at; one made on a clock far ahead
// (set back later) is valid from the floor on.
func TestCAMadeOnAWrongClock(t *testing.T) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	floor := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	for _, c := range []struct {
		name  string
		made  time.Time
		valid []time.Time
	}{
		{"1970", time.Unix(10, 0), []time.Time{time.Unix(20, 0), floor, floor.AddDate(9, 11, 0)}},
		{"right", floor.AddDate(0, 1, 0), []time.Time{floor.AddDate(0, 1, 0), floor.AddDate(10, 0, 0)}},
		{"ahead", floor.AddDate(30, 0, 0), []time.Time{floor, floor.AddDate(30, 0, 0), floor.AddDate(39, 0, 0)}},
	} {
		t.Run(c.name, func(t *testing.T) {
			certPEM, err := newCACert(key, c.made, floor)
			if err != nil {
				t.Fatal(err)
			}
			b, _ := pem.Decode(certPEM)
			cert, err := x509.ParseCertificate(b.Bytes)
			if err != nil {
				t.Fatal(err)
			}
			for _, at := range c.valid {
				if at.Before(cert.NotBefore) || at.After(cert.NotAfter) {
					t.Errorf("made at %v: valid %v to %v, not at %v", c.made, cert.NotBefore, cert.NotAfter, at)
				}
			}
			if p := caClockProblem(cert, floor.AddDate(0, 1, 0)); p != "" {
				t.Errorf("made at %v: a problem at the right time: %s", c.made, p)
			}
		})
	}
}

// TestCAClockProblem: a CA that is expired, not yet valid, or ends within
// 30 days by the clock is named as such, with what to do.
func TestCAClockProblem(t *testing.T) {
	cert := &x509.Certificate{NotBefore: time.Unix(0, 0), NotAfter: time.Unix(0, 0).AddDate(10, 0, 0)}
	if p := caClockProblem(cert, time.Date(2026, 12, 5, 0, 0, 0, 0, time.UTC)); !strings.Contains(p, "expired") || !strings.Contains(p, CACertFile) {
		t.Errorf("expired CA: %q", p)
	}
	if p := caClockProblem(cert, time.Unix(-3600*24, 0)); !strings.Contains(p, "not valid before") {
		t.Errorf("not yet valid CA: %q", p)
	}
	if p := caClockProblem(cert, time.Unix(3600, 0)); p != "" {
		t.Errorf("valid CA: %q", p)
	}
	if p := caClockProblem(cert, cert.NotAfter.Add(-31*24*time.Hour)); p != "" {
		t.Errorf("CA ending in 31 days: %q", p)
	}
	if p := caClockProblem(cert, cert.NotAfter.Add(-29*24*time.Hour-time.Hour)); !strings.Contains(p, "expires in 29 days") || !strings.Contains(p, "restart egressd") {
		t.Errorf("CA ending in 29 days: %q", p)
	}
}

// TestCertStoreDropsLeafNotValidNow: a leaf made while the clock was
// wrong (before NTP set it forward, or while it ran ahead and was set
// back) is not served from the cache once the clock says it is not
// valid: a new one is made.
func TestCertStoreDropsLeafNotValidNow(t *testing.T) {
	now := time.Date(2026, 12, 5, 0, 0, 0, 0, time.UTC)
	leafAt := func(made time.Time) *tls.Certificate {
		// goproxy's leaves: 30 days back, a year on.
		return &tls.Certificate{Leaf: &x509.Certificate{NotBefore: made.Add(-30 * 24 * time.Hour), NotAfter: made.Add(365 * 24 * time.Hour)}}
	}
	for _, c := range []struct {
		name   string
		made   time.Time
		remade bool
	}{
		{"made-now", now, false},
		{"made-at-1970", time.Unix(0, 0), true},
		{"made-a-year-ahead", now.AddDate(1, 0, 0), true},
		{"made-a-day-ago", now.Add(-24 * time.Hour), false},
	} {
		t.Run(c.name, func(t *testing.T) {
			clock := c.made
			s := &certStore{now: func() time.Time { return clock }}
			gens := 0
			gen := func() (*tls.Certificate, error) { gens++; return leafAt(clock), nil }
			if _, err := s.Fetch("h.example", gen); err != nil {
				t.Fatal(err)
			}
			clock = now
			got, err := s.Fetch("h.example", gen)
			if err != nil {
				t.Fatal(err)
			}
			if want := map[bool]int{false: 1, true: 2}[c.remade]; gens != want {
				t.Errorf("leaves made: %d, want %d", gens, want)
			}
			if now.Before(got.Leaf.NotBefore) || now.After(got.Leaf.NotAfter) {
				t.Errorf("served a leaf valid %v to %v at %v", got.Leaf.NotBefore, got.Leaf.NotAfter, now)
			}
		})
	}
}

// setClock sets the leaf cache's clock, under its lock (a test changes it
// while the proxy serves).
func (s *certStore) setClock(now func() time.Time) {
	s.mu.Lock()
	s.now = now
	s.mu.Unlock()
}

// TestInspectOnClockBehindFloor: a gateway without a real-time clock
// starts at 1970, makes its CA then (session 21: valid 1970 to ten years
// after the floor) and inspects before NTP sets its clock. A client whose
// own clock is right must accept the leaf the proxy makes for the host:
// goproxy's leaves were dated from the gateway's clock (valid 1969 to
// 1971) and every such handshake failed. Once the clock is right, the
// leaf made at 1970 is not served again: a leaf of a year is made.
func TestInspectOnClockBehindFloor(t *testing.T) {
	gwClock := time.Unix(1000, 0) // the gateway's clock, 1970
	state := t.TempDir()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	caPEM, err := newCACert(key, gwClock, audit.BuildFloor())
	if err != nil {
		t.Fatal(err)
	}
	kder, _ := x509.MarshalECPrivateKey(key)
	if err := os.WriteFile(filepath.Join(state, CAKeyFile), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(state, CACertFile), caPEM, 0o644); err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	addr, _, tlsPort, _, p := loopbackExplicitProxy(t, `version: 1
mode: enforce
rules:
  - name: docs
    to: ["docs.paths.test/public/*"]
    ports: [%d/tcp, %d/tcp]
`, func(c *Config) { c.StateDir = state }, nil, nil)
	store := p.certs
	store.setClock(func() time.Time { return gwClock })

	// leaf makes an inspected connection of a client with the right clock
	// and returns the leaf it was given, or the handshake's error; the
	// connection asks for a path the policy denies (decided by the
	// proxy, which needs no origin) and must get the 403.
	leaf := func() (*x509.Certificate, error) {
		t.Helper()
		_, tc := inspectDocs(t, addr, tlsPort, pool)
		if err := tc.Handshake(); err != nil {
			return nil, err
		}
		fmt.Fprintf(tc, "GET /private/x HTTP/1.1\r\nHost: docs.paths.test:%d\r\n\r\n", tlsPort)
		resp, err := http.ReadResponse(bufio.NewReader(tc), nil)
		if err != nil || resp.StatusCode != http.StatusForbidden {
			t.Errorf("denied path in the inspected connection: %v %v, want 403", resp, err)
		}
		return tc.ConnectionState().PeerCertificates[0], nil
	}
	before, err := leaf()
	if err != nil {
		t.Fatalf("inspected handshake while the gateway's clock is at 1970: %v", err)
	}
	if !before.NotBefore.Before(gwClock) {
		t.Errorf("leaf made at 1970 valid from %v: not at the gateway's own clock", before.NotBefore)
	}
	// NTP sets the clock: the long leaf is not served again.
	store.setClock(time.Now)
	after, err := leaf()
	if err != nil {
		t.Fatalf("inspected handshake once the clock is right: %v", err)
	}
	if after.Equal(before) || after.NotAfter.Sub(after.NotBefore) > leafBack+leafOn {
		t.Errorf("leaf served once the clock is right: valid %v to %v, want a new one of at most %v", after.NotBefore, after.NotAfter, leafBack+leafOn)
	}
}

// TestSignLeafOnWrongClock: a host's leaf made while the gateway's clock
// is behind the floor verifies at a client whose clock is right (any time
// from the floor to the CA's end), and at the gateway's wrong time; made
// on a right clock it lasts a year, as before. Either is refused for
// another host, and after the CA's end.
func TestSignLeafOnWrongClock(t *testing.T) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	floor := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	right := floor.AddDate(1, 0, 0)
	for _, c := range []struct {
		name            string
		caMade, made    time.Time
		valid, notValid []time.Time
	}{
		{"1970", time.Unix(10, 0), time.Unix(1000, 0),
			[]time.Time{time.Unix(1000, 0), floor, right, floor.AddDate(9, 11, 0)},
			[]time.Time{time.Unix(-40*24*3600, 0), floor.AddDate(10, 0, 1)}},
		{"1970-ca-right", right, time.Unix(1000, 0),
			[]time.Time{right, right.AddDate(9, 0, 0)},
			[]time.Time{right.AddDate(11, 0, 0)}},
		{"right", right, right,
			[]time.Time{right.Add(-29 * 24 * time.Hour), right, right.Add(364 * 24 * time.Hour)},
			[]time.Time{right.Add(-31 * 24 * time.Hour), right.Add(366 * 24 * time.Hour)}},
	} {
		t.Run(c.name, func(t *testing.T) {
			caPEM, err := newCACert(key, c.caMade, floor)
			if err != nil {
				t.Fatal(err)
			}
			b, _ := pem.Decode(caPEM)
			ca := tls.Certificate{Certificate: [][]byte{b.Bytes}, PrivateKey: key}
			caCert, _ := x509.ParseCertificate(b.Bytes)
			roots := x509.NewCertPool()
			roots.AddCert(caCert)
			leaf, err := signLeaf(ca, "docs.paths.test", c.made, floor)
			if err != nil {
				t.Fatal(err)
			}
			verify := func(name string, at time.Time) error {
				_, err := leaf.Leaf.Verify(x509.VerifyOptions{DNSName: name, Roots: roots, CurrentTime: at})
				return err
			}
			for _, at := range c.valid {
				if err := verify("docs.paths.test", at); err != nil {
					t.Errorf("made at %v, client at %v: %v", c.made, at, err)
				}
				if verify("other.paths.test", at) == nil {
					t.Errorf("made at %v: valid for another host", c.made)
				}
			}
			for _, at := range c.notValid {
				if verify("docs.paths.test", at) == nil {
					t.Errorf("made at %v: valid at %v (leaf %v to %v)", c.made, at, leaf.Leaf.NotBefore, leaf.Leaf.NotAfter)
				}
			}
		})
	}
}

// TestInspectCAWatched: egressd runs for months, and a CA that ends while
// it runs fails every inspected connection; it was checked only when the
// first inspected connection loaded it. With inspection on, Run loads the
// CA at the start, says when it ends within 30 days, checks again each day
// (caCheckEvery), and egress_proxy_inspect_ca_expiry_timestamp_seconds is
// its end (0 with inspection off).
func TestInspectCAWatched(t *testing.T) {
	state := t.TempDir()
	ca, _, err := LoadOrCreateCA(state)
	if err != nil {
		t.Fatal(err)
	}
	caCert, err := x509.ParseCertificate(ca.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	end := caCert.NotAfter
	eng := docsPublicEngine(t)
	off := prometheus.NewRegistry()
	if _, err := New(Config{}, Deps{Policy: policy.NewStore(eng), Registerer: off}); err != nil {
		t.Fatal(err)
	}
	if v := caExpiry(t, off); v != 0 {
		t.Errorf("inspection off: CA expiry %v, want 0", v)
	}

	var mu sync.Mutex
	clock := end.Add(-10 * 24 * time.Hour)
	setClock := func(at time.Time) { mu.Lock(); clock = at; mu.Unlock() }
	reg := prometheus.NewRegistry()
	p, logs := inspectingProxy(t, state, eng, reg)
	p.certs.setClock(func() time.Time { mu.Lock(); defer mu.Unlock(); return clock })
	was := caCheckEvery
	caCheckEvery = time.Millisecond
	cancel, ran := runReady(t, p)
	defer func() { cancel(); <-ran; caCheckEvery = was }()

	// waitLog waits (10 s at most) for a line that holds all of want.
	waitLog := func(want ...string) {
		t.Helper()
		for range 1000 {
			for _, l := range logs.lines() {
				n := 0
				for _, w := range want {
					if strings.Contains(l, w) {
						n++
					}
				}
				if n == len(want) {
					return
				}
			}
			time.Sleep(10 * time.Millisecond)
		}
		t.Fatalf("no log line with %q:\n%s", want, strings.Join(logs.lines(), "\n"))
	}
	waitLog("level=WARN", "inspection CA certificate ca.pem expires in 10 days")
	if v := caExpiry(t, reg); v != float64(end.Unix()) {
		t.Errorf("CA expiry %v, want %d (no inspected connection yet)", v, end.Unix())
	}
	// The daemon runs on past the CA's end.
	setClock(end.Add(time.Hour))
	waitLog("level=WARN", "inspection CA certificate ca.pem expired")
}

// TestInspectCALoadFails: with inspection on, a CA that cannot be loaded
// at the start (here ca.pem without its key) fails every inspected
// connection. The error line says so, but the expiry metric stayed 0, as
// with inspection off, so the README's alert on it never fired. It is now
// 1 (long past) while no CA loads; the proxy tries again at each check,
// and once the CA is there the metric is its end.
func TestInspectCALoadFails(t *testing.T) {
	state := t.TempDir()
	if err := os.WriteFile(filepath.Join(state, CACertFile), []byte("not a certificate\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	eng := docsPublicEngine(t)
	reg := prometheus.NewRegistry()
	p, logs := inspectingProxy(t, state, eng, reg)
	expiry := func() float64 { t.Helper(); return caExpiry(t, reg) }
	was := caCheckEvery
	caCheckEvery = 5 * time.Millisecond
	cancel, ran := runReady(t, p)
	defer func() { cancel(); <-ran; caCheckEvery = was }()

	waitFor := func(what string, ok func() bool) {
		t.Helper()
		for range 1000 {
			if ok() {
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
		t.Fatalf("%s; metric %v; log:\n%s", what, expiry(), strings.Join(logs.lines(), "\n"))
	}
	waitFor("no error line for the CA", func() bool {
		return slices.ContainsFunc(logs.lines(), func(l string) bool {
			return strings.Contains(l, "level=ERROR") && strings.Contains(l, "inspection CA cannot be loaded")
		})
	})
	waitFor("CA expiry metric is not 1 while no CA loads", func() bool { return expiry() == 1 })

	// The operator removes the broken file: the next check makes a CA.
	if err := os.Remove(filepath.Join(state, CACertFile)); err != nil {
		t.Fatal(err)
	}
	waitFor("CA expiry metric is not the new CA's end", func() bool { return expiry() > float64(time.Now().Unix()) })
}

// TestInspectCALoadedLineAtLoad: a CA that could not be loaded at the start
// and loads later at an inspected connection (ensureCA) is told then, once:
// the line "inspection CA loaded" came only from the day's check, up to a
// day after the CA was in use (and not at all while the check had not come),
// so the log said the CA failed, then nothing, while inspection worked.
func TestInspectCALoadedLineAtLoad(t *testing.T) {
	state := t.TempDir()
	if err := os.WriteFile(filepath.Join(state, CACertFile), []byte("not a certificate\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	eng := docsPublicEngine(t)
	p, logs := inspectingProxy(t, state, eng, prometheus.NewRegistry())
	was := caCheckEvery
	caCheckEvery = time.Hour // no day's check during the test
	cancel, ran := runReady(t, p)
	defer func() { cancel(); <-ran; caCheckEvery = was }()
	count := func(s string) int {
		n := 0
		for _, l := range logs.lines() {
			if strings.Contains(l, s) {
				n++
			}
		}
		return n
	}
	for i := 0; count("inspection CA cannot be loaded") == 0; i++ {
		if i == 1000 {
			t.Fatalf("no error line for the CA:\n%s", strings.Join(logs.lines(), "\n"))
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := os.Remove(filepath.Join(state, CACertFile)); err != nil {
		t.Fatal(err)
	}
	// Two inspected connections: the first loads the CA.
	for range 2 {
		if _, err := p.ensureCA(); err != nil {
			t.Fatal(err)
		}
	}
	if n := count("inspection CA loaded"); n != 1 {
		t.Fatalf("%d lines say the CA loaded, want 1:\n%s", n, strings.Join(logs.lines(), "\n"))
	}
	if e := p.caExpiry(); e <= float64(time.Now().Unix()) {
		t.Errorf("CA expiry metric %v after the CA loaded at a connection, want its end", e)
	}
}

// docsPublicEngine is an enforce-mode policy whose one rule allows
// docs.paths.test/public/* on 443/tcp: a host inspection reads.
func docsPublicEngine(t *testing.T) *policy.Engine {
	t.Helper()
	eng, err := policy.Compile("p.yaml", []byte("version: 1\nmode: enforce\nrules:\n  - name: docs\n    to: [\"docs.paths.test/public/*\"]\n    ports: [443/tcp]\n"))
	if err != nil {
		t.Fatal(err)
	}
	return eng
}

// inspectingProxy is a proxy with inspection on, its CA in state, an
// explicit listener on loopback and policy eng, its metrics registered
// with reg; not run. Its log lines are in the buffer it returns.
func inspectingProxy(t *testing.T, state string, eng *policy.Engine, reg prometheus.Registerer) (*Proxy, *lockedBuf) {
	t.Helper()
	logs := &lockedBuf{}
	p, err := New(Config{Inspect: true, StateDir: state, ExplicitAddr: "127.0.0.1:0", OwnAddrs: []netip.Addr{}},
		Deps{Policy: policy.NewStore(eng), Logger: slog.New(slog.NewTextHandler(logs, nil)), Registerer: reg})
	if err != nil {
		t.Fatal(err)
	}
	return p, logs
}

// caExpiry is the value of egress_proxy_inspect_ca_expiry_timestamp_seconds
// in g.
func caExpiry(t *testing.T, g prometheus.Gatherer) float64 {
	t.Helper()
	mfs, err := g.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == "egress_proxy_inspect_ca_expiry_timestamp_seconds" {
			return mf.GetMetric()[0].GetGauge().GetValue()
		}
	}
	t.Fatal("no egress_proxy_inspect_ca_expiry_timestamp_seconds")
	return 0
}
