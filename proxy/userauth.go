package proxy

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/crypto/bcrypt"

	"egressd/internal/netutil"
)

// UserSecret is how the explicit proxy checks one user's password
// (Config.ProxyUserDigests, egressd run --proxy-users): a bcrypt hash
// (salted and slow), or the password's unsalted SHA-256 digest, kept for
// the files written before bcrypt.
type UserSecret struct {
	sha    [sha256.Size]byte
	bcrypt []byte // nil: sha is the secret
}

// SHA256Secret is the secret of a user given by the SHA-256 digest of
// the password.
func SHA256Secret(digest [sha256.Size]byte) UserSecret { return UserSecret{sha: digest} }

// Bcrypt costs the proxy takes. Below MinBcryptCost the hash is weak;
// above MaxBcryptCost one check takes seconds of CPU (each step doubles
// it), which a proxy that checks a password on a connection's first
// request cannot afford.
const (
	MinBcryptCost     = bcrypt.MinCost
	MaxBcryptCost     = 15
	DefaultBcryptCost = bcrypt.DefaultCost
)

// errBcryptForm is the shape of a bcrypt hash, for the error that
// refuses one.
const errBcryptForm = "a bcrypt hash is $2a$, $2b$ or $2y$, a two-digit cost, $, then 53 characters of [./A-Za-z0-9]"

// BcryptSecret is the secret of a user given by a bcrypt hash
// ("$2a$12$..."; $2b$ and $2y$, as htpasswd -B writes, are the same
// algorithm). The error, when it is not one, unwraps to the problem
// without the package prefix.
func BcryptSecret(hash string) (UserSecret, error) {
	bad := func(format string, a ...any) (UserSecret, error) {
		return UserSecret{}, fmt.Errorf("proxy: %w", fmt.Errorf(format, a...))
	}
	if len(hash) != 60 || hash[0] != '$' || hash[1] != '2' || (hash[2] != 'a' && hash[2] != 'b' && hash[2] != 'y') || hash[3] != '$' || hash[6] != '$' {
		return bad("%s", errBcryptForm)
	}
	for _, c := range []byte(hash[7:]) {
		if !(c == '.' || c == '/' || c >= 'A' && c <= 'Z' || c >= 'a' && c <= 'z' || c >= '0' && c <= '9') {
			return bad("%s", errBcryptForm)
		}
	}
	cost, err := strconv.Atoi(hash[4:6])
	if err != nil || hash[4] < '0' || hash[4] > '9' {
		return bad("%s", errBcryptForm)
	}
	if cost < MinBcryptCost || cost > MaxBcryptCost {
		return bad("bcrypt cost %d is outside %d..%d (each step doubles the time of a check)", cost, MinBcryptCost, MaxBcryptCost)
	}
	if _, err := bcrypt.Cost([]byte(hash)); err != nil {
		return bad("bcrypt hash: %v", err)
	}
	return UserSecret{bcrypt: []byte(hash)}, nil
}

// HashPassword makes the bcrypt secret of a password (egressd
// proxy-users hash): "$2a$COST$...". bcrypt reads at most 72 bytes of a
// password, so a longer one is refused rather than cut.
func HashPassword(password []byte, cost int) (string, error) {
	if len(password) == 0 {
		return "", errors.New("proxy: empty password")
	}
	if len(password) > maxBcryptPassword {
		return "", fmt.Errorf("proxy: the password is %d bytes; bcrypt takes at most %d", len(password), maxBcryptPassword)
	}
	if cost < MinBcryptCost || cost > MaxBcryptCost {
		return "", fmt.Errorf("proxy: bcrypt cost %d is outside %d..%d", cost, MinBcryptCost, MaxBcryptCost)
	}
	h, err := bcrypt.GenerateFromPassword(password, cost)
	if err != nil {
		return "", fmt.Errorf("proxy: %w", err)
	}
	return string(h), nil
}

const maxBcryptPassword = 72

// Salted reports whether the secret is a salted, slow hash (bcrypt), not
// a bare SHA-256 digest.
func (s UserSecret) Salted() bool { return s.bcrypt != nil }

// Line is the secret as a --proxy-users line has it after the name:
// "bcrypt:HASH" or "sha256:HEX". It is a hash, not the password, but
// still one to keep out of logs (so not a String method).
func (s UserSecret) Line() string {
	if s.bcrypt != nil {
		return "bcrypt:" + string(s.bcrypt)
	}
	return "sha256:" + hex.EncodeToString(s.sha[:])
}

// equal reports whether two secrets are the same (the same hash or
// digest: a password checked against one holds for the other).
func (s UserSecret) equal(o UserSecret) bool {
	return s.sha == o.sha && bytes.Equal(s.bcrypt, o.bcrypt) && (s.bcrypt == nil) == (o.bcrypt == nil)
}

// Cost is the bcrypt cost of a salted secret; 0 for a SHA-256 digest.
func (s UserSecret) Cost() int {
	if s.bcrypt == nil {
		return 0
	}
	c, _ := bcrypt.Cost(s.bcrypt)
	return c
}

// authCacheMax bounds the successful bcrypt checks remembered per set of
// users; a full cache drops an entry at random for a new one.
const authCacheMax = 1024

// authWait bounds how long a request waits for its turn at a slow check
// before it is answered 503 (the client may retry): slowChecks.wait.
const authWait = 20 * time.Second

// userSet is the explicit proxy's digest users, with the successful slow
// checks made against them. A reload that changes the users or a secret
// stores a new set, so the cache of the old one goes with it; one that
// reads the same users and secrets keeps the set. The cache holds HMAC-SHA-256 values of the
// user and password under a key drawn for the set, never a password, and
// only passwords bcrypt accepted.
//
// A name that is no user is checked too, against dummy: a bcrypt hash of
// the users' highest cost that no password matches (nil when no user is
// a bcrypt one: then every answer is fast). Refusing it at once would
// tell which names exist by the time of the answer (~65 ms for a bcrypt
// user at cost 10, none for an unknown one). The dummy check goes
// through the same bounded slots as a real one, so unknown names burn no
// more CPU than wrong passwords can. Left: a user given by a SHA-256
// digest is answered at once, so in a set that mixes the schemes its
// name is told apart by its speed (such users get a warning at start).
type userSet struct {
	users map[string]UserSecret
	dummy []byte
	key   [32]byte
	mu    sync.Mutex
	good  map[[sha256.Size]byte]struct{}
}

// dummySalt is the salt and hash part of the dummy bcrypt hash: any 53
// characters of bcrypt's alphabet make a hash that bcrypt checks at its
// full cost and that (but for a 2^-184 chance) no password matches.
const dummySalt = "IdMJo4ah6cAQlPcm7pQyEubc./kyJNEQ0ScnMCoLiaV93gzyljuNi"

func newUserSet(users map[string]UserSecret) *userSet {
	s := &userSet{users: users, good: map[[sha256.Size]byte]struct{}{}}
	rand.Read(s.key[:]) // never fails (crypto/rand)
	cost := 0
	for _, u := range users {
		cost = max(cost, u.Cost())
	}
	if cost > 0 {
		s.dummy = fmt.Appendf(nil, "$2a$%02d$%s", cost, dummySalt)
	}
	return s
}

func (s *userSet) mac(user, pass string) [sha256.Size]byte {
	m := hmac.New(sha256.New, s.key[:])
	var n [binary.MaxVarintLen64]byte
	m.Write(n[:binary.PutUvarint(n[:], uint64(len(user)))])
	m.Write([]byte(user))
	m.Write([]byte(pass))
	var k [sha256.Size]byte
	m.Sum(k[:0])
	return k
}

func (s *userSet) cached(k [sha256.Size]byte) bool {
	s.mu.Lock()
	_, ok := s.good[k]
	s.mu.Unlock()
	return ok
}

func (s *userSet) remember(k [sha256.Size]byte) {
	s.mu.Lock()
	if len(s.good) >= authCacheMax {
		for old := range s.good { // map order is random: a random victim
			delete(s.good, old)
			break
		}
	}
	s.good[k] = struct{}{}
	s.mu.Unlock()
}

// authWaitersPerAddr bounds the requests of one client (a LAN device,
// all its addresses together, where Deps.Devices names one: Proxy.keyOf;
// else the address) that wait for a slow check (or run one) at once:
// each holds its connection until its turn, up to authWait. A request
// beyond it is answered 503 at once. Eight: a browser opens up to six connections to a
// proxy at once, all with the same password, and eight checks of the
// highest cost (15, about 2 s each) one after another still fit in
// authWait.
const authWaitersPerAddr = 8

// slowChecks bounds the bcrypt checks the proxy runs at once: at most
// half of the CPUs (at least one), and one per client (as the connection
// cap counts one: a LAN device's addresses together, netutil.ClientKey),
// so a client sending wrong passwords on many connections, or from many
// addresses, holds one place in the queue, not all of them, and the rest
// of the proxy keeps CPU; at most perAddr requests of a client wait their
// turn.
type slowChecks struct {
	slots   chan struct{}
	wait    time.Duration // authWait; shorter in tests
	perAddr int           // authWaitersPerAddr
	mu      sync.Mutex
	addrs   map[netutil.ClientKey]*addrGate // by client
	// active and peak count the checks running, checks those run,
	// dummies those against userSet.dummy, full the requests turned
	// away for perAddr (for tests).
	active, peak, checks, dummies, full atomic.Int64
}

type addrGate struct {
	ch      chan struct{}
	waiters int
}

func newSlowChecks() *slowChecks {
	return &slowChecks{slots: make(chan struct{}, max(1, runtime.GOMAXPROCS(0)/2)), wait: authWait, perAddr: authWaitersPerAddr, addrs: map[netutil.ClientKey]*addrGate{}}
}

// run checks a password when the client's place and then a CPU slot
// are free: cached first, once the client's turn has come (another
// connection of the client may have checked the same password while
// this one waited), then check. ran is false if ctx ended first, or at
// once when perAddr requests of the client are waiting already.
func (sc *slowChecks) run(ctx context.Context, client netutil.ClientKey, cached, check func() bool) (good, ran bool) {
	sc.mu.Lock()
	g := sc.addrs[client]
	if g == nil {
		g = &addrGate{ch: make(chan struct{}, 1)}
		sc.addrs[client] = g
	}
	if g.waiters >= sc.perAddr {
		sc.mu.Unlock()
		sc.full.Add(1)
		return false, false
	}
	g.waiters++
	sc.mu.Unlock()
	defer func() {
		sc.mu.Lock()
		if g.waiters--; g.waiters == 0 {
			delete(sc.addrs, client)
		}
		sc.mu.Unlock()
	}()
	select {
	case g.ch <- struct{}{}:
	case <-ctx.Done():
		return false, false
	}
	defer func() { <-g.ch }()
	if cached() {
		return true, true
	}
	select {
	case sc.slots <- struct{}{}:
	case <-ctx.Done():
		return false, false
	}
	defer func() { <-sc.slots }()
	n := sc.active.Add(1)
	defer sc.active.Add(-1)
	for p := sc.peak.Load(); n > p && !sc.peak.CompareAndSwap(p, n); p = sc.peak.Load() {
	}
	sc.checks.Add(1)
	return check(), true
}

// authResult is what a request's credentials earned.
type authResult int

const (
	authDenied authResult = iota
	authGranted
	authBusy // a slow check could not run in time: 503, not 407
)

// checkDigestUser checks a digest user's password: a SHA-256 digest at
// once; a bcrypt hash from the cache of successful checks, else by
// bcrypt, bounded by slowChecks.
func (p *Proxy) checkDigestUser(ctx context.Context, set *userSet, client netip.Addr, user, pass string) authResult {
	want, ok := set.users[user]
	if !ok {
		if set.dummy == nil {
			return authDenied
		}
		// As long as a bcrypt user's wrong password: userSet.
		want = UserSecret{bcrypt: set.dummy}
	}
	if want.bcrypt == nil {
		got := sha256.Sum256([]byte(pass))
		if subtle.ConstantTimeCompare(got[:], want.sha[:]) == 1 {
			return authGranted
		}
		return authDenied
	}
	if len(pass) > maxBcryptPassword {
		// bcrypt would read the first 72 bytes only.
		return authDenied
	}
	k := set.mac(user, pass)
	if set.cached(k) { // never for an unknown name: only good checks are
		return authGranted
	}
	ctx, cancel := context.WithTimeout(ctx, p.slow.wait)
	defer cancel()
	good, ran := p.slow.run(ctx, p.keyOf(client), func() bool { return set.cached(k) }, func() bool {
		if !ok {
			p.slow.dummies.Add(1)
		}
		return bcrypt.CompareHashAndPassword(want.bcrypt, []byte(pass)) == nil
	})
	switch {
	case !ran:
		return authBusy
	case good && ok:
		set.remember(k)
		return authGranted
	}
	return authDenied
}
