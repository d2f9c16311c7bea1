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
	"io"
	"io/fs"
	"math/big"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"egressd/audit"
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
		if err := writeFileAtomic(keyPath, keyPEM, 0o600, true); err != nil {
			return tls.Certificate{}, nil, fmt.Errorf("proxy: inspection CA key: %w", err)
		}
	}
	certPEM, err := newCACert(key, time.Now(), audit.BuildFloor())
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("proxy: inspection CA: %w", err)
	}
	if err := writeFileAtomic(certPath, certPEM, 0o644, false); err != nil {
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

// writeFileAtomic writes data to a temporary file beside path, syncs it,
// and moves it into place: linked when exclusive (failing if path exists),
// renamed over path otherwise. Readers see the whole file or none.
func writeFileAtomic(path string, data []byte, perm os.FileMode, exclusive bool) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp)
	if err := f.Chmod(perm); err != nil {
		f.Close()
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if exclusive {
		return os.Link(tmp, path)
	}
	return os.Rename(tmp, path)
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
	if problem := CAClockProblem(cert, time.Now()); problem != "" {
		p.log.Warn("proxy: " + problem)
	}
	ca := &mitmCA{cert: cert}
	p.mitm.Store(ca)
	return ca, nil
}

// certStore caches the leaf certificates made for inspected hosts. Only
// hosts with host/path rules are inspected, so it stays small. A leaf is
// made anew when it is within leafRenewBefore of its end: goproxy's leaves
// last a year, and the daemon of an appliance may run longer.
//
// A leaf is also made anew when the clock says it is not valid (yet): one
// made while the clock was wrong, at 1970 on a gateway without a
// real-time clock before NTP set it (valid 1969 to 1971), or while it ran
// ahead and was then set back, would otherwise be served until it
// expired, and every client would refuse it.
type certStore struct {
	mu  sync.Mutex // guards m
	m   map[string]*tls.Certificate
	now func() time.Time // the clock; nil is time.Now (tests set it)
}

// leafRenewBefore is how long before a cached leaf expires it is replaced.
const leafRenewBefore = 7 * 24 * time.Hour

func (s *certStore) Fetch(host string, gen func() (*tls.Certificate, error)) (*tls.Certificate, error) {
	s.mu.Lock()
	c := s.m[host]
	s.mu.Unlock()
	if c != nil && (c.Leaf == nil || leafFresh(c.Leaf, s.clock())) {
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
	if s.now != nil {
		return s.now()
	}
	return time.Now()
}

// leafFresh says whether a cached leaf may be served at now: valid
// already, and not within leafRenewBefore of its end.
func leafFresh(leaf *x509.Certificate, now time.Time) bool {
	return !now.Before(leaf.NotBefore) && now.Before(leaf.NotAfter.Add(-leafRenewBefore))
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
// when it is valid: one expired, or not valid yet, by the clock. Either
// the clock is wrong (a gateway without a real-time clock before NTP has
// set it: the CA is right again once it has) or the CA was made on a
// wrong clock by an egressd before session 21, which dated it from that
// clock. The CA is not made anew here: clients trust this one.
func caClockProblem(cert *x509.Certificate, now time.Time) string {
	const fix = "; if the clock is right, remove " + CACertFile + " (keep " + CAKeyFile + "): egressd makes a new certificate for the same key, which `egressd ca export` prints for clients to trust again"
	switch {
	case now.After(cert.NotAfter):
		return fmt.Sprintf("the inspection CA certificate %s expired %s (valid %s to %s; clock %s): clients refuse every inspected connection%s",
			CACertFile, cert.NotAfter.UTC().Format(time.RFC3339), cert.NotBefore.UTC().Format(time.RFC3339), cert.NotAfter.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339), fix)
	case now.Before(cert.NotBefore):
		return fmt.Sprintf("the inspection CA certificate %s is not valid before %s (clock %s): the clock is behind (no real-time clock, NTP has not set it yet?), or the CA was made on a clock that ran ahead%s",
			CACertFile, cert.NotBefore.UTC().Format(time.RFC3339), now.UTC().Format(time.RFC3339), fix)
	}
	return ""
}
