package memlimit

import (
	"os"
	"path/filepath"
	"testing"
)

// fakeRoot writes files under a temporary root: path → content.
func fakeRoot(t *testing.T, files map[string]string) string {
	t.Helper()
	root := t.TempDir()
	for p, c := range files {
		f := filepath.Join(root, p)
		if err := os.MkdirAll(filepath.Dir(f), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(f, []byte(c), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return root
}

const meminfo = "MemTotal:        1015808 kB\nMemFree:          500000 kB\n"

func TestRead(t *testing.T) {
	const ram = 1015808 << 10
	v2mount := "30 25 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n"
	hybrid := "30 25 0:26 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n" +
		"31 25 0:27 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n" +
		"32 25 0:28 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"
	for _, c := range []struct {
		name  string
		files map[string]string
		want  int64
		file  string
	}{
		{"v2 unit limit (MemoryMax=)", map[string]string{
			"proc/self/cgroup":    "0::/system.slice/egressd.service\n",
			"proc/self/mountinfo": v2mount,
			"sys/fs/cgroup/system.slice/egressd.service/memory.max": "134217728\n",
			"sys/fs/cgroup/system.slice/memory.max":                 "max\n",
		}, 128 << 20, "/sys/fs/cgroup/system.slice/egressd.service/memory.max"},
		{"v2 slice limit smaller than the unit's", map[string]string{
			"proc/self/cgroup":    "0::/system.slice/egressd.service\n",
			"proc/self/mountinfo": v2mount,
			"sys/fs/cgroup/system.slice/egressd.service/memory.max": "536870912\n",
			"sys/fs/cgroup/system.slice/memory.max":                 "268435456\n",
		}, 256 << 20, "/sys/fs/cgroup/system.slice/memory.max"},
		{"v2 no limit", map[string]string{
			"proc/self/cgroup":    "0::/system.slice/egressd.service\n",
			"proc/self/mountinfo": v2mount,
			"sys/fs/cgroup/system.slice/egressd.service/memory.max": "max\n",
		}, 0, ""},
		{"hybrid: v1 memory controller", map[string]string{
			"proc/self/cgroup":    "4:memory:/egressd\n2:cpu:/\n0::/\n",
			"proc/self/mountinfo": hybrid,
			"sys/fs/cgroup/memory/egressd/memory.limit_in_bytes": "134217728\n",
			"sys/fs/cgroup/memory/memory.limit_in_bytes":         "9223372036854771712\n",
		}, 128 << 20, "/sys/fs/cgroup/memory/egressd/memory.limit_in_bytes"},
		{"hybrid: v1 no limit", map[string]string{
			"proc/self/cgroup":    "4:memory:/egressd\n0::/\n",
			"proc/self/mountinfo": hybrid,
			"sys/fs/cgroup/memory/egressd/memory.limit_in_bytes": "9223372036854771712\n",
		}, 0, ""},
		{"a container's mount of its own subtree", map[string]string{
			"proc/self/cgroup":             "0::/docker/abc/app\n",
			"proc/self/mountinfo":          "30 25 0:26 /docker/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n",
			"sys/fs/cgroup/app/memory.max": "67108864\n",
		}, 64 << 20, "/sys/fs/cgroup/app/memory.max"},
		{"a mount point with a space", map[string]string{
			"proc/self/cgroup":    "0::/a\n",
			"proc/self/mountinfo": `30 25 0:26 / /cg\040v2 rw - cgroup2 cgroup2 rw` + "\n",
			"cg v2/a/memory.max":  "33554432\n",
		}, 32 << 20, "/cg v2/a/memory.max"},
		{"no cgroup files", map[string]string{}, 0, ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			c.files["proc/meminfo"] = meminfo
			l := read(fakeRoot(t, c.files))
			if l.Cgroup != c.want || l.File != c.file {
				t.Errorf("cgroup limit %d from %q, want %d from %q", l.Cgroup, l.File, c.want, c.file)
			}
			if l.RAM != ram {
				t.Errorf("RAM %d, want %d", l.RAM, ram)
			}
			want := int64(ram)
			if c.want > 0 {
				want = min(c.want, ram)
			}
			if got := l.Available(); got != want {
				t.Errorf("available %d, want %d", got, want)
			}
		})
	}
}

func TestGoLimit(t *testing.T) {
	for _, c := range []struct{ cgroup, want int64 }{
		{0, 0},
		{128 << 20, 112 << 20},        // 16 MiB left
		{1 << 30, 1<<30 - (1<<30)/10}, // a tenth left
		{512 << 20, 512<<20 - (512<<20)/10},
		{20 << 20, 10 << 20}, // never under half
	} {
		if got := (Limits{Cgroup: c.cgroup}).GoLimit(); got != c.want {
			t.Errorf("GoLimit under %d MiB: %d, want %d", c.cgroup>>20, got, c.want)
		}
	}
}

// TestReadHere: the running system's limits read without failing; the
// RAM is found on Linux.
func TestReadHere(t *testing.T) {
	l := Read()
	t.Logf("%+v", l)
	if _, err := os.Stat("/proc/meminfo"); err == nil && l.RAM <= 0 {
		t.Errorf("no RAM read from /proc/meminfo: %+v", l)
	}
}
