package audit

import (
	"go/ast"
	"go/parser"
	"go/token"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// TestProxyReasonsExplained: every deny reason the proxy declares
// (proxy's Reason* constants, the fast path's with them) has --suggest's
// word on why no rule is suggested for it, not the words for a reason it
// does not know. The package cannot import proxy (proxy imports audit):
// the constants are read from its source. Before, stream-mismatch and
// fast-path-http had none; fast-path-failed got its entry with the
// reason (session 36), by hand.
func TestProxyReasonsExplained(t *testing.T) {
	files, err := filepath.Glob("../proxy/*.go")
	if err != nil {
		t.Fatal(err)
	}
	fset := token.NewFileSet()
	reasons := map[string]string{} // value → constant
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		file, err := parser.ParseFile(fset, f, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		for _, decl := range file.Decls {
			gd, ok := decl.(*ast.GenDecl)
			if !ok || gd.Tok != token.CONST {
				continue
			}
			for _, spec := range gd.Specs {
				vs := spec.(*ast.ValueSpec)
				for i, name := range vs.Names {
					if !strings.HasPrefix(name.Name, "Reason") || i >= len(vs.Values) {
						continue
					}
					lit, ok := vs.Values[i].(*ast.BasicLit)
					if !ok || lit.Kind != token.STRING {
						continue // another package's (policy.ReasonPathForm)
					}
					v, err := strconv.Unquote(lit.Value)
					if err != nil {
						t.Fatal(err)
					}
					reasons[v] = name.Name
				}
			}
		}
	}
	if len(reasons) < 15 {
		t.Fatalf("read %d reasons from ../proxy, want the proxy's every Reason constant: %v", len(reasons), reasons)
	}
	unknown := unsuggestedWhy("no-such-reason")
	for v, name := range reasons {
		if why := unsuggestedWhy(v); why == "" || why == unknown {
			t.Errorf("proxy.%s (%s): --suggest has no word on why no rule is suggested: %q", name, v, why)
		}
	}
}
