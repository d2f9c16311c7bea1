package proxy

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"os"
	"path/filepath"
	"sync"
	"time"
)

// The CA's files in the state directory.
const (
	CACertFile = "ca.pem"
	CAKeyFile  = "ca-key.pem"
)

// mitmCA is the loaded inspection CA.
type mitmCA struct {
	cert tls.Certificate
}

// LoadOrCreateCA returns the inspection CA of the state directory as a TLS
// certificate and its PEM certificate (what clients must trust),
// generating an ECDSA P-256 CA there on first use. The key file is 0600.
func LoadOrCreateCA(dir string) (tls.Certificate, []byte, error) {
	certPath, keyPath := filepath.Join(dir, CACertFile), filepath.Join(dir, CAKeyFile)
	certPEM, cerr := os.ReadFile(certPath)
	keyPEM, kerr := os.ReadFile(keyPath)
	if cerr == nil && kerr == nil {
		c, err := tls.X509KeyPair(certPEM, keyPEM)
		if err != nil {
			return tls.Certificate{}, nil, fmt.Errorf("proxy: inspection CA in %s: %w", dir, err)
		}
		return c, certPEM, nil
	}
	if !errors.Is(cerr, fs.ErrNotExist) && cerr != nil {
		return tls.Certificate{}, nil, fmt.Errorf("proxy: inspection CA: %w", cerr)
	}
	if !errors.Is(kerr, fs.ErrNotExist) && kerr != nil {
		return tls.Certificate{}, nil, fmt.Errorf("proxy: inspection CA: %w", kerr)
	}
	if cerr == nil || kerr == nil {
		return tls.Certificate{}, nil, fmt.Errorf("proxy: inspection CA in %s: only one of %s and %s exists", dir, CACertFile, CAKeyFile)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("proxy: state directory: %w", err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("proxy: inspection CA key: %w", err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("proxy: inspection CA serial: %w", err)
	}
	host, _ := os.Hostname()
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "egressd inspection CA " + host, Organization: []string{"egressd"}},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.AddDate(10, 0, 0),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("proxy: inspection CA: %w", err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("proxy: inspection CA key: %w", err)
	}
	certPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	keyPEM = pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder})
	// The key first, exclusively: two processes racing here must not end
	// up with a certificate that does not match the key.
	kf, err := os.OpenFile(keyPath, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("proxy: inspection CA key: %w", err)
	}
	if _, err := kf.Write(keyPEM); err != nil {
		kf.Close()
		return tls.Certificate{}, nil, fmt.Errorf("proxy: inspection CA key: %w", err)
	}
	if err := kf.Close(); err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("proxy: inspection CA key: %w", err)
	}
	if err := os.WriteFile(certPath, certPEM, 0o644); err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("proxy: inspection CA certificate: %w", err)
	}
	c, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("proxy: inspection CA: %w", err)
	}
	return c, certPEM, nil
}

// ensureCA loads the CA on first use.
func (p *Proxy) ensureCA() (*mitmCA, error) {
	if ca := p.mitm.Load(); ca != nil {
		return ca, nil
	}
	p.caOnce.Lock()
	defer p.caOnce.Unlock()
	if ca := p.mitm.Load(); ca != nil {
		return ca, nil
	}
	if !p.cfg.Inspect {
		return nil, errors.New("proxy: inspection is off")
	}
	cert, _, err := LoadOrCreateCA(p.cfg.StateDir)
	if err != nil {
		return nil, err
	}
	if cert.Leaf == nil {
		if leaf, err := x509.ParseCertificate(cert.Certificate[0]); err == nil {
			cert.Leaf = leaf
		}
	}
	ca := &mitmCA{cert: cert}
	p.mitm.Store(ca)
	return ca, nil
}

// certStore caches the leaf certificates made for inspected hosts. Only
// hosts with host/path rules are inspected, so it stays small. A leaf is
// made anew when it is within leafRenewBefore of its end: goproxy's leaves
// last a year, and the daemon of an appliance may run longer.
type certStore struct {
	mu sync.Mutex // guards m
	m  map[string]*tls.Certificate
}

// leafRenewBefore is how long before a cached leaf expires it is replaced.
const leafRenewBefore = 7 * 24 * time.Hour

func (s *certStore) Fetch(host string, gen func() (*tls.Certificate, error)) (*tls.Certificate, error) {
	s.mu.Lock()
	c := s.m[host]
	s.mu.Unlock()
	if c != nil && (c.Leaf == nil || time.Now().Before(c.Leaf.NotAfter.Add(-leafRenewBefore))) {
		return c, nil
	}
	c, err := gen()
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	if s.m == nil {
		s.m = map[string]*tls.Certificate{}
	}
	if len(s.m) > 4096 {
		clear(s.m)
	}
	s.m[host] = c
	s.mu.Unlock()
	return c, nil
}
