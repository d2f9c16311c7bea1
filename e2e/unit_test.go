package e2e

import (
	"bufio"
	"bytes"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// unitFile is the systemd unit egressd ships, relative to this package.
const unitFile = "../dist/egressd.service"

// unitService returns the [Service] settings of the unit file: each key's
// values, split on white space, in file order (a key given twice has the
// values of both lines, as systemd adds them up for the settings read
// here).
func unitService(t *testing.T) map[string][]string {
	t.Helper()
	b, err := os.ReadFile(unitFile)
	if err != nil {
		t.Fatal(err)
	}
	out := map[string][]string{}
	section := ""
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || line[0] == '#' || line[0] == ';':
		case line[0] == '[':
			section = line
		case section == "[Service]":
			k, v, ok := strings.Cut(line, "=")
			if !ok {
				t.Fatalf("%s: not a setting: %q", unitFile, line)
			}
			out[k] = append(out[k], strings.Fields(v)...)
		}
	}
	return out
}

// capBits are the capabilities of capabilities(7) by number.
var capBits = []string{"CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
	"CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE",
	"CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE",
	"CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT",
	"CAP_SYS_NICE", "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
	"CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG",
	"CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE"}

// capMask is the capability set of names, as /proc/PID/status prints one.
func capMask(t *testing.T, names []string) uint64 {
	t.Helper()
	var m uint64
	for _, n := range names {
		i := slices.Index(capBits, strings.ToUpper(n))
		if i < 0 {
			t.Fatalf("%s: unknown capability %s", unitFile, n)
		}
		m |= 1 << i
	}
	return m
}

// unitSandbox is how the test runs egressd as the unit would, without
// systemd: setpriv's arguments and what the process must look like.
type unitSandbox struct {
	families   []string // RestrictAddressFamilies
	uid        int
	wrap       []string // setpriv ... (egressd and its arguments follow)
	caps       uint64   // ambient = bounding = permitted = effective
	noNewPrivs bool
	stateMode  fs.FileMode
}

// newUnitSandbox reads the unit: its capabilities (ambient and bounding
// set), NoNewPrivileges and StateDirectoryMode; and picks a uid no user of
// the system has, in systemd's DynamicUser range (61184-65519).
func newUnitSandbox(t *testing.T) *unitSandbox {
	t.Helper()
	svc := unitService(t)
	if !slices.Equal(svc["DynamicUser"], []string{"yes"}) {
		t.Fatalf("%s: DynamicUser is %v: the test runs egressd as a uid of its own, as DynamicUser=yes does; update it", unitFile, svc["DynamicUser"])
	}
	ambient, bounding := svc["AmbientCapabilities"], svc["CapabilityBoundingSet"]
	if len(ambient) == 0 {
		t.Fatalf("%s: no AmbientCapabilities: egressd as a dynamic user would have no capability at all", unitFile)
	}
	s := &unitSandbox{caps: capMask(t, ambient), noNewPrivs: slices.Equal(svc["NoNewPrivileges"], []string{"yes"}), stateMode: 0o755}
	if bnd := capMask(t, bounding); bnd&s.caps != s.caps {
		t.Fatalf("%s: AmbientCapabilities %v not all in CapabilityBoundingSet %v: systemd drops those", unitFile, ambient, bounding)
	} else if bnd != s.caps {
		t.Fatalf("%s: CapabilityBoundingSet %v is more than AmbientCapabilities %v: the test runs with exactly the ambient set; update it", unitFile, bounding, ambient)
	}
	s.families = svc["RestrictAddressFamilies"]
	if m := svc["StateDirectoryMode"]; len(m) == 1 {
		v, err := strconv.ParseUint(m[0], 8, 32)
		if err != nil {
			t.Fatalf("%s: StateDirectoryMode %q: %v", unitFile, m[0], err)
		}
		s.stateMode = fs.FileMode(v)
	}
	passwd, _ := os.ReadFile("/etc/passwd")
	group, _ := os.ReadFile("/etc/group")
	taken := func(db []byte, id int) bool {
		return bytes.Contains(db, []byte(fmt.Sprintf(":%d:", id)))
	}
	for id := 61184 + os.Getpid()%4000; ; id++ {
		if !taken(passwd, id) && !taken(group, id) {
			s.uid = id
			break
		}
	}
	var setpriv []string
	for _, c := range ambient {
		setpriv = append(setpriv, "+"+strings.ToLower(strings.TrimPrefix(c, "CAP_")))
	}
	set := "-all," + strings.Join(setpriv, ",")
	id := strconv.Itoa(s.uid)
	s.wrap = []string{"setpriv", "--reuid", id, "--regid", id, "--clear-groups",
		"--inh-caps", set, "--ambient-caps", set, "--bounding-set", set}
	if s.noNewPrivs {
		s.wrap = append(s.wrap, "--no-new-privs")
	}
	// LimitNOFILE: where this machine lets the test raise the hard limit
	// that far (CAP_SYS_RESOURCE), else egressd runs with the test's.
	if n := svc["LimitNOFILE"]; len(n) == 1 {
		want, err := strconv.ParseUint(n[0], 10, 64)
		var lim syscall.Rlimit
		if err == nil && syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim) == nil && (lim.Max >= want || hasCap(unix.CAP_SYS_RESOURCE)) {
			s.wrap = append([]string{"prlimit", "--nofile=" + n[0] + ":" + n[0]}, s.wrap...)
		} else {
			t.Logf("LimitNOFILE=%s not emulated: the hard limit here is %d, and no CAP_SYS_RESOURCE to raise it", n[0], lim.Max)
		}
	}
	return s
}

// hasCap reports whether the test has capability c in its effective set.
func hasCap(c int) bool {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if unix.Capget(&hdr, &data[0]) != nil {
		return false
	}
	return data[c/32].Effective&(1<<(c%32)) != 0
}

// checkProcess checks the running egressd has the unit's uid, gid, no
// supplementary groups, exactly the unit's capabilities and no_new_privs:
// that the test runs what it says it runs.
func (s *unitSandbox) checkProcess(t *testing.T, pid int) {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
	if filepath.Base(exe) != "egressd" {
		t.Fatalf("PID %d is %s, not egressd", pid, exe)
	}
	id := strconv.Itoa(s.uid)
	want := map[string]string{
		"Uid": strings.Repeat(id+"\t", 3) + id, "Gid": strings.Repeat(id+"\t", 3) + id, "Groups": "",
		"CapInh": fmt.Sprintf("%016x", s.caps), "CapPrm": fmt.Sprintf("%016x", s.caps), "CapEff": fmt.Sprintf("%016x", s.caps),
		"CapBnd": fmt.Sprintf("%016x", s.caps), "CapAmb": fmt.Sprintf("%016x", s.caps),
	}
	if s.noNewPrivs {
		want["NoNewPrivs"] = "1"
	}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, _ := strings.Cut(line, ":")
		if w, ok := want[k]; ok {
			if strings.TrimSpace(v) != w {
				t.Errorf("egressd's %s is %q, want %q", k, strings.TrimSpace(v), w)
			}
			delete(want, k)
		}
	}
	if len(want) != 0 {
		t.Errorf("/proc/%d/status lacks %v", pid, want)
	}
}

// socketTables are the /proc/PID/net tables of each address family, and
// the column of the socket's inode in each.
var socketTables = map[string]map[string]int{
	"AF_INET":    {"tcp": 9, "udp": 9, "raw": 9, "udplite": 9, "icmp": 9},
	"AF_INET6":   {"tcp6": 9, "udp6": 9, "raw6": 9, "udplite6": 9, "icmp6": 9},
	"AF_UNIX":    {"unix": 6},
	"AF_NETLINK": {"netlink": 9},
	"AF_PACKET":  {"packet": 8},
}

// checkSockets checks that every socket egressd holds is of a family
// RestrictAddressFamilies allows (the seccomp filter systemd installs
// refuses the others at socket(2); this sees only the sockets open now).
// A socket opened between the two reads is looked at again.
func (s *unitSandbox) checkSockets(t *testing.T, pid int, when string) {
	t.Helper()
	if len(s.families) == 0 {
		return
	}
	sockets := func() map[string]bool {
		out := map[string]bool{}
		ents, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
		for _, e := range ents {
			l, _ := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, e.Name()))
			if ino, ok := strings.CutPrefix(l, "socket:["); ok {
				out[strings.TrimSuffix(ino, "]")] = true
			}
		}
		return out
	}
	allowed := func() map[string]bool {
		out := map[string]bool{}
		for _, f := range s.families {
			tables, ok := socketTables[f]
			if !ok {
				t.Fatalf("%s: RestrictAddressFamilies %s: the test knows no /proc table of it; add it to socketTables", unitFile, f)
			}
			for name, col := range tables {
				b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/net/%s", pid, name))
				for i, line := range strings.Split(string(b), "\n") {
					if f := strings.Fields(line); i > 0 && len(f) > col {
						out[f[col]] = true
					}
				}
			}
		}
		return out
	}
	var bad []string
	for try := 0; try < 3; try++ {
		before := sockets()
		ok := allowed()
		after := sockets()
		bad = bad[:0]
		for ino := range before {
			if !ok[ino] && after[ino] {
				bad = append(bad, ino)
			}
		}
		if len(bad) == 0 {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Errorf("%s: egressd holds sockets %v of a family RestrictAddressFamilies=%s does not allow", when, bad, strings.Join(s.families, " "))
}

// checkNoWX checks egressd has no memory mapping both writable and
// executable, which MemoryDenyWriteExecute would have refused.
func checkNoWX(t *testing.T, pid int) {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/maps", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 1 && strings.Contains(f[1], "w") && strings.Contains(f[1], "x") {
			t.Errorf("egressd has a writable and executable mapping (MemoryDenyWriteExecute refuses it): %s", line)
		}
	}
}

// notifySocket is a stand-in for systemd's notification socket
// (Type=notify): it collects what egressd sends.
type notifySocket struct {
	path string
	mu   sync.Mutex
	got  []string
}

func newNotifySocket(t *testing.T, dir string) *notifySocket {
	t.Helper()
	n := &notifySocket{path: filepath.Join(dir, "notify")}
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: n.path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	// systemd's /run/systemd/notify is writable by every user.
	if err := os.Chmod(n.path, 0o777); err != nil {
		t.Fatal(err)
	}
	go func() {
		buf := make([]byte, 4096)
		for {
			k, err := c.Read(buf)
			if err != nil {
				return
			}
			n.mu.Lock()
			n.got = append(n.got, strings.SplitN(string(buf[:k]), "\n", 2)[0])
			n.mu.Unlock()
		}
	}()
	return n
}

// states returns what came so far, one state a message.
func (n *notifySocket) states() []string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return slices.Clone(n.got)
}

// waitFor waits up to 5s for the states so far to be want.
func (n *notifySocket) waitFor(t *testing.T, want ...string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !slices.Equal(n.states(), want) {
		if time.Now().After(deadline) {
			t.Errorf("systemd notifications %q, want %q", n.states(), want)
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// strayFiles returns the files the uid owns under dirs, walking only the
// directories the uid owns or every user may write to: the places an
// unprivileged process can write (the unit gives egressd its state
// directory and nothing else to write).
func strayFiles(uid int, dirs ...string) []string {
	var out []string
	for _, dir := range dirs {
		filepath.WalkDir(dir, func(p string, de fs.DirEntry, err error) error {
			if err != nil {
				if de != nil && de.IsDir() {
					return fs.SkipDir
				}
				return nil
			}
			info, err := de.Info()
			if err != nil {
				return nil
			}
			st, ok := info.Sys().(*syscall.Stat_t)
			if !ok {
				return nil
			}
			if int(st.Uid) == uid {
				out = append(out, p)
			}
			// Only a directory the uid owns or may write to can hold
			// its files: the others are not walked (this is /tmp).
			if de.IsDir() && p != dir && int(st.Uid) != uid && info.Mode().Perm()&0o002 == 0 {
				return fs.SkipDir
			}
			return nil
		})
	}
	return out
}

// TestSystemdUnitLimits runs `egressd run` the way dist/egressd.service
// does, as far as a test can without systemd: as a uid of its own (a
// DynamicUser's) with no supplementary group, exactly the unit's
// capabilities as ambient and bounding set, no_new_privs, its file
// descriptor limit, its state directory owned by that uid with the unit's
// mode, the policy a root-owned file it can only read, and a notification
// socket standing in for systemd's. Every other e2e test runs egressd as
// root with every capability, where something that needs more (a
// root-owned file, a sysctl, setns, a capability the unit does not give)
// works and fails only in production.
//
// Not emulated: RestrictAddressFamilies, SystemCallArchitectures and
// MemoryDenyWriteExecute (seccomp filters), RestrictNamespaces (seccomp
// too: setns is checked by reading the code path, and a setns here would
// fail anyway, as a uid without CAP_SYS_ADMIN), ProtectSystem and the
// other mount-namespace settings (egressd as an unprivileged uid can
// write only where any uid can: the test looks there for its files
// afterwards), ProtectKernelTunables (a sysctl write as this uid fails
// on file permissions all the same).
func TestSystemdUnitLimits(t *testing.T) {
	sb := newUnitSandbox(t)
	tp := newTopo(t)

	// The layout of the unit: /etc/egressd/policy.yaml root's and
	// world-readable, /var/lib/egressd the dynamic user's, mode 0750.
	base, err := os.MkdirTemp("", "egressd-unit-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(base) })
	etc, state := filepath.Join(base, "etc"), filepath.Join(base, "state")
	for _, dir := range []string{etc, state} {
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chmod(base, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(state, sb.uid, sb.uid); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(state, sb.stateMode); err != nil {
		t.Fatal(err)
	}
	notify := newNotifySocket(t, base)
	// The binary where every user may execute it, as /usr/local/bin is
	// (egressdBin's directory is root's alone, and egressd executes
	// itself again at start, as the unit's user).
	bin := filepath.Join(base, "egressd")
	if out, err := exec.Command("install", "-m", "0755", egressdBin, bin).CombinedOutput(); err != nil {
		t.Fatalf("install egressd: %v\n%s", err, out)
	}

	d := newDaemon(t, tp, "enforce")
	d.policy, d.stateDir = filepath.Join(etc, "policy.yaml"), state
	seed := testPolicy(t)
	d.writePolicy(append(bytes.Clone(seed), udpRule...))
	d.wrap = append([]string{"env", "NOTIFY_SOCKET=" + notify.path}, sb.wrap...)
	d.bin = bin

	// ExecStartPre: the policy check, as the same user.
	pre, err := tp.gw.Run(append(slices.Clone(sb.wrap), bin, "policy", "check", "-q", d.policy)...)
	if err != nil {
		t.Fatalf("ExecStartPre egressd policy check -q: %v\n%s", err, pre)
	}

	d.start()
	sb.checkProcess(t, d.proc.Cmd.Process.Pid)
	notify.waitFor(t, "READY=1")
	if logs := d.logs(); strings.Contains(logs, "NOT RUNNING") || strings.Contains(logs, "needs CAP_") ||
		strings.Contains(logs, "permission denied") || strings.Contains(logs, "operation not permitted") {
		t.Errorf("egressd under the unit's limits lacks something:\n%s", logs)
	}
	if !tp.nftTable() {
		t.Fatal("no nftables table inet egressd after start")
	}
	sb.checkSockets(t, d.proc.Cmd.Process.Pid, "at start")
	t.Logf("egressd output at start:\n%s", d.logs())

	// DNS and HTTPS from the LAN, allowed and denied.
	if rcode, addrs := tp.dig(t, dockerName, "A"); rcode != "NOERROR" || !slices.Equal(addrs, []string{dockerIP4}) {
		t.Errorf("dig %s: %s %v, want NOERROR [%s]", dockerName, rcode, addrs, dockerIP4)
	}
	if rcode, addrs := tp.dig(t, trackerName, "A"); rcode != "REFUSED" {
		t.Errorf("dig %s: %s %v, want REFUSED", trackerName, rcode, addrs)
	}
	if body, err := tp.curl(dockerName, 443, dockerIP4, "/v2/", true); err != nil || !strings.Contains(body, "sni="+dockerName) {
		t.Errorf("curl https://%s: %q %v", dockerName, body, err)
	}
	if body, err := tp.curl(trackerName, 443, trackerIP, "/", true); err == nil {
		t.Errorf("curl https://%s got through: %q", trackerName, body)
	}

	// Forwarded UDP, and a reload that removes the ntp rule: its flow is
	// cut (the conntrack sweep, over ctnetlink), the other rule's lives.
	f := openUDPFlows(t, tp)
	ntp, echo := f.ntp, f.echo
	if err := ntp(); err != nil {
		t.Fatalf("NTP before the reload: %v", err)
	}
	if err := echo(); err != nil {
		t.Fatalf("UDP echo before the reload: %v", err)
	}
	d.writePolicy(append(withoutNTPRule(t, seed), udpRule...))
	d.hup(true)
	if err := ntp(); err == nil {
		t.Error("the NTP flow still gets answers after its rule was removed")
	}
	if err := echo(); err != nil {
		t.Errorf("the other rule's UDP flow after the reload: %v", err)
	}
	if v := d.metric(`egress_firewall_reload_flows_total{result="cut"}`); v != 1 {
		t.Errorf(`egress_firewall_reload_flows_total{result="cut"} = %v, want 1`, v)
	}
	sb.checkSockets(t, d.proc.Cmd.Process.Pid, "after the reload")
	checkNoWX(t, d.proc.Cmd.Process.Pid)
	notify.waitFor(t, "READY=1", "RELOADING=1", "READY=1")
	if code, body, err := d.get("/readyz"); err != nil || code != 200 {
		t.Errorf("/readyz after the reload: %d %q %v", code, body, err)
	}

	// The report, from the daemon; then a clean stop, and the report from
	// the state directory, as the operator (root) runs it.
	r := d.report()
	if ruleFlows(r, "vendor-cloud") == 0 || !hasDropped(r, trackerName, 443, "tcp") {
		t.Errorf("report from the daemon: vendor-cloud %d flows, dropped %s:443 %v", ruleFlows(r, "vendor-cloud"), trackerName, hasDropped(r, trackerName, 443, "tcp"))
	}
	d.stop()
	notify.waitFor(t, "READY=1", "RELOADING=1", "READY=1", "STOPPING=1")
	if !tp.nftTable() {
		t.Error("enforce mode: the table is gone after a clean stop")
	}
	out, err := exec.Command(egressdBin, "report", "--json", "--state-dir", state).CombinedOutput()
	if err != nil || !bytes.Contains(out, []byte(`"vendor-cloud"`)) {
		t.Errorf("egressd report --state-dir: %v\n%s", err, out)
	}

	// Audit mode, as the profile ships (no WAN guard): the start removes
	// the enforce run's table. With --proxy-users where the README puts
	// it for the unit: the credential systemd copies from
	// /etc/egressd/proxy-users (LoadCredential=), mode 0400 and the
	// service user's, in a directory of its (0500).
	cmd := exec.Command(bin, "proxy-users", "hash", "--cost", "4", "e2e")
	cmd.Stdin = strings.NewReader("unit-password\n")
	line, err := cmd.Output()
	if err != nil {
		t.Fatalf("egressd proxy-users hash: %v", err)
	}
	creds := filepath.Join(base, "credentials")
	users := filepath.Join(creds, "proxy-users")
	if err := os.Mkdir(creds, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(users, line, 0o400); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{users, creds} {
		if err := os.Chown(p, sb.uid, sb.uid); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chmod(creds, 0o500); err != nil {
		t.Fatal(err)
	}
	d.extra = []string{"--proxy-users", users}
	d.mode, d.noGuard = "audit", true
	d.start()
	proxied := func(user string) string {
		out, _ := tp.lan.Run("curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5", "--cacert", tp.caFile,
			"-x", "http://"+user+gwLAN4+":3128", "--resolve", dockerName+":443:"+dockerIP4, "https://"+dockerName+"/")
		return strings.TrimSpace(out)
	}
	if got := proxied("e2e:unit-password@"); got != "200" {
		t.Errorf("explicit proxy with the credential's user: HTTP %s, want 200", got)
	}
	if got := proxied(""); !strings.Contains(got, "407") {
		t.Errorf("explicit proxy without a user: %s, want 407", got)
	}
	sb.checkProcess(t, d.proc.Cmd.Process.Pid)
	if tp.nftTable() {
		t.Error("audit start under the unit's limits left the enforce run's table")
	}
	sb.checkSockets(t, d.proc.Cmd.Process.Pid, "audit mode")
	if body, err := tp.curl(trackerName, 443, trackerIP, "/", true); err != nil {
		t.Errorf("audit mode: curl https://%s: %q %v", trackerName, body, err)
	}
	d.stop()

	if logs := d.logs(); strings.Contains(logs, "NOT RUNNING") || strings.Contains(logs, "permission denied") ||
		strings.Contains(logs, "operation not permitted") || strings.Contains(logs, `"level":"ERROR"`) {
		t.Errorf("egressd under the unit's limits:\n%s", logs)
	}
	// Nothing written but the state directory (PrivateTmp and
	// ProtectSystem=strict would refuse it in production).
	if stray := slices.DeleteFunc(strayFiles(sb.uid, "/tmp", "/var/tmp", "/dev/shm", "/run"), func(p string) bool {
		return p == state || strings.HasPrefix(p, state+"/")
	}); len(stray) != 0 {
		t.Errorf("egressd wrote outside its state directory: %v", stray)
	}
}
