package proxy

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"runtime"
	"strings"
	"testing"
	"time"

	"egressd/policy"
)

// TestSignLeafBehindFloorAppleLimit: macOS and iOS refuse a TLS server
// certificate valid from 1 July 2019 on (by its NotBefore) that lasts
// more than 825 days, under a root the user added too (Apple's
// "Requirements for trusted certificates in iOS 13 and macOS 10.15").
// A gateway without a real-time clock seldom starts at 1970: systemd sets
// the clock to its own build time, OpenWrt and fake-hwclock to the last
// one saved, months or years behind egressd's floor. A leaf made then was
// valid from that clock to the CA's end, ten years: every Apple client
// refused it. It must stay within 825 days and still be valid at the
// right time (from the floor on).
func TestSignLeafBehindFloorAppleLimit(t *testing.T) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	floor := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	appleFrom := time.Date(2019, 7, 1, 0, 0, 0, 0, time.UTC)
	for _, made := range []time.Time{
		floor.Add(-180 * 24 * time.Hour), // systemd's build time
		floor.Add(-time.Hour),
		floor.AddDate(-1, 0, 0),
	} {
		caPEM, err := newCACert(key, made, floor)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := pem.Decode(caPEM)
		caCert, _ := x509.ParseCertificate(b.Bytes)
		ca := tls.Certificate{Certificate: [][]byte{b.Bytes}, PrivateKey: key, Leaf: caCert}
		roots := x509.NewCertPool()
		roots.AddCert(caCert)
		leaf, err := signLeaf(ca, "docs.paths.test", made, floor)
		if err != nil {
			t.Fatal(err)
		}
		l := leaf.Leaf
		if !l.NotBefore.Before(appleFrom) && l.NotAfter.Sub(l.NotBefore) > 825*24*time.Hour {
			t.Errorf("made at %v: valid %v to %v, %d days: macOS and iOS refuse more than 825", made, l.NotBefore, l.NotAfter, int(l.NotAfter.Sub(l.NotBefore)/(24*time.Hour)))
		}
		for _, at := range []time.Time{made, floor, floor.AddDate(0, 6, 0)} {
			if _, err := l.Verify(x509.VerifyOptions{DNSName: "docs.paths.test", Roots: roots, CurrentTime: at}); err != nil {
				t.Errorf("made at %v, client at %v: %v", made, at, err)
			}
		}
	}
}

// TestLeafCacheOneLeafPerHost: host names are matched without regard to
// case, by the policy and by every client, so a CONNECT to
// "DOCS.paths.test" is inspected as docs.paths.test is. The leaf cache
// was keyed on the name as the client spelled it: each spelling (2^15 of
// them for docs.paths.test) made and kept a leaf of its own, so a client
// could make the proxy sign a leaf at each connection and fill the cache
// (emptied whole at 4096 leaves, those of every other host with it) even
// under a policy that inspects one host. A trailing dot is the same host
// too. And with many hosts, each is
// given a leaf for itself, never one made for another.
func TestLeafCacheOneLeafPerHost(t *testing.T) {
	state := t.TempDir()
	ca, caPEM, err := LoadOrCreateCA(state)
	if err != nil {
		t.Fatal(err)
	}
	_ = ca
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(caPEM)
	p := &Proxy{cfg: Config{Inspect: true, StateDir: state}, certs: &certStore{}}
	serve := func(hostport, name string) *x509.Certificate {
		t.Helper()
		c, err := p.mitmTLSConfig(hostport, nil)
		if err != nil {
			t.Fatalf("%s: %v", hostport, err)
		}
		leaf := c.Certificates[0].Leaf
		if _, err := leaf.Verify(x509.VerifyOptions{DNSName: name, Roots: roots}); err != nil {
			t.Errorf("%s: leaf for %v %v does not verify for %s: %v", hostport, leaf.DNSNames, leaf.IPAddresses, name, err)
		}
		return leaf
	}
	first := serve("docs.paths.test:443", "docs.paths.test")
	// A name with a trailing dot (the absolute form, CONNECT docs.paths.test.:443)
	// is the same host: its leaf named only "docs.paths.test.", which
	// clients that drop the dot before checking (curl, OpenSSL) refuse.
	for _, h := range []string{"DOCS.paths.test", "Docs.Paths.Test", "docs.PATHS.test", "DOCS.PATHS.TEST", "docs.paths.test.", "Docs.Paths.Test."} {
		if l := serve(h+":443", h); !l.Equal(first) {
			t.Errorf("%s: a leaf of its own (%v), not docs.paths.test's", h, l.DNSNames)
		}
	}
	p.certs.mu.Lock()
	n := len(p.certs.m)
	p.certs.mu.Unlock()
	if n != 1 {
		t.Errorf("%d leaves cached for one host, want 1", n)
	}
	for i := range 300 {
		var h string
		switch i % 3 {
		case 0:
			h = fmt.Sprintf("h%d.paths.test", i)
		case 1:
			h = fmt.Sprintf("192.0.2.%d", i%250+1)
		default:
			h = fmt.Sprintf("[2001:db8::%x]", i)
		}
		name := strings.Trim(h, "[]")
		for range 2 { // made, then from the cache
			serve(net.JoinHostPort(name, "443"), name)
		}
	}
}

// TestInspectCAWatchStops: the goroutine that checks the CA each day ends
// with the proxy, whether its context is cancelled or it is closed: Run
// waits for it, and none is left behind.
func TestInspectCAWatchStops(t *testing.T) {
	eng := docsPublicEngine(t)
	watching := func() int {
		buf := make([]byte, 1<<20)
		return strings.Count(string(buf[:runtime.Stack(buf, true)]), "proxy.(*Proxy).watchCA")
	}
	for _, stop := range []string{"cancel", "close"} {
		p, err := New(Config{Inspect: true, StateDir: t.TempDir(), ExplicitAddr: "127.0.0.1:0", OwnAddrs: []netip.Addr{}},
			Deps{Policy: policy.NewStore(eng), Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
		if err != nil {
			t.Fatal(err)
		}
		cancel, ran := runReady(t, p)
		// The CA is loaded by the watch (the metric's source), no
		// inspected connection needed.
		for i := 0; p.mitm.Load() == nil && i < 1000; i++ {
			time.Sleep(10 * time.Millisecond)
		}
		if p.mitm.Load() == nil {
			t.Fatalf("%s: CA not loaded by the watch", stop)
		}
		if n := watching(); n != 1 {
			t.Errorf("%s: %d CA watches running, want 1", stop, n)
		}
		if stop == "cancel" {
			cancel()
		} else {
			p.Close()
		}
		select {
		case <-ran:
		case <-time.After(10 * time.Second):
			t.Fatalf("%s: Run did not return", stop)
		}
		cancel()
		if n := watching(); n != 0 {
			t.Errorf("%s: %d CA watches left after Run returned", stop, n)
		}
	}
}
