package proxy

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"egressd/audit"
	"egressd/internal/atomicfile"
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
	// The temporary files of a creation a kill cut short; not one of a
	// minute or younger, which may be another process's (egressd ca
	// export and egressd run may create the CA at once).
	for _, p := range []string{keyPath, certPath} {
		atomicfile.RemoveStaleTemps(p, time.Now().Add(-time.Minute))
	}
	certPEM, cerr := readCAFile(certPath)
	keyPEM, kerr := readCAFile(keyPath)
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
	if cerr == nil {
		return tls.Certificate{}, nil, fmt.Errorf("proxy: inspection CA in %s: %s exists without its key %s; remove it to make a new CA (clients must then trust the new one)", dir, CACertFile, CAKeyFile)
	}
	var key *ecdsa.PrivateKey
	if kerr == nil {
		// The key alone: its creation was cut short (a crash, a full
		// disk) before the certificate was written. No client can trust
		// a certificate that was never written, so one is made for the
		// key, rather than refusing to start until someone deletes it.
		var err error
		if key, err = parseCAKey(keyPEM); err != nil {
			return tls.Certificate{}, nil, fmt.Errorf("proxy: inspection CA key %s: %w; remove it to make a new CA", keyPath, err)
		}
	} else {
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return tls.Certificate{}, nil, fmt.Errorf("proxy: state directory: %w", err)
		}
		var err error
		if key, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader); err != nil {
			return tls.Certificate{}, nil, fmt.Errorf("proxy: inspection CA key: %w", err)
		}
		kder, err := x509.MarshalECPrivateKey(key)
		if err != nil {
			return tls.Certificate{}, nil, fmt.Errorf("proxy: inspection CA key: %w", err)
		}
		keyPEM = pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kder})
		// The key first, whole and exclusively: written to a temporary
		// file and linked into place, so two processes racing here do
		// not end up with a certificate that does not match the key, and
		// a write cut short leaves no torn key behind.
		if err := atomicfile.WriteFile(keyPath, keyPEM, 0o600, atomicfile.Exclusive); err != nil {
			return tls.Certificate{}, nil, fmt.Errorf("proxy: inspection CA key: %w", err)
		}
	}
	certPEM, err := newCACert(key, time.Now(), audit.BuildFloor())
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("proxy: inspection CA: %w", err)
	}
	if err := atomicfile.WriteFile(certPath, certPEM, 0o644, atomicfile.Replace); err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("proxy: inspection CA certificate: %w", err)
	}
	c, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("proxy: inspection CA: %w", err)
	}
	return c, certPEM, nil
}

// maxCAFile bounds what is read of a CA file: a certificate or key of a
// few KiB, a chain of a few.
const maxCAFile = 1 << 20

// readCAFile reads a CA file, which must be a regular file (a link to one
// is followed: an operator may keep the CA elsewhere) of at most
// maxCAFile bytes. `egressd ca export` runs as root in a directory the
// service's user owns, who can put anything under these names: a FIFO
// would hang the export, a link to /dev/zero fill its memory, and the
// open of a device is an act of its own (a watchdog starts counting, a
// serial line raises DTR). So the file is found without being opened
// (O_PATH), checked, and only then opened, through that descriptor
// (/proc/self/fd): what was checked is what is read.
func readCAFile(path string) ([]byte, error) {
	pfd, err := unix.Open(path, unix.O_PATH|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, &fs.PathError{Op: "open", Path: path, Err: err}
	}
	defer unix.Close(pfd)
	var st unix.Stat_t
	if err := unix.Fstat(pfd, &st); err != nil {
		return nil, &fs.PathError{Op: "stat", Path: path, Err: err}
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return nil, fmt.Errorf("%s: not a regular file (%s)", path, kindOf(st.Mode))
	}
	if st.Size > maxCAFile {
		return nil, fmt.Errorf("%s: %d bytes, more than a CA file's %d", path, st.Size, maxCAFile)
	}
	f, err := os.OpenFile("/proc/self/fd/"+strconv.Itoa(pfd), os.O_RDONLY, 0)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, maxCAFile+1))
	if err == nil && len(b) > maxCAFile {
		err = fmt.Errorf("%s: more than a CA file's %d bytes", path, maxCAFile)
	}
	return b, err
}

// kindOf names the file type of a stat mode, for readCAFile's error.
func kindOf(mode uint32) string {
	switch mode & unix.S_IFMT {
	case unix.S_IFDIR:
		return "a directory"
	case unix.S_IFIFO:
		return "a FIFO"
	case unix.S_IFCHR:
		return "a character device"
	case unix.S_IFBLK:
		return "a block device"
	case unix.S_IFSOCK:
		return "a socket"
	}
	return fmt.Sprintf("type %#o", mode&unix.S_IFMT)
}

// parseCAKey reads the CA's PEM key file.
func parseCAKey(keyPEM []byte) (*ecdsa.PrivateKey, error) {
	b, _ := pem.Decode(keyPEM)
	if b == nil || b.Type != "EC PRIVATE KEY" {
		return nil, errors.New("not a PEM EC private key")
	}
	return x509.ParseECPrivateKey(b.Bytes)
}

// newCACert makes a self-signed CA certificate for key, valid for ten
// years, and returns it as PEM. The clock (now) may be wrong: a gateway
// without a real-time clock starts at 1970 and may make its CA before NTP
// sets the clock, and a CA valid 1970 to 1980 would be expired for good a
// minute later, yet kept and handed to clients. So the ten years count
// from the later of now and floor (a time no correct clock is before,
// audit.BuildFloor), and the validity starts an hour before the earlier
// of them: valid at the wrong time it was made at, and at the right one
// (a clock that ran ahead and is set back comes back to at least floor).
func newCACert(key *ecdsa.PrivateKey, now, floor time.Time) ([]byte, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, err
	}
	host, _ := os.Hostname()
	from, to := now, now
	if floor.Before(from) {
		from = floor
	}
	if floor.After(to) {
		to = floor
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "egressd inspection CA " + host, Organization: []string{"egressd"}},
		NotBefore:             from.Add(-time.Hour),
		NotAfter:              to.AddDate(10, 0, 0),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), nil
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
		p.caFailed.Store(true)
		return nil, err
	}
	if p.caFailed.Swap(false) {
		// The error line at the start said inspection fails: say, once,
		// when it works again (at a day's check or a connection).
		p.log.Info("proxy: inspection CA loaded", "ca", filepath.Join(p.cfg.StateDir, CACertFile))
	}
	if cert.Leaf == nil {
		if leaf, err := x509.ParseCertificate(cert.Certificate[0]); err == nil {
			cert.Leaf = leaf
		}
	}
	ca := &mitmCA{cert: cert}
	p.mitm.Store(ca)
	p.checkCA(ca)
	return ca, nil
}

// caCheckEvery is how often a running proxy checks its CA against the
// clock (tests shorten it).
var caCheckEvery = 24 * time.Hour

// caExpiryWarn is how long before the CA's end its check warns of it.
const caExpiryWarn = 30 * 24 * time.Hour

// watchCA, with inspection on, loads the CA when Run starts (rather than
// at the first inspected connection: a problem is told at the start, and
// the CA's end is a metric from then on) and checks it each caCheckEvery
// until the proxy stops: egressd may run for months, and a CA that ends
// while it runs fails every inspected connection. A CA that cannot be
// loaded is tried again at each check (an inspected connection tries too).
func (p *Proxy) watchCA(ctx context.Context) {
	ca, err := p.ensureCA()
	if err != nil {
		p.log.Error("proxy: inspection CA cannot be loaded; inspected connections fail", audit.LogError, err.Error())
	}
	t := time.NewTicker(caCheckEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-p.done:
			return
		case <-t.C:
			if ca != nil {
				p.checkCA(ca)
				continue
			}
			ca, _ = p.ensureCA()
		}
	}
}

// checkCA logs what is wrong with the CA at the proxy's clock, if anything.
func (p *Proxy) checkCA(ca *mitmCA) {
	if problem := CAClockProblem(ca.cert, p.certs.clock()); problem != "" {
		p.log.Warn("proxy: " + problem)
	}
}

// caExpiry is the CA's end in Unix seconds; 1 (long past, so that an
// alert on an end near or past fires) when inspection is on and the last
// try to load the CA failed; 0 when no CA is loaded otherwise (inspection
// off, or not loaded yet).
func (p *Proxy) caExpiry() float64 {
	if ca := p.mitm.Load(); ca != nil && ca.cert.Leaf != nil {
		return float64(ca.cert.Leaf.NotAfter.Unix())
	}
	if p.caFailed.Load() {
		return 1
	}
	return 0
}

// certStore caches the leaf certificates made for inspected hosts. Only
// hosts with host/path rules are inspected, so it stays small. A leaf is
// made anew when it is within leafRenewBefore of its end: leaves last a
// year, and the daemon of an appliance may run longer.
//
// A leaf is also made anew when the clock says it is not valid (yet): one
// made while the clock ran ahead and was then set back would otherwise be
// served until it expired, and every client would refuse it. A leaf made
// while the clock was behind the floor (signLeaf: valid to the CA's end)
// is served only while it still is.
type certStore struct {
	mu  sync.Mutex // guards m and now
	m   map[string]*tls.Certificate
	now func() time.Time // the clock; nil is time.Now (tests set it)
}

// leafRenewBefore is how long before a cached leaf expires it is replaced.
const leafRenewBefore = 7 * 24 * time.Hour

// A host's leaf is valid from leafBack before it is made (for clients
// whose clock is a little behind) to leafOn after, as goproxy's were.
const (
	leafBack = 30 * 24 * time.Hour
	leafOn   = 365 * 24 * time.Hour
)

// macOS and iOS refuse a TLS server certificate dated (NotBefore) from
// appleLifeFrom on that is valid for more than 825 days, under a root the
// user added too (Apple, "Requirements for trusted certificates in iOS 13
// and macOS 10.15"). A leaf made while the clock is behind the floor lasts
// at most leafMaxLife, a few days less, when its NotBefore is that late:
// the clock of a gateway without a real-time clock is seldom 1970 (systemd
// sets it to its own build time, fake-hwclock and OpenWrt to the last one
// saved), and a leaf valid from then to the CA's end, ten years, was
// refused by every Apple client.
var appleLifeFrom = time.Date(2019, 7, 1, 0, 0, 0, 0, time.UTC)

const leafMaxLife = 820 * 24 * time.Hour

// leaf returns the cached leaf for host (a host name in lower case, or
// an address, without port), signed by ca, making one when none is fresh.
func (s *certStore) leaf(ca tls.Certificate, host string) (*tls.Certificate, error) {
	return s.Fetch(host, func() (*tls.Certificate, error) {
		return signLeaf(ca, host, s.clock(), audit.BuildFloor())
	})
}

// Fetch implements goproxy.CertStorage.
func (s *certStore) Fetch(host string, gen func() (*tls.Certificate, error)) (*tls.Certificate, error) {
	now := s.clock()
	s.mu.Lock()
	c := s.m[host]
	s.mu.Unlock()
	if c != nil && (c.Leaf == nil || leafFresh(c.Leaf, now, audit.BuildFloor())) {
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

func (s *certStore) clock() time.Time {
	s.mu.Lock()
	now := s.now
	s.mu.Unlock()
	if now != nil {
		return now()
	}
	return time.Now()
}

// leafFresh says whether a cached leaf may be served at now: valid
// already, not within leafRenewBefore of its end, and, if it lasts
// longer than a leaf made on a right clock (one made while the clock was
// behind floor), only while the clock is still behind floor.
func leafFresh(leaf *x509.Certificate, now, floor time.Time) bool {
	if leaf.NotAfter.Sub(leaf.NotBefore) > leafBack+leafOn && !now.Before(floor) {
		return false
	}
	return !now.Before(leaf.NotBefore) && now.Before(leaf.NotAfter.Add(-leafRenewBefore))
}

// signLeaf makes the certificate for an inspected host, signed by ca, at
// now: valid from leafBack before now to leafOn after. goproxy's signer
// (which this replaces) dates it from time.Now() alone, so on a gateway
// without a real-time clock, before NTP has set it, the leaf was valid
// 1969 to 1971 and every client whose own clock is right refused it. A
// clock before floor (audit.BuildFloor) is wrong, and the right time is
// some time after floor, how long after is not known: the leaf then lasts
// until the CA's end, or leafMaxLife from its start when Apple's clients
// would refuse a longer one (certStore serves it only until the clock is
// right).
func signLeaf(ca tls.Certificate, host string, now, floor time.Time) (*tls.Certificate, error) {
	caCert := ca.Leaf
	if caCert == nil {
		var err error
		if caCert, err = x509.ParseCertificate(ca.Certificate[0]); err != nil {
			return nil, err
		}
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: host, Organization: []string{"egressd inspection"}},
		NotBefore:             now.Add(-leafBack),
		NotAfter:              now.Add(leafOn),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		BasicConstraintsValid: true,
	}
	if now.Before(floor) && caCert.NotAfter.After(tmpl.NotAfter) {
		tmpl.NotAfter = caCert.NotAfter
		if !tmpl.NotBefore.Before(appleLifeFrom) && tmpl.NotAfter.Sub(tmpl.NotBefore) > leafMaxLife {
			tmpl.NotAfter = tmpl.NotBefore.Add(leafMaxLife)
		}
	}
	if ip := net.ParseIP(host); ip != nil {
		tmpl.IPAddresses = []net.IP{ip}
	} else {
		tmpl.DNSNames = []string{host}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, ca.PrivateKey)
	if err != nil {
		return nil, err
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &tls.Certificate{Certificate: append([][]byte{der}, ca.Certificate...), PrivateKey: key, Leaf: leaf}, nil
}

// CAClockProblem says what is wrong with the CA certificate (as
// LoadOrCreateCA returns it) at now, or "" when it is valid or cannot be
// read; see caClockProblem.
func CAClockProblem(ca tls.Certificate, now time.Time) string {
	leaf := ca.Leaf
	if leaf == nil && len(ca.Certificate) > 0 {
		leaf, _ = x509.ParseCertificate(ca.Certificate[0])
	}
	if leaf == nil {
		return ""
	}
	return caClockProblem(leaf, now)
}

// caClockProblem says what is wrong with the CA certificate at now, or ""
// when it is valid and ends more than caExpiryWarn later: one that ends
// within caExpiryWarn, expired, or not valid yet, by the clock. Either
// the clock is wrong (a gateway without a real-time clock before NTP has
// set it: the CA is right again once it has) or the CA was made on a
// wrong clock by an egressd before session 21, which dated it from that
// clock. The CA is not made anew here: clients trust this one.
func caClockProblem(cert *x509.Certificate, now time.Time) string {
	const fix = "; if the clock is right, remove " + CACertFile + " (keep " + CAKeyFile + ") and restart egressd: it makes a new certificate for the same key, which `egressd ca export` prints for clients to trust again"
	switch {
	case now.After(cert.NotAfter):
		return fmt.Sprintf("the inspection CA certificate %s expired %s (valid %s to %s; clock %s): clients refuse every inspected connection%s",
			CACertFile, cert.NotAfter.UTC().Format(time.RFC3339), cert.NotBefore.UTC().Format(time.RFC3339), cert.NotAfter.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339), fix)
	case now.Before(cert.NotBefore):
		return fmt.Sprintf("the inspection CA certificate %s is not valid before %s (clock %s): the clock is behind (no real-time clock, NTP has not set it yet?), or the CA was made on a clock that ran ahead%s",
			CACertFile, cert.NotBefore.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339), fix)
	case cert.NotAfter.Sub(now) < caExpiryWarn:
		return fmt.Sprintf("the inspection CA certificate %s expires in %d days, %s (clock %s): clients will refuse every inspected connection from then on%s",
			CACertFile, int(cert.NotAfter.Sub(now)/(24*time.Hour)), cert.NotAfter.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339), fix)
	}
	return ""
}
