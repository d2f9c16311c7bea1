package policy

import (
	"hash/maphash"
	"math/bits"
)

// nameTable is the lookup form of the name suffix tree, built once by seal:
// the nodes in one array and every parent→label→child edge in one
// open-addressing hash table whose entries carry short labels inline, so
// that a step down the tree reads one entry (one cache line) instead of a Go
// map's control word, slot, key string and node. At 100,000 rules the walk
// is what a decision pays for, in cache misses.
type nameTable struct {
	nodes []flatNode // nodes[0] is the root
	edges []edge     // len is a power of two, at most half full
	refs  []ref      // exact and "*." refs of the nodes, flat
	globs []globRef  // in-label glob refs of the nodes, flat
	long  []string   // long[child]: the label of a node whose label is not inline
	seed  maphash.Seed
}

type flatNode struct {
	exactOff, exactN uint32 // refs[exactOff:][:exactN]
	subOff, subN     uint32 // refs[subOff:][:subN]
	globOff, globN   uint32 // globs[globOff:][:globN]
	// The first exact and "*." rules (refs are in file order) when they
	// have no path, so that the common case reads no refs; -1 otherwise.
	exact0, sub0 int32
}

// first returns the rule of refs[0] when it has no path, else -1.
func first(refs []ref) int32 {
	if len(refs) == 0 || refs[0].path != nil {
		return -1
	}
	return refs[0].rule
}

// inlineLabel is how many bytes of a label an edge holds; longer labels are
// compared against nameTable.long.
const inlineLabel = 14

type edge struct {
	h      uint64 // hash of (parent, label); 0 only for empty entries
	parent uint32
	child  uint32 // 0: empty (the root is nobody's child)
	n      uint16 // label length
	label  [inlineLabel]byte
}

func (t *nameTable) hash(parent uint32, label string) uint64 {
	h := maphash.String(t.seed, label) ^ (uint64(parent)+1)*0x9e3779b97f4a7c15
	h ^= h >> 29
	if h == 0 {
		h = 1
	}
	return h
}

// child returns the node under parent for label, or 0.
func (t *nameTable) child(parent uint32, label string) uint32 {
	if len(t.edges) == 0 {
		return 0
	}
	h := t.hash(parent, label)
	mask := uint64(len(t.edges) - 1)
	for i := h & mask; ; i = (i + 1) & mask {
		e := &t.edges[i]
		if e.child == 0 {
			return 0
		}
		if e.h != h || e.parent != parent || int(e.n) != len(label) {
			continue
		}
		if len(label) <= inlineLabel {
			if string(e.label[:len(label)]) == label {
				return e.child
			}
		} else if t.long[e.child] == label {
			return e.child
		}
	}
}

// seal builds the table from the build-time tree rooted at root.
func sealNames(root *nameNode) *nameTable {
	t := &nameTable{seed: maphash.MakeSeed()}
	type edgeSrc struct {
		parent, child uint32
		label         string
	}
	var srcs []edgeSrc
	var labels []string
	var visit func(n *nameNode, label string) uint32
	visit = func(n *nameNode, label string) uint32 {
		id := uint32(len(t.nodes))
		t.nodes = append(t.nodes, flatNode{})
		labels = append(labels, label)
		f := flatNode{
			exactOff: uint32(len(t.refs)), exactN: uint32(len(n.exact)),
		}
		t.refs = append(t.refs, n.exact...)
		f.subOff, f.subN = uint32(len(t.refs)), uint32(len(n.sub))
		t.refs = append(t.refs, n.sub...)
		f.globOff, f.globN = uint32(len(t.globs)), uint32(len(n.globs))
		t.globs = append(t.globs, n.globs...)
		f.exact0, f.sub0 = first(n.exact), first(n.sub)
		t.nodes[id] = f
		for l, c := range n.children {
			srcs = append(srcs, edgeSrc{parent: id, child: visit(c, l), label: l})
		}
		return id
	}
	visit(root, "")
	if len(srcs) == 0 {
		return t
	}
	size := 1 << bits.Len(uint(2*len(srcs)-1)) // at most half full
	t.edges = make([]edge, size)
	mask := uint64(size - 1)
	long := false
	for _, s := range srcs {
		h := t.hash(s.parent, s.label)
		i := h & mask
		for t.edges[i].child != 0 {
			i = (i + 1) & mask
		}
		e := edge{h: h, parent: s.parent, child: s.child, n: uint16(len(s.label))}
		copy(e.label[:], s.label)
		long = long || len(s.label) > inlineLabel
		t.edges[i] = e
	}
	if long {
		t.long = make([]string, len(t.nodes))
		for id, l := range labels {
			if len(l) > inlineLabel {
				t.long[id] = l
			}
		}
	}
	return t
}
