package proxy

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"testing"
	"time"
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
