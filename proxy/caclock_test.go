package proxy

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"strings"
	"testing"
	"time"
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

// TestCAClockProblem: a CA that is expired or not yet valid by the
// clock is named as such, with what to do.
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
