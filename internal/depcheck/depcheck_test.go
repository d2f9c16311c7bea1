package depcheck

import (
	"os/exec"
	"strings"
	"testing"
)

// TestDependencyDirection lists each package's egressd imports (direct and
// indirect) and checks them against what it may use.
func TestDependencyDirection(t *testing.T) {
	// internal/jsonenc and internal/logjson are leaves (the encoders of
	// the journal and of the log lines); audit uses the first, so every
	// package above audit does too. internal/httpwire is a leaf too: the
	// HTTP request-line, request-head and authority syntax the proxy and
	// capture share, since neither may import the other; internal/tlshello,
	// the ClientHello parser they share, is one for the same reason.
	// internal/netutil (socket helpers) serves the proxy, capture,
	// for the WAN socket filter the DNS forwarder, and for the accept
	// that waits out EMFILE (RetryListener) the admin server; it uses
	// internal/netns (a leaf: a function run in another network
	// namespace), which internal/testnet shares. internal/memlimit (the
	// cgroup's memory limit, for egressd run) is a leaf, as is
	// internal/setaside (state files refused at a load, kept numbered)
	// and internal/atomicfile (state files written whole or not at
	// all), which audit uses. internal/nfq (the NFQUEUE client, TCP
	// segment parser and injector of the fast path) uses internal/netns;
	// the proxy's fast path reads its queue and injects through it.
	allowed := map[string][]string{
		"egressd/internal/memlimit":   {},
		"egressd/internal/nfq":        {"egressd/internal/netns"},
		"egressd/internal/setaside":   {},
		"egressd/internal/atomicfile": {},
		"egressd/policy":              {},
		"egressd/profiles":            {},
		"egressd/internal/jsonenc":    {},
		"egressd/internal/logjson":    {"egressd/internal/jsonenc"},
		"egressd/internal/httpwire":   {},
		"egressd/internal/tlshello":   {},
		"egressd/internal/netns":      {},
		"egressd/internal/netutil":    {"egressd/internal/netns"},
		"egressd/audit":               {"egressd/policy", "egressd/internal/httpwire", "egressd/internal/jsonenc", "egressd/internal/setaside", "egressd/internal/atomicfile"},
		"egressd/admin":               {"egressd/policy", "egressd/audit", "egressd/internal/netutil", "egressd/internal/netns", "egressd/internal/httpwire", "egressd/internal/jsonenc", "egressd/internal/setaside", "egressd/internal/atomicfile"},
		"egressd/dnsfilter":           {"egressd/policy", "egressd/audit", "egressd/internal/httpwire", "egressd/internal/jsonenc", "egressd/internal/netutil", "egressd/internal/netns", "egressd/internal/logjson", "egressd/internal/setaside", "egressd/internal/atomicfile"},
		"egressd/proxy":               {"egressd/policy", "egressd/audit", "egressd/internal/jsonenc", "egressd/internal/netutil", "egressd/internal/netns", "egressd/internal/httpwire", "egressd/internal/logjson", "egressd/internal/tlshello", "egressd/internal/setaside", "egressd/internal/atomicfile", "egressd/internal/nfq"},
		"egressd/capture":             {"egressd/policy", "egressd/audit", "egressd/internal/jsonenc", "egressd/internal/netutil", "egressd/internal/netns", "egressd/internal/httpwire", "egressd/internal/logjson", "egressd/internal/tlshello", "egressd/internal/setaside", "egressd/internal/atomicfile"},
		"egressd/firewall":            {"egressd/policy", "egressd/audit", "egressd/internal/httpwire", "egressd/internal/nfq", "egressd/internal/jsonenc", "egressd/internal/netutil", "egressd/internal/netns", "egressd/internal/setaside", "egressd/internal/atomicfile"},
	}
	for pkg, ok := range allowed {
		out, err := exec.Command("go", "list", "-deps", "-f", "{{.ImportPath}}", pkg).Output()
		if err != nil {
			t.Fatalf("go list %s: %v", pkg, err)
		}
		for _, dep := range strings.Fields(string(out)) {
			if !strings.HasPrefix(dep, "egressd/") || dep == pkg {
				continue
			}
			found := false
			for _, a := range ok {
				found = found || a == dep
			}
			if !found {
				t.Errorf("%s imports %s", pkg, dep)
			}
		}
	}
}

// TestTestOnlyModules: modules only tests may import stay out of the
// binary (README "Dependencies").
func TestTestOnlyModules(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", "-f", "{{.ImportPath}}", "egressd/cmd/egressd").Output()
	if err != nil {
		t.Fatalf("go list egressd/cmd/egressd: %v", err)
	}
	for _, dep := range strings.Fields(string(out)) {
		if strings.HasPrefix(dep, "github.com/quic-go/") {
			t.Errorf("egressd/cmd/egressd imports %s, a test-only module", dep)
		}
	}
}
