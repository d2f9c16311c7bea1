package firewall

import (
	"context"
	"errors"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"egressd/internal/testnet"
)

// TestWants: Wants is true exactly for the rules whose names feed learned
// sets of the installed ruleset (in either mode), and false when nothing
// is installed.
func TestWants(t *testing.T) {
	requireNft(t)
	tp := newTopo(t)
	fw := tp.firewall(t, Config{})
	if fw.Wants("udp-name") || fw.WantsAny() {
		t.Error("Wants or WantsAny before Install")
	}
	eng := compile(t, testPolicy)
	if err := fw.Install(eng); err != nil {
		t.Fatal(err)
	}
	if !fw.WantsAny() {
		t.Error("WantsAny false with udp-name installed")
	}
	for rule, want := range map[string]bool{"udp-name": true, "udp-net": false, "quic-ok": false, "web": false, "nope": false} {
		if got := fw.Wants(rule); got != want {
			t.Errorf("Wants(%q) = %v, want %v", rule, got, want)
		}
	}
	if allocs := testing.AllocsPerRun(100, func() { fw.Wants("web"); fw.Wants("udp-name") }); allocs != 0 {
		t.Errorf("Wants allocates %v times", allocs)
	}
	if err := fw.Replace(eng.WithMode("audit")); err != nil {
		t.Fatal(err)
	}
	if !fw.Wants("udp-name") {
		t.Error("Wants false in audit mode: addresses would not be ready for a reload to enforce")
	}
	if err := fw.Remove(); err != nil {
		t.Fatal(err)
	}
	if fw.Wants("udp-name") || fw.WantsAny() {
		t.Error("Wants or WantsAny after Remove")
	}
	// A ruleset whose rules need no learned set.
	if err := fw.Install(compile(t, "rules:\n  - {name: web, to: [\"*.example.com\"], ports: [443/tcp]}\n")); err != nil {
		t.Fatal(err)
	}
	if fw.WantsAny() {
		t.Error("WantsAny true for a ruleset of redirected TCP only")
	}
	if err := fw.Remove(); err != nil {
		t.Fatal(err)
	}
}

// TestLearnWaitsForPendingWrite: a second Learn of an address whose
// transaction is still on its way does not return before the address is in
// the kernel's set (a DNS answer given to a second client must not beat
// the first one's write).
func TestLearnWaitsForPendingWrite(t *testing.T) {
	requireNft(t)
	tp := newTopo(t)
	fw := tp.firewall(t, Config{})
	if err := fw.Install(compile(t, testPolicy)); err != nil {
		t.Fatal(err)
	}
	a := netip.MustParseAddr("203.0.113.7")
	fw.ioMu.Lock() // a slow transaction
	first, second := make(chan error, 1), make(chan error, 1)
	go func() { first <- fw.Learn("udp-name", a, time.Minute) }()
	// Wait until the first call's batch is being written.
	for deadline := time.Now().Add(5 * time.Second); ; {
		fw.mu.Lock()
		v, ok := fw.learned["dns4_udp-name"][a]
		fw.mu.Unlock()
		if ok && v.b != nil {
			break
		}
		if time.Now().After(deadline) {
			fw.ioMu.Unlock()
			t.Fatal("the first Learn did not start")
		}
		time.Sleep(5 * time.Millisecond)
	}
	go func() { second <- fw.Learn("udp-name", a, 30*time.Second) }()
	select {
	case err := <-second:
		fw.ioMu.Unlock()
		t.Fatalf("the second Learn returned (%v) before the address was written", err)
	case <-time.After(200 * time.Millisecond):
	}
	fw.ioMu.Unlock()
	for _, ch := range []chan error{first, second} {
		if err := <-ch; err != nil {
			t.Fatal(err)
		}
	}
	if out := tp.gw.MustRun("nft", "list", "set", "inet", "egressd", "dns4_udp-name"); !strings.Contains(out, "203.0.113.7") {
		t.Errorf("address not in the set:\n%s", out)
	}
}

// TestLearnAllDeadline: when ctx ends first LearnAll returns its error,
// and the addresses still reach the set; a later call for them waits for
// nothing.
func TestLearnAllDeadline(t *testing.T) {
	requireNft(t)
	tp := newTopo(t)
	fw := tp.firewall(t, Config{})
	if err := fw.Install(compile(t, testPolicy)); err != nil {
		t.Fatal(err)
	}
	as := []Address{
		{Rule: "udp-name", Addr: netip.MustParseAddr("203.0.113.8"), TTL: time.Minute},
		{Rule: "udp-name", Addr: netip.MustParseAddr("2001:db8:2::8"), TTL: time.Minute},
		{Rule: "web", Addr: netip.MustParseAddr("203.0.113.9"), TTL: time.Minute}, // ignored
	}
	fw.ioMu.Lock()
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	err := fw.LearnAll(ctx, as)
	cancel()
	fw.ioMu.Unlock()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("LearnAll with a blocked transaction: %v, want a deadline error", err)
	}
	if err := fw.LearnAll(context.Background(), as); err != nil {
		t.Fatal(err)
	}
	if out := tp.gw.MustRun("nft", "list", "set", "inet", "egressd", "dns4_udp-name"); !strings.Contains(out, "203.0.113.8") {
		t.Errorf("IPv4 address not in the set:\n%s", out)
	}
	if out := tp.gw.MustRun("nft", "list", "set", "inet", "egressd", "dns6_udp-name"); !strings.Contains(out, "2001:db8:2::8") {
		t.Errorf("IPv6 address not in the set:\n%s", out)
	}
	if got := counterValue(fw.m.applies.WithLabelValues("learn", "ok")); got != 1 {
		t.Errorf("learn transactions: %v, want 1", got)
	}
}

// TestLearnNeverShortens: an address is rewritten when asked for longer
// than its set entry lasts, never for shorter, and the set timeout covers
// what was asked.
func TestLearnNeverShortens(t *testing.T) {
	requireNft(t)
	tp := newTopo(t)
	fw := tp.firewall(t, Config{MinTTL: time.Second})
	if err := fw.Install(compile(t, testPolicy)); err != nil {
		t.Fatal(err)
	}
	a := netip.MustParseAddr("203.0.113.10")
	learns := func() float64 { return counterValue(fw.m.applies.WithLabelValues("learn", "ok")) }
	expiry := func() time.Time {
		fw.mu.Lock()
		defer fw.mu.Unlock()
		return fw.learned["dns4_udp-name"][a].exp
	}
	start := time.Now()
	if err := fw.Learn("udp-name", a, 20*time.Second); err != nil {
		t.Fatal(err)
	}
	if e := expiry(); e.Before(start.Add(20 * time.Second)) {
		t.Errorf("expiry %v, before the 20s asked", e.Sub(start))
	}
	if err := fw.Learn("udp-name", a, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	if got := learns(); got != 1 {
		t.Errorf("a shorter ttl wrote a transaction (%v)", got)
	}
	if err := fw.Learn("udp-name", a, 40*time.Second); err != nil {
		t.Fatal(err)
	}
	if got := learns(); got != 2 {
		t.Errorf("a longer ttl: %v transactions, want 2", got)
	}
	if e := expiry(); e.Before(start.Add(40 * time.Second)) {
		t.Errorf("expiry %v after a refresh, before the 40s asked", e.Sub(start))
	}
	out := tp.gw.MustRun("nft", "list", "set", "inet", "egressd", "dns4_udp-name")
	// nft lists "203.0.113.10 timeout 41s expires 40s..." (the timeout is
	// padded); the expiry must not be under the 40s asked, less the time
	// this test took.
	i := strings.Index(out, "203.0.113.10 timeout ")
	if i < 0 {
		t.Fatalf("address not in the set:\n%s", out)
	}
	f := strings.Fields(out[i:])
	if len(f) < 5 || f[3] != "expires" {
		t.Fatalf("unexpected listing:\n%s", out)
	}
	d, err := time.ParseDuration(strings.TrimSuffix(f[4], ","))
	if err != nil {
		t.Fatalf("expiry %q: %v", f[4], err)
	}
	if d < 40*time.Second-time.Since(start) {
		t.Errorf("kernel expiry %v, under the 40s asked", d)
	}
}

// TestLearnAllUnderAnotherPolicy: an answer decided under a policy that is
// not the installed one (a refused reload swapped in for a moment, or a
// query in flight across a reload) feeds the installed rule of its name
// only if that rule lets the client resolve the name too: a refused
// reload that widens a rule must not open its learned set to the new
// names' addresses.
func TestLearnAllUnderAnotherPolicy(t *testing.T) {
	requireNft(t)
	tp := newTopo(t)
	fw := tp.firewall(t, Config{})
	installed := compile(t, testPolicy)
	if err := fw.Install(installed); err != nil {
		t.Fatal(err)
	}
	// The refused policy: udp-name widened to evil.test, for one client.
	other := compile(t, strings.Replace(testPolicy, "to: [ntp.test]", "to: [ntp.test, evil.test]", 1))
	client := netip.MustParseAddr("198.18.1.2")
	evil, ntp, same := netip.MustParseAddr("203.0.113.40"), netip.MustParseAddr("203.0.113.41"), netip.MustParseAddr("203.0.113.42")
	err := fw.LearnAll(context.Background(), []Address{{Rule: "udp-name", Addr: evil, TTL: time.Minute, Engine: other, Client: client, Name: "evil.test"}})
	if !errors.Is(err, ErrNotCovered) {
		t.Errorf("evil.test under the other policy: %v, want ErrNotCovered", err)
	}
	if n := counterValue(fw.m.learnRefused); n != 1 {
		t.Errorf("egress_firewall_learn_refused_total = %v after one refused address, want 1", n)
	}
	// A name the installed rule covers too is learned, whichever policy
	// decided it.
	if err := fw.LearnAll(context.Background(), []Address{
		{Rule: "udp-name", Addr: ntp, TTL: time.Minute, Engine: other, Client: client, Name: "ntp.test"},
		{Rule: "udp-name", Addr: same, TTL: time.Minute, Engine: installed, Client: client, Name: "ntp.test"},
	}); err != nil {
		t.Fatal(err)
	}
	if n := counterValue(fw.m.learnRefused); n != 1 {
		t.Errorf("egress_firewall_learn_refused_total = %v after covered addresses, want 1", n)
	}
	out := tp.gw.MustRun("nft", "list", "set", "inet", "egressd", "dns4_udp-name")
	if strings.Contains(out, evil.String()) {
		t.Errorf("evil.test's address in the installed rule's set:\n%s", out)
	}
	for _, a := range []netip.Addr{ntp, same} {
		if !strings.Contains(out, a.String()) {
			t.Errorf("%s not in the set:\n%s", a, out)
		}
	}
	if allocs := testing.AllocsPerRun(100, func() {
		fw.LearnAll(context.Background(), []Address{{Rule: "udp-name", Addr: same, TTL: time.Minute, Engine: installed, Client: client, Name: "ntp.test"}})
	}); allocs != 0 {
		t.Errorf("LearnAll of an address there already, under the installed policy, allocates %v times", allocs)
	}
}

// TestFailedReplaceKeepsLearned: a Replace that nftables refuses leaves the
// old ruleset in the kernel with its learned addresses, and the firewall
// remembers them: a later Learn of one of them for no longer costs no
// transaction, and one for longer refreshes it (delete and add) rather
// than adding an element that is there already.
func TestFailedReplaceKeepsLearned(t *testing.T) {
	requireNft(t)
	tp := newTopo(t)
	fw := tp.firewall(t, Config{})
	if err := fw.Install(compile(t, testPolicy)); err != nil {
		t.Fatal(err)
	}
	a := netip.MustParseAddr("203.0.113.50")
	if err := fw.Learn("udp-name", a, time.Hour); err != nil {
		t.Fatal(err)
	}
	// The new policy has no udp-name: its sets would go. The kernel
	// refuses the transaction: this thread may not administer the
	// network while it is sent.
	var err error
	testnet.WithoutNetAdmin(t, func() {
		err = fw.Replace(compile(t, "version: 1\nmode: enforce\nrules:\n  - {name: other, to: [x.test], ports: [9000/udp]}\n"))
	})
	if err == nil {
		t.Fatal("Replace without CAP_NET_ADMIN succeeded")
	}
	if out := tp.gw.MustRun("nft", "list", "set", "inet", "egressd", "dns4_udp-name"); !strings.Contains(out, a.String()) {
		t.Fatalf("the old ruleset's set lost the address:\n%s", out)
	}
	fw.mu.Lock()
	_, ok := fw.learned["dns4_udp-name"][a]
	fw.mu.Unlock()
	if !ok {
		t.Error("the firewall forgot an address its ruleset, still installed, holds")
	}
	learns := counterValue(fw.m.applies.WithLabelValues("learn", "ok"))
	if err := fw.Learn("udp-name", a, time.Minute); err != nil {
		t.Fatal(err)
	}
	if got := counterValue(fw.m.applies.WithLabelValues("learn", "ok")); got != learns {
		t.Errorf("Learn of an address there for longer wrote %v transactions", got-learns)
	}
}

// TestNarrowingReloadsRaceLearns: answers for a name only the wide policy
// covers, learned while reloads go back and forth between the wide and
// the narrow policy, are not in the rule's set once the narrow one is in.
func TestNarrowingReloadsRaceLearns(t *testing.T) {
	requireNft(t)
	tp := newTopo(t)
	fw := tp.firewall(t, Config{})
	narrow := compile(t, testPolicy)
	if err := fw.Install(narrow); err != nil {
		t.Fatal(err)
	}
	cli := netip.MustParseAddr("198.18.1.2")
	stop := make(chan struct{})
	var wg sync.WaitGroup
	// Every answer is decided under the wide policy: before a reload
	// to the narrow one went in, or while it went in.
	wide := compile(t, strings.Replace(testPolicy, "to: [ntp.test]", "to: [ntp.test, evil.test]", 1))
	for g := 0; g < 4; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			// Until the reloads are done (bounded: 20000 answers).
			for i := 0; i < 20000; i++ {
				select {
				case <-stop:
					return
				default:
				}
				a := netip.AddrFrom4([4]byte{203, 0, 113, byte(g*60 + i%60)})
				err := fw.LearnAll(context.Background(), []Address{{Rule: "udp-name", Addr: a, TTL: time.Hour, Engine: wide, Client: cli, Name: "evil.test"}})
				if err != nil && !errors.Is(err, ErrNotCovered) {
					t.Error(err)
					return
				}
				time.Sleep(100 * time.Microsecond)
			}
		}(g)
	}
	for i := 0; i < 20; i++ {
		if err := fw.Replace(wide); err != nil {
			t.Fatal(err)
		}
		time.Sleep(5 * time.Millisecond)
		if err := fw.Replace(narrow); err != nil {
			t.Fatal(err)
		}
		// Answers decided under the wide policy may still be in flight:
		// let them land, then look.
		time.Sleep(20 * time.Millisecond)
		out := tp.gw.MustRun("nft", "list", "set", "inet", "egressd", "dns4_udp-name")
		if strings.Contains(out, "203.0.113.") {
			t.Fatalf("round %d: an address of evil.test in the narrow rule's set:\n%s", i, out)
		}
	}
	close(stop)
	wg.Wait()
}
