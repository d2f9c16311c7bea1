package audit

import (
	"bytes"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/publicsuffix"

	"egressd/policy"
)

func TestSuggestGolden(t *testing.T) {
	var buf bytes.Buffer
	if err := fixtureReport(t).WriteSuggestions(&buf); err != nil {
		t.Fatal(err)
	}
	golden(t, "suggest.yaml", buf.Bytes())
}

// TestSuggestPastes pastes the snippet into the policy: it compiles, and
// the new policy allows every flow and query that was denied, except those
// only an expired rule explains (the snippet says to extend that rule).
func TestSuggestPastes(t *testing.T) {
	src, err := os.ReadFile(filepath.Join("testdata", "policy.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var snip bytes.Buffer
	if err := fixtureReport(t).WriteSuggestions(&snip); err != nil {
		t.Fatal(err)
	}
	// The fixture policy ends with its rules list, so appending pastes
	// the snippet under "rules:".
	eng2, err := policy.Compile("suggested.yaml", append(append([]byte{}, src...), snip.Bytes()...))
	if err != nil {
		t.Fatalf("the suggested snippet does not compile: %v\n%s", err, snip.String())
	}
	eng := loadPolicy(t, "policy.yaml")
	for _, ev := range fixtureEvents(t, eng) {
		if ev.Verdict == policy.Allow || ev.Reason == policy.ReasonExpired {
			continue
		}
		pr, _ := policy.ParseProto(ev.Proto)
		in := policy.Input{Client: ev.Client, Dest: ev.Dest, Port: ev.DestPort, Proto: pr, Name: ev.Name, Now: ev.Time}
		var d policy.Decision
		if ev.Kind == KindDNS {
			d = eng2.DecideName(in)
		} else {
			d = eng2.Decide(in)
		}
		if !d.Allowed() {
			t.Errorf("%s %s %s:%d/%s still denied (%s) with the suggestions", ev.Kind, ev.Client, ev.Name, ev.DestPort, ev.Proto, d.Reason)
		}
	}
	// And nothing the suggestions add is wider than they say: a client
	// that never asked is still denied tracker.example.
	d := eng2.Decide(policy.Input{Client: netip.MustParseAddr("192.168.10.200"), Dest: netip.MustParseAddr("203.0.113.9"), Port: 443, Proto: policy.TCP, Name: "tracker.example", Now: t0})
	if d.Allowed() {
		t.Errorf("tracker.example is allowed for a client that never asked (rule %s)", d.Rule)
	}
}

// suffixNames are dropped names under public suffixes of every kind.
var suffixNames = []string{
	"a.co.uk", "b.co.uk", "www.a.co.uk", // co.uk is a suffix: a.co.uk is registrable
	"x.com", "y.com", "api.x.com", "cdn.x.com",
	"bucket1.s3.amazonaws.com", "bucket2.s3.amazonaws.com", // private PSL entries
	"a.b.s3.amazonaws.com", "c.b.s3.amazonaws.com",
	"ec2-1.compute-1.amazonaws.com", "ec2-2.compute-1.amazonaws.com",
	"foo.amazonaws.com", "bar.amazonaws.com",
	"u1.github.io", "u2.github.io", "x.u1.github.io",
	"p.blogspot.com", "q.blogspot.com",
	"one.gov.uk", "two.gov.uk",
	"a.b.c.kawasaki.jp", "d.b.c.kawasaki.jp", // *.kawasaki.jp wildcard suffix rule
	"co.uk", "com", "s3.amazonaws.com", // public suffixes themselves
	"tracker.example", "ads.tracker.example",
}

// TestSuggestNeverAtPublicSuffix: no wildcard at or above a public suffix,
// none wider than a registrable domain, whatever mix of names was dropped.
func TestSuggestNeverAtPublicSuffix(t *testing.T) {
	r := &Report{GeneratedAt: t0}
	for i, n := range suffixNames {
		r.Dropped = append(r.Dropped, DroppedReport{Dest: n, Port: 443, Proto: "tcp", Flows: uint64(i + 1),
			Clients: []string{"192.168.10.5"}, ClientCount: 1, Reason: policy.ReasonNoRule, FirstSeen: t0, LastSeen: t0})
	}
	sugs, _ := r.Suggest()
	covered := map[string]bool{}
	for _, s := range sugs {
		for _, to := range s.To {
			checkTarget(t, to)
			covered[to] = true
		}
	}
	for _, want := range []string{"*.x.com", "*.b.s3.amazonaws.com", "bucket1.s3.amazonaws.com", "bucket2.s3.amazonaws.com", "a.co.uk", "b.co.uk", "www.a.co.uk", "co.uk"} {
		if !covered[want] {
			t.Errorf("expected target %q among suggestions", want)
		}
	}
	for _, bad := range []string{"*.co.uk", "*.com", "*.s3.amazonaws.com", "*.amazonaws.com", "*.github.io", "*.blogspot.com", "*.gov.uk", "*.kawasaki.jp", "*.c.kawasaki.jp"} {
		if covered[bad] {
			t.Errorf("suggested %q", bad)
		}
	}
}

func checkTarget(t testing.TB, to string) {
	t.Helper()
	base, ok := strings.CutPrefix(to, "*.")
	if !ok {
		return // an exact name or address is never wider than itself
	}
	if ps, _ := publicsuffix.PublicSuffix(base); ps == base {
		t.Errorf("wildcard %q is at a public suffix", to)
	}
	etld1, err := publicsuffix.EffectiveTLDPlusOne(base)
	if err != nil || (base != etld1 && !strings.HasSuffix(base, "."+etld1)) {
		t.Errorf("wildcard %q is wider than a registrable domain (%q, %v)", to, etld1, err)
	}
}

// FuzzSuggest checks the public-suffix property on arbitrary name pairs.
func FuzzSuggest(f *testing.F) {
	f.Add("a.co.uk", "b.co.uk")                                   // two registrable domains under one suffix
	f.Add("api.x.com", "cdn.x.com")                               // one domain: *.x.com is fine
	f.Add("bucket1.s3.amazonaws.com", "bucket2.s3.amazonaws.com") // private suffix
	f.Add("a.b.c.kawasaki.jp", "d.b.c.kawasaki.jp")               // wildcard suffix rule
	f.Add("com", "x.com")                                         // a suffix and a name
	f.Add("A.Example.COM.", "b.example.com")                      // case and trailing dot
	f.Fuzz(func(t *testing.T, a, b string) {
		if len(a) > 300 || len(b) > 300 {
			return
		}
		r := &Report{GeneratedAt: t0}
		for _, n := range []string{a, b} {
			r.Dropped = append(r.Dropped, DroppedReport{Dest: n, Port: 443, Proto: "tcp", Flows: 1, FirstSeen: t0, LastSeen: t0})
		}
		sugs, _ := r.Suggest()
		for _, s := range sugs {
			for _, to := range s.To {
				checkTarget(t, to)
			}
		}
		var buf bytes.Buffer
		if err := r.WriteSuggestions(&buf); err != nil {
			t.Fatal(err)
		}
	})
}

func TestSuggestNothing(t *testing.T) {
	var buf bytes.Buffer
	r := &Report{GeneratedAt: time.Now()}
	if err := r.WriteSuggestions(&buf); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(buf.String(), "Nothing to suggest") {
		t.Errorf("got %q", buf.String())
	}
	_ = fmt.Sprint()
}
