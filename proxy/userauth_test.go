package proxy

import (
	"bufio"
	"crypto/sha256"
	"encoding/base64"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"

	"egressd/internal/fakemac"
	"egressd/internal/netutil"
	"egressd/policy"
)

// mustBcrypt is a bcrypt secret of pass at the lowest cost (tests).
func mustBcrypt(t testing.TB, pass string) UserSecret {
	return mustBcryptCost(t, pass, MinBcryptCost)
}

func mustBcryptCost(t testing.TB, pass string, cost int) UserSecret {
	t.Helper()
	h, err := HashPassword([]byte(pass), cost)
	if err != nil {
		t.Fatal(err)
	}
	s, err := BcryptSecret(h)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestBcryptSecret: the hashes htpasswd -B and HashPassword write are
// taken; anything else is refused with the reason, not at the first
// request.
func TestBcryptSecret(t *testing.T) {
	h, err := HashPassword([]byte("s3cret"), MinBcryptCost)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(h, "$2a$04$") || len(h) != 60 {
		t.Fatalf("HashPassword: %q", h)
	}
	for _, ok := range []string{h, "$2b$" + h[4:], "$2y$" + h[4:]} {
		s, err := BcryptSecret(ok)
		if err != nil || !s.Salted() || s.Cost() != 4 {
			t.Errorf("BcryptSecret(%q): %v %v %d", ok, err, s.Salted(), s.Cost())
		}
		// $2b$ and $2y$ are the same algorithm: the password checks.
		if err := bcrypt.CompareHashAndPassword(s.bcrypt, []byte("s3cret")); err != nil {
			t.Errorf("%q: the password does not check: %v", ok, err)
		}
	}
	if s := SHA256Secret(sha256.Sum256([]byte("x"))); s.Salted() || s.Cost() != 0 {
		t.Errorf("a SHA-256 secret is salted or has a cost")
	}
	for bad, why := range map[string]string{
		"":                        "a bcrypt hash is",
		h[:59]:                    "a bcrypt hash is",
		h + "x":                   "a bcrypt hash is",
		"$2x$" + h[4:]:            "a bcrypt hash is",
		"$1a$" + h[4:]:            "a bcrypt hash is",
		"$2a$ 4$" + h[7:]:         "a bcrypt hash is",
		"$2a$-4$" + h[7:]:         "a bcrypt hash is",
		"$2a$04$" + h[7:59] + "!": "a bcrypt hash is",
		"$2a$03$" + h[7:]:         "cost 3 is outside 4..15",
		"$2a$31$" + h[7:]:         "cost 31 is outside 4..15",
	} {
		_, err := BcryptSecret(bad)
		if err == nil || !strings.Contains(err.Error(), why) || !strings.HasPrefix(err.Error(), "proxy: ") {
			t.Errorf("BcryptSecret(%q): %v, want %q", bad, err, why)
		}
	}
	if _, err := HashPassword([]byte(strings.Repeat("x", 73)), 4); err == nil || !strings.Contains(err.Error(), "at most 72") {
		t.Errorf("a 73-byte password: %v", err)
	}
	for _, c := range []int{3, 16} {
		if _, err := HashPassword([]byte("x"), c); err == nil {
			t.Errorf("cost %d taken", c)
		}
	}
	if _, err := HashPassword(nil, 4); err == nil {
		t.Errorf("an empty password taken")
	}
}

// authProxy is an explicit proxy on loopback with the given digest users.
func authProxy(t testing.TB, users map[string]UserSecret) (*Proxy, string) {
	t.Helper()
	return authProxyDevices(t, users, nil)
}

// authProxyDevices is authProxy with devs telling client addresses'
// devices (nil: none).
func authProxyDevices(t testing.TB, users map[string]UserSecret, devs *fakemac.Table) (*Proxy, string) {
	t.Helper()
	eng, err := policy.Compile("auth.yaml", []byte(fmt.Sprintf(testPolicy, "enforce")))
	if err != nil {
		t.Fatal(err)
	}
	deps := Deps{Policy: policy.NewStore(eng), Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
	if devs != nil {
		deps.Devices = devs
	}
	p, err := New(Config{ProxyUserDigests: users}, deps)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go p.ServeExplicit(ln)
	t.Cleanup(func() { p.Close() })
	return p, ln.Addr().String()
}

// connectAs sends a CONNECT to evil.example (denied by the policy: 403
// once authenticated) with user:pass, from the loopback address from,
// and returns the status.
func connectAs(addr, from, user, pass string) (int, error) {
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}, Timeout: 5 * time.Second}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	cred := base64.StdEncoding.EncodeToString([]byte(user + ":" + pass))
	if _, err := io.WriteString(c, "CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\nProxy-Authorization: Basic "+cred+"\r\n\r\n"); err != nil {
		return 0, err
	}
	resp, err := http.ReadResponse(bufio.NewReader(c), &http.Request{Method: "CONNECT"})
	if err != nil {
		return 0, err
	}
	resp.Body.Close()
	return resp.StatusCode, nil
}

// TestExplicitAuthBcryptCache: a bcrypt user's right password is checked
// by bcrypt once, then found in the cache; a wrong one is checked every
// time and never let through; a reload of the same users and secrets
// keeps the cache, one that changes them forgets it, so a password the
// new users no longer have is refused.
func TestExplicitAuthBcryptCache(t *testing.T) {
	users := map[string]UserSecret{"alice": mustBcrypt(t, "s3cret"), "bob": SHA256Secret(sha256.Sum256([]byte("other")))}
	p, addr := authProxy(t, maps.Clone(users))
	status := func(user, pass string, want int) {
		t.Helper()
		code, err := connectAs(addr, "127.0.0.1", user, pass)
		if err != nil || code != want {
			t.Fatalf("%s:%s: %d %v, want %d", user, pass, code, err, want)
		}
	}
	checks := func(want int64) {
		t.Helper()
		if n := p.slow.checks.Load(); n != want {
			t.Fatalf("%d bcrypt checks, want %d", n, want)
		}
	}
	status("alice", "s3cret", http.StatusForbidden)
	checks(1)
	status("alice", "s3cret", http.StatusForbidden) // from the cache
	status("alice", "s3cret", http.StatusForbidden)
	checks(1)
	for range 2 {
		status("alice", "wrong", http.StatusProxyAuthRequired)
	}
	status("alice", "s3cret"+strings.Repeat("x", 80), http.StatusProxyAuthRequired) // over bcrypt's 72 bytes: refused unchecked
	checks(3)
	status("bob", "other", http.StatusForbidden) // SHA-256: no slow check
	status("bob", "wrong", http.StatusProxyAuthRequired)
	checks(3)
	status("carol", "s3cret", http.StatusProxyAuthRequired) // unknown: a check against the dummy hash
	checks(4)

	// The same users and secrets again (a reload of an unchanged file):
	// the cache stays.
	if err := p.SetProxyUserDigests(maps.Clone(users)); err != nil {
		t.Fatal(err)
	}
	status("alice", "s3cret", http.StatusForbidden)
	checks(4)
	// The same password hashed again (a new salt): the cache is gone, the
	// password is checked.
	if err := p.SetProxyUserDigests(map[string]UserSecret{"alice": mustBcrypt(t, "s3cret")}); err != nil {
		t.Fatal(err)
	}
	status("alice", "s3cret", http.StatusForbidden)
	checks(5)
	// A new password: the old one, checked a moment ago, is refused.
	if err := p.SetProxyUserDigests(map[string]UserSecret{"alice": mustBcrypt(t, "n3w")}); err != nil {
		t.Fatal(err)
	}
	status("alice", "s3cret", http.StatusProxyAuthRequired)
	status("alice", "n3w", http.StatusForbidden)
	checks(7)
	if peak := p.slow.peak.Load(); peak > int64(cap(p.slow.slots)) {
		t.Errorf("%d bcrypt checks at once, bound %d", peak, cap(p.slow.slots))
	}
}

// TestExplicitAuthFlood: a client sending wrong passwords for a bcrypt
// user on many connections at once holds one place at the slow check; a
// client from another address with the right password, not yet cached,
// gets through while the flood goes on, then from the cache. No more
// bcrypt checks run at once than the bound.
func TestExplicitAuthFlood(t *testing.T) {
	p, addr := authProxy(t, map[string]UserSecret{"alice": mustBcryptCost(t, "s3cret", 8)})
	// The flood's requests that wait longer get 503. Long enough that the
	// right password's two checks' wait (the bound below counts them) fits
	// under -race on a loaded box, where one check of cost 8 took over a
	// second: at 2 s the right password itself got 503 there.
	p.slow.wait = 10 * time.Second
	const flooders, perFlooder = 32, 40
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var mu sync.Mutex
	codes := map[int]int{}
	var floodErr error
	for i := range flooders {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range perFlooder {
				select {
				case <-stop:
					return
				default:
				}
				code, err := connectAs(addr, "127.0.0.1", "alice", fmt.Sprintf("wrong-%d-%d", i, j))
				mu.Lock()
				if err != nil {
					codes[-1]++
					floodErr = err
				} else {
					codes[code]++
				}
				mu.Unlock()
			}
		}()
	}
	// Let the flood fill the queue.
	for deadline := time.Now().Add(5 * time.Second); p.slow.checks.Load() < 3 && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
	}
	before := p.slow.checks.Load()
	code, err := connectAs(addr, "127.0.0.2", "alice", "s3cret")
	waited := p.slow.checks.Load() - before
	if err != nil || code != http.StatusForbidden {
		t.Errorf("right password during the flood: %d %v, want 403 (authenticated, denied by policy)", code, err)
	}
	code, err = connectAs(addr, "127.0.0.2", "alice", "s3cret")
	if err != nil || code != http.StatusForbidden {
		t.Errorf("right password again, during the flood: %d %v, want 403", code, err)
	}
	close(stop)
	wg.Wait()
	t.Logf("flood answers %v; the right password's check came after %d others; %d checks in all", codes, waited-1, p.slow.checks.Load())
	// The flood holds one place in the queue of slow checks: the right
	// password waits for the flood's check running and its next one at
	// most, per slot, not for each of the flood's connections.
	if bound := int64(2*cap(p.slow.slots) + 2); waited > bound {
		t.Errorf("%d bcrypt checks ran between the right password's request and its answer, want at most %d", waited, bound)
	}
	for c, n := range codes {
		if c != http.StatusProxyAuthRequired && c != http.StatusServiceUnavailable {
			t.Errorf("%d flood requests answered %d (-1: %v)", n, c, floodErr)
		}
	}
	if peak := p.slow.peak.Load(); peak > int64(cap(p.slow.slots)) {
		t.Errorf("%d bcrypt checks at once, bound %d", peak, cap(p.slow.slots))
	}
}

// TestExplicitAuthBusy: a request that cannot have its slow check in
// time is answered 503 with Retry-After, not 407 (its password was not
// found wrong) and not let through; a cached password still is.
func TestExplicitAuthBusy(t *testing.T) {
	p, addr := authProxy(t, map[string]UserSecret{"alice": mustBcrypt(t, "s3cret")})
	if code, err := connectAs(addr, "127.0.0.1", "alice", "s3cret"); err != nil || code != http.StatusForbidden {
		t.Fatalf("right password: %d %v", code, err)
	}
	p.slow.wait = 50 * time.Millisecond
	for range cap(p.slow.slots) { // every slot taken
		p.slow.slots <- struct{}{}
	}
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	io.WriteString(c, "CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\nProxy-Authorization: Basic "+base64.StdEncoding.EncodeToString([]byte("alice:other"))+"\r\n\r\n")
	resp, err := http.ReadResponse(bufio.NewReader(c), &http.Request{Method: "CONNECT"})
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("Retry-After") == "" || !strings.Contains(string(body), "password checks") {
		t.Errorf("no slot free: %d %v %q, want 503 with Retry-After", resp.StatusCode, resp.Header, body)
	}
	if code, err := connectAs(addr, "127.0.0.1", "alice", "s3cret"); err != nil || code != http.StatusForbidden {
		t.Errorf("cached right password, no slot free: %d %v", code, err)
	}
	if n := p.slow.checks.Load(); n != 1 {
		t.Errorf("%d bcrypt checks, want 1", n)
	}
}

// TestExplicitAuthUnknownUser: a name that is no user costs what a
// bcrypt user's wrong password costs (THREATS.md: timing must not tell
// which names exist): a bcrypt check against a dummy hash at the users'
// highest cost, through the same bounded slots; a password over bcrypt's
// 72 bytes is refused unchecked, as a bcrypt user's is. A set with no
// bcrypt user (every answer fast) makes no dummy check.
func TestExplicitAuthUnknownUser(t *testing.T) {
	p, addr := authProxy(t, map[string]UserSecret{"alice": mustBcrypt(t, "s3cret"), "dave": mustBcryptCost(t, "x", MinBcryptCost+1)})
	status := func(user, pass string, want int) {
		t.Helper()
		code, err := connectAs(addr, "127.0.0.1", user, pass)
		if err != nil || code != want {
			t.Fatalf("%s:%s: %d %v, want %d", user, pass, code, err, want)
		}
	}
	set := p.userDigests.Load()
	if set.dummy == nil {
		t.Fatal("no dummy hash")
	}
	if c, _ := bcrypt.Cost(set.dummy); c != MinBcryptCost+1 {
		t.Errorf("dummy hash of cost %d, want the users' highest, %d", c, MinBcryptCost+1)
	}
	status("mallory", "guess", http.StatusProxyAuthRequired)
	status("mallory", "guess", http.StatusProxyAuthRequired) // never cached
	if n, d := p.slow.checks.Load(), p.slow.dummies.Load(); n != 2 || d != 2 {
		t.Fatalf("unknown user: %d slow checks, %d of them dummy; want 2, 2", n, d)
	}
	status("mallory", strings.Repeat("x", 80), http.StatusProxyAuthRequired)
	status("alice", "wrong", http.StatusProxyAuthRequired)
	if n, d := p.slow.checks.Load(), p.slow.dummies.Load(); n != 3 || d != 2 {
		t.Fatalf("%d slow checks, %d of them dummy; want 3, 2", n, d)
	}
	if peak := p.slow.peak.Load(); peak > int64(cap(p.slow.slots)) {
		t.Errorf("%d bcrypt checks at once, bound %d", peak, cap(p.slow.slots))
	}

	if err := p.SetProxyUserDigests(map[string]UserSecret{"bob": SHA256Secret(sha256.Sum256([]byte("other")))}); err != nil {
		t.Fatal(err)
	}
	status("mallory", "guess", http.StatusProxyAuthRequired)
	if n := p.slow.checks.Load(); n != 3 {
		t.Fatalf("%d slow checks with no bcrypt user, want 3", n)
	}
}

// sendConnectAs opens a connection from the loopback address from and
// sends a CONNECT with user:pass, without reading the answer.
func sendConnectAs(t *testing.T, addr, from, user, pass string) net.Conn {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}, Timeout: 5 * time.Second}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	cred := base64.StdEncoding.EncodeToString([]byte(user + ":" + pass))
	io.WriteString(c, "CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\nProxy-Authorization: Basic "+cred+"\r\n\r\n")
	return c
}

// readStatus reads the answer to sendConnectAs's CONNECT.
func readStatus(t *testing.T, c net.Conn) *http.Response {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), &http.Request{Method: "CONNECT"})
	if err != nil {
		t.Fatalf("no answer: %v", err)
	}
	resp.Body.Close()
	return resp
}

// TestExplicitAuthWaitersPerAddr: the requests of one client address that
// wait for a slow check are bounded: beyond authWaitersPerAddr a request
// is answered 503 with Retry-After at once, while the others still wait
// (every slot is taken here, and their wait is long); another address
// still gets its place; once slots free up, the waiting ones are checked
// (407: wrong passwords).
func TestExplicitAuthWaitersPerAddr(t *testing.T) {
	p, addr := authProxy(t, map[string]UserSecret{"alice": mustBcrypt(t, "s3cret")})
	p.slow.wait = time.Minute
	for range cap(p.slow.slots) { // every slot taken
		p.slow.slots <- struct{}{}
	}
	waiters := func(a string) int {
		p.slow.mu.Lock()
		defer p.slow.mu.Unlock()
		if g := p.slow.addrs[netutil.ClientKey{Addr: netip.MustParseAddr(a)}]; g != nil {
			return g.waiters
		}
		return 0
	}
	waitFor := func(a string, n int) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); waiters(a) != n; time.Sleep(5 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("%s: %d requests waiting, want %d", a, waiters(a), n)
			}
		}
	}
	var waiting []net.Conn
	for i := range authWaitersPerAddr {
		waiting = append(waiting, sendConnectAs(t, addr, "127.0.0.1", "alice", fmt.Sprint("wrong-", i)))
	}
	waitFor("127.0.0.1", authWaitersPerAddr)
	for i := range 5 {
		c := sendConnectAs(t, addr, "127.0.0.1", "alice", fmt.Sprint("more-", i))
		resp := readStatus(t, c)
		if resp.StatusCode != http.StatusServiceUnavailable || resp.Header.Get("Retry-After") == "" {
			t.Errorf("request %d beyond the waiters' bound: %d %v, want 503 with Retry-After", i, resp.StatusCode, resp.Header)
		}
	}
	if n := p.slow.full.Load(); n != 5 {
		t.Errorf("%d requests turned away, want 5", n)
	}
	other := sendConnectAs(t, addr, "127.0.0.2", "alice", "wrong")
	waitFor("127.0.0.2", 1)
	waitFor("127.0.0.1", authWaitersPerAddr)
	for range cap(p.slow.slots) {
		<-p.slow.slots
	}
	for i, c := range append(waiting, other) {
		if resp := readStatus(t, c); resp.StatusCode != http.StatusProxyAuthRequired {
			t.Errorf("waiting request %d: %d, want 407", i, resp.StatusCode)
		}
	}
	if n := p.slow.checks.Load(); n != authWaitersPerAddr+1 {
		t.Errorf("%d bcrypt checks, want %d", n, authWaitersPerAddr+1)
	}
	// Every address's place is given back: a client's addresses do not
	// stay in the table once its checks are done.
	p.slow.mu.Lock()
	left := len(p.slow.addrs)
	p.slow.mu.Unlock()
	if left != 0 {
		t.Errorf("%d addresses left in the waiters' table after every check ended", left)
	}
}

// TestExplicitAuthWaitersPerDevice: the bound on the requests waiting for
// a slow check is per client as the connection cap is: one LAN device's
// addresses (one MAC) share it (before, each address had its own eight,
// so a host with many addresses held as many connections waiting as it
// liked); another device keeps its own place; every place is given back.
func TestExplicitAuthWaitersPerDevice(t *testing.T) {
	devs := fakemac.New(map[netip.Addr]net.HardwareAddr{})
	flooder := net.HardwareAddr{2, 0, 0, 0, 0, 0xf}
	for _, a := range []string{"127.0.0.1", "127.0.0.2", "127.0.0.3"} {
		devs.Set(netip.MustParseAddr(a), flooder)
	}
	devs.Set(netip.MustParseAddr("127.0.0.4"), net.HardwareAddr{2, 0, 0, 0, 0, 4})
	p, addr := authProxyDevices(t, map[string]UserSecret{"alice": mustBcrypt(t, "s3cret")}, devs)
	p.slow.wait = time.Minute
	for range cap(p.slow.slots) { // every slot taken
		p.slow.slots <- struct{}{}
	}
	waiting := func() (n int) {
		p.slow.mu.Lock()
		defer p.slow.mu.Unlock()
		for _, g := range p.slow.addrs {
			n += g.waiters
		}
		return n
	}
	waitFor := func(n int) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); waiting() != n; time.Sleep(5 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("%d requests waiting, want %d", waiting(), n)
			}
		}
	}
	var held []net.Conn
	for i := range authWaitersPerAddr {
		from := []string{"127.0.0.1", "127.0.0.2"}[i%2]
		held = append(held, sendConnectAs(t, addr, from, "alice", fmt.Sprint("wrong-", i)))
	}
	waitFor(authWaitersPerAddr)
	for i := range 5 {
		c := sendConnectAs(t, addr, "127.0.0.3", "alice", fmt.Sprint("more-", i))
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		resp, err := http.ReadResponse(bufio.NewReader(c), &http.Request{Method: "CONNECT"})
		if err != nil {
			t.Fatalf("request %d from a third address of the device: no answer at once (%v): it waits in a place of its own", i, err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusServiceUnavailable {
			t.Errorf("request %d from a third address of the device: %d, want 503", i, resp.StatusCode)
		}
	}
	if n := p.slow.full.Load(); n != 5 {
		t.Errorf("%d requests turned away, want 5", n)
	}
	held = append(held, sendConnectAs(t, addr, "127.0.0.4", "alice", "wrong"))
	waitFor(authWaitersPerAddr + 1)
	for range cap(p.slow.slots) {
		<-p.slow.slots
	}
	for i, c := range held {
		if resp := readStatus(t, c); resp.StatusCode != http.StatusProxyAuthRequired {
			t.Errorf("waiting request %d: %d, want 407", i, resp.StatusCode)
		}
	}
	p.slow.mu.Lock()
	left := len(p.slow.addrs)
	p.slow.mu.Unlock()
	if left != 0 {
		t.Errorf("%d clients left in the waiters' table after every check ended", left)
	}
}
