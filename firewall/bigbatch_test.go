package firewall

import (
	"fmt"
	"strings"
	"testing"
)

// TestInstallLargeRuleset: a ruleset of some hundreds of rules goes in.
// The kernel acknowledges each message of the batch before the firewall
// reads any; with the socket's default receive buffer (rmem_default) the
// acknowledgements of a few hundred messages overflowed it, and Install
// failed with ENOBUFS.
func TestInstallLargeRuleset(t *testing.T) {
	requireNft(t)
	tp := newTopo(t)
	var b strings.Builder
	b.WriteString("version: 1\nmode: enforce\nrules:\n")
	for i := range 200 {
		fmt.Fprintf(&b, "  - name: r%d\n    to: [198.18.2.%d]\n    ports: [%d/udp]\n", i, i%250+2, 10000+i)
	}
	fw := tp.firewall(t, Config{})
	if err := fw.Install(compile(t, b.String())); err != nil {
		t.Fatal(err)
	}
	if out := tp.gw.MustRun("nft", "list", "chain", "inet", "egressd", "forward"); !strings.Contains(out, `comment "rule r199"`) {
		t.Errorf("rule r199 missing from forward:\n%s", out)
	}
}
