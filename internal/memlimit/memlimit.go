// Package memlimit finds the memory egressd run may use: the limit of its
// cgroup (systemd's MemoryMax=: memory.max under cgroup v2,
// memory.limit_in_bytes under v1; the smallest on the way from the
// process's cgroup up to its hierarchy's root) and the machine's RAM
// (MemTotal). egressd run sets the Go runtime's soft memory limit from the
// first (GoLimit), so that the garbage collector works harder before the
// kernel's OOM killer would end the process, and sizes what scales with
// memory from the smaller of the two (Available).
package memlimit

import (
	"bufio"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// Limits is what Read found. A zero field was not found.
type Limits struct {
	// Cgroup is the smallest memory limit of the process's cgroup and
	// its ancestors, in bytes; 0 when none is set.
	Cgroup int64
	// File is where Cgroup was read.
	File string
	// RAM is the machine's memory (MemTotal), in bytes.
	RAM int64
}

// Read reads the limits of the running process.
func Read() Limits { return read("/") }

// Available is the memory the process may use: the cgroup's limit, or the
// machine's RAM when that is smaller or no limit is set; 0 when neither
// is known.
func (l Limits) Available() int64 {
	switch {
	case l.Cgroup > 0 && l.RAM > 0:
		return min(l.Cgroup, l.RAM)
	case l.Cgroup > 0:
		return l.Cgroup
	}
	return l.RAM
}

// GoLimit is the Go runtime's soft memory limit for a process under
// l.Cgroup: the limit less a tenth of it (16 MiB at least), left for what
// the cgroup also counts and Go does not (the event log's page cache,
// socket buffers, the binary's pages), and never under half the limit.
// 0 when no cgroup limit is set: the runtime's default (no limit) stays.
func (l Limits) GoLimit() int64 {
	if l.Cgroup <= 0 {
		return 0
	}
	return max(l.Cgroup-max(l.Cgroup/10, 16<<20), l.Cgroup/2)
}

// noLimit: cgroup v1 writes "no limit" as the largest page count in
// bytes (0x7ffffffffffff000 with 4 KiB pages); anything this large is none.
const noLimit = 1 << 62

func read(root string) Limits {
	var l Limits
	l.RAM = memTotal(filepath.Join(root, "proc/meminfo"))
	paths := cgroupPaths(filepath.Join(root, "proc/self/cgroup"))
	for _, m := range cgroupMounts(filepath.Join(root, "proc/self/mountinfo")) {
		p, ok := paths[m.kind]
		if !ok {
			continue
		}
		file := "memory.max"
		if m.kind == "v1" {
			file = "memory.limit_in_bytes"
		}
		// The cgroup's directory under the mount: its path in
		// /proc/self/cgroup is from the hierarchy's root, of which the
		// mount may show only a subtree (a container's).
		rel := "/"
		if m.root == "/" {
			rel = p
		} else if r, ok := strings.CutPrefix(p, m.root); ok && (r == "" || r[0] == '/') {
			rel = r
		}
		top := filepath.Join(root, m.point)
		for dir := filepath.Join(top, rel); ; dir = filepath.Dir(dir) {
			if v, ok := readLimit(filepath.Join(dir, file)); ok && (l.Cgroup == 0 || v < l.Cgroup) {
				l.Cgroup, l.File = v, strings.TrimPrefix(filepath.Join(dir, file), strings.TrimSuffix(root, "/"))
			}
			if dir == top || !strings.HasPrefix(dir, top) {
				break
			}
		}
	}
	return l
}

// readLimit reads one limit file: a number of bytes, or "max" (v2) or a
// huge number (v1) for none.
func readLimit(file string) (int64, bool) {
	b, err := os.ReadFile(file)
	if err != nil {
		return 0, false
	}
	v, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil || v <= 0 || v >= noLimit {
		return 0, false
	}
	return v, true
}

// cgroupPaths reads /proc/self/cgroup: the process's cgroup in the v2
// hierarchy ("v2") and in the v1 hierarchy of the memory controller
// ("v1").
func cgroupPaths(file string) map[string]string {
	out := map[string]string{}
	f, err := os.Open(file)
	if err != nil {
		return out
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// hierarchy-ID:controller-list:cgroup-path
		parts := strings.SplitN(sc.Text(), ":", 3)
		if len(parts) != 3 {
			continue
		}
		switch {
		case parts[0] == "0" && parts[1] == "":
			out["v2"] = parts[2]
		case hasWord(parts[1], "memory"):
			out["v1"] = parts[2]
		}
	}
	return out
}

type mount struct {
	kind  string // "v2", or "v1" (the memory controller's hierarchy)
	root  string // the part of the hierarchy mounted
	point string // where
}

// cgroupMounts reads /proc/self/mountinfo: the cgroup v2 mounts and the
// v1 mounts of the memory controller.
func cgroupMounts(file string) []mount {
	f, err := os.Open(file)
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []mount
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// id parent major:minor root mount-point options [optional...] - fstype source super-options
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		if !ok {
			continue
		}
		f1, f2 := strings.Fields(pre), strings.Fields(post)
		if len(f1) < 5 || len(f2) < 3 {
			continue
		}
		m := mount{root: unescape(f1[3]), point: unescape(f1[4])}
		switch {
		case f2[0] == "cgroup2":
			m.kind = "v2"
		case f2[0] == "cgroup" && hasWord(f2[2], "memory"):
			m.kind = "v1"
		default:
			continue
		}
		out = append(out, m)
	}
	return out
}

// unescape undoes mountinfo's octal escapes (\040 for a space).
func unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// hasWord reports whether the comma-separated list has w.
func hasWord(list, w string) bool {
	for _, x := range strings.Split(list, ",") {
		if x == w {
			return true
		}
	}
	return false
}

// memTotal reads MemTotal from /proc/meminfo, in bytes.
func memTotal(file string) int64 {
	b, err := os.ReadFile(file)
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "MemTotal:"); ok {
			f := strings.Fields(rest)
			if len(f) == 2 && f[1] == "kB" {
				if v, err := strconv.ParseInt(f[0], 10, 64); err == nil {
					return v << 10
				}
			}
		}
	}
	return 0
}
