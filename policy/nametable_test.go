package policy

import (
	"fmt"
	"math/rand/v2"
	"strings"
	"testing"
)

// TestNameTableMatchesTree checks every edge of a random tree, with short,
// inline-length and long labels and the same labels under many parents,
// against the build-time maps, and that labels absent at a node (present
// elsewhere, or differing in the last byte or the length) are not found.
func TestNameTableMatchesTree(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 6))
	label := func() string {
		n := []int{1, 3, inlineLabel - 1, inlineLabel, inlineLabel + 1, 40, 63}[r.IntN(7)]
		b := make([]byte, n)
		for i := range b {
			b[i] = "abcxyz09"[r.IntN(8)]
		}
		b[0], b[n-1] = 'a'+byte(r.IntN(3)), 'a'+byte(r.IntN(3))
		return string(b)
	}
	var pool []string
	for range 60 {
		pool = append(pool, label())
	}
	var src strings.Builder
	src.WriteString("version: 1\nrules:\n")
	for i := range 400 {
		depth := 1 + r.IntN(4)
		ls := make([]string, depth)
		for j := range ls {
			ls[j] = pool[r.IntN(len(pool))]
		}
		ls[depth-1] = []string{"com", "net", "test"}[r.IntN(3)]
		fmt.Fprintf(&src, "  - name: r%d\n    ports: [443/tcp]\n    to: [%q]\n", i, strings.Join(ls, "."))
	}
	p, err := Parse("t.yaml", []byte(src.String()))
	if err != nil {
		t.Fatal(err)
	}
	e := &Engine{pol: p, names: &nameNode{}}
	for i := range p.Rules {
		for _, tg := range p.Rules[i].To {
			e.add(int32(i), tg)
		}
	}
	tab := sealNames(e.names)
	edges := 0
	var walk func(n *nameNode, id uint32)
	walk = func(n *nameNode, id uint32) {
		f := tab.nodes[id]
		if int(f.exactN) != len(n.exact) || int(f.subN) != len(n.sub) || int(f.globN) != len(n.globs) {
			t.Fatalf("node %d: %+v, tree has %d/%d/%d", id, f, len(n.exact), len(n.sub), len(n.globs))
		}
		for l, c := range n.children {
			edges++
			cid := tab.child(id, l)
			if cid == 0 {
				t.Fatalf("node %d: child %q not found", id, l)
			}
			walk(c, cid)
			for _, miss := range []string{l + "a", l[:len(l)-1], l[:len(l)-1] + "q"} {
				if _, in := n.children[miss]; !in && miss != "" && tab.child(id, miss) != 0 {
					t.Fatalf("node %d: %q found, not a child", id, miss)
				}
			}
		}
		for _, l := range pool {
			if _, in := n.children[l]; !in && tab.child(id, l) != 0 {
				t.Fatalf("node %d: %q found, not a child", id, l)
			}
		}
	}
	walk(e.names, 0)
	if edges < 400 {
		t.Fatalf("only %d edges: the test builds too small a tree", edges)
	}
}
