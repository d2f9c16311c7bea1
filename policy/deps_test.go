package policy

import (
	"os/exec"
	"strings"
	"testing"
)

// TestLeafPackage keeps policy/ the leaf: it imports no package of egressd
// and no library beyond the ones it needs (YAML, globs, IDNA and the public
// suffix list from x/net, and x/text, which idna uses).
func TestLeafPackage(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", "-f", "{{if not .Standard}}{{.ImportPath}}{{end}}", ".").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	allowed := []string{"egressd/policy", "go.yaml.in/yaml/v3", "github.com/gobwas/glob", "golang.org/x/net/idna", "golang.org/x/net/publicsuffix", "golang.org/x/text/"}
	for _, dep := range strings.Fields(string(out)) {
		ok := false
		for _, a := range allowed {
			if dep == a || strings.HasPrefix(dep, a+"/") || (strings.HasSuffix(a, "/") && strings.HasPrefix(dep, a)) {
				ok = true
			}
		}
		if !ok {
			t.Errorf("policy depends on %s", dep)
		}
	}
}
