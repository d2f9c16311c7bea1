package e2e

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// A read-only state directory (THREATS.md G3), at start (in enforce and
// in audit mode) and while egressd runs (enforce mode): egressd keeps
// deciding, /readyz and
// egress_audit_write_failed_events_total say the event log is not
// written, one log line says why, nothing on disk is changed, and
// writing resumes once the directory is writable again.
//
// At start the directory is a read-only bind mount in a mount namespace
// of egressd's own (unshare), made writable again with nsenter. While
// running, a read-only bind remount is refused (EBUSY) as long as
// egressd holds its event log open for writing: what makes a directory
// read-only under a running daemon is the filesystem's own remount on
// an I/O error (ext4 errors=remount-ro), here an ext4 image on a loop
// device whose error is triggered through sysfs. That remount is for
// good (ext4 refuses remount,rw after it): the directory becomes
// writable again as an operator makes it, by mounting the filesystem
// anew (umount -l, mount) in the test's and egressd's mount namespaces.
func TestHardeningReadOnlyStateDir(t *testing.T) {
	for _, tool := range []string{"unshare", "nsenter", "mount", "umount", "losetup", "mkfs.ext4"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s: %v", tool, err)
		}
	}
	tp := newTopo(t)
	t.Run("at-start", func(t *testing.T) { readOnlyAtStart(t, tp, "enforce") })
	t.Run("at-start-audit", func(t *testing.T) { readOnlyAtStart(t, tp, "audit") })
	t.Run("while-running", func(t *testing.T) { readOnlyWhileRunning(t, tp) })
}

// roTraffic is one allowed TLS connection after its DNS answer and one
// to a name no rule allows: it fails the test if either is not what the
// mode says (enforce refuses the second, audit lets it through).
func roTraffic(t *testing.T, tp *topo, mode, when string) {
	t.Helper()
	if rcode, addrs := tp.dig(t, dockerName, "A"); rcode != "NOERROR" || len(addrs) == 0 {
		t.Errorf("dig %s %s: %s %v", dockerName, when, rcode, addrs)
	}
	if err := tp.legitGet(); err != nil {
		t.Errorf("allowed connection %s: %v", when, err)
	}
	o := tp.sendHello(trackerIP+":443", buildHello(helloSpec{sni: [][]string{{trackerName}}}), 0, 0)
	if mode == "audit" && (o.denied || o.err != nil) {
		t.Errorf("connection no rule allows %s, audit mode: %v, want it through", when, o)
	}
	if mode != "audit" && !o.denied {
		t.Errorf("denied connection %s: %v", when, o)
	}
}

// snapshot is the content of every file in dir.
func snapshot(t *testing.T, dir string) map[string][]byte {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(dir, "*"))
	if err != nil {
		t.Fatal(err)
	}
	m := map[string][]byte{}
	for _, f := range files {
		if fi, err := os.Lstat(f); err != nil || !fi.Mode().IsRegular() {
			continue
		}
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		m[filepath.Base(f)] = b
	}
	return m
}

// sameFiles fails the test if a file of before is gone or changed in
// dir; with grown, the event log may have grown (before is its prefix).
func sameFiles(t *testing.T, dir string, before map[string][]byte, grown bool, when string) {
	t.Helper()
	now := snapshot(t, dir)
	for name, b := range before {
		n, ok := now[name]
		switch {
		case !ok:
			t.Errorf("%s: %s is gone", when, name)
		case grown && name == "events.ndjson":
			if !bytes.HasPrefix(n, b) {
				t.Errorf("%s: the event log's first %d bytes changed (now %d bytes)", when, len(b), len(n))
			}
		case !bytes.Equal(n, b):
			t.Errorf("%s: %s changed (%d bytes, was %d)", when, name, len(n), len(b))
		}
	}
	if !grown && len(now) != len(before) {
		var names []string
		for name := range now {
			if _, ok := before[name]; !ok {
				names = append(names, name)
			}
		}
		t.Errorf("%s: new files in the state directory: %v", when, names)
	}
}

// roLines counts egressd's JSON log lines about the event log's
// read-only directory (not the plain summary lines at start).
func (d *daemon) roLines() int {
	b, _ := os.ReadFile(d.logFile)
	n := 0
	for _, l := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(l, "{") && strings.Contains(l, "event log") && strings.Contains(l, "read-only file system") {
			n++
		}
	}
	return n
}

// waitReady sends traffic until /readyz answers code (10 s at most) and
// returns its body.
func (d *daemon) waitReady(tp *topo, code int, when string) string {
	t := d.t
	t.Helper()
	var got int
	var body string
	deadline := time.Now().Add(10 * time.Second)
	for i := 0; ; i++ {
		roTraffic(t, tp, d.mode, fmt.Sprintf("%s (round %d)", when, i))
		got, body, _ = d.get("/readyz")
		if got == code || time.Now().After(deadline) {
			break
		}
		time.Sleep(300 * time.Millisecond)
	}
	if got != code {
		t.Errorf("/readyz %s: %d %q, want %d", when, got, body, code)
	}
	return body
}

// readOnlyFailing checks what a running daemon says while its state
// directory is read-only, with a few more rounds of traffic: /readyz
// names the event log and the errno, the metric counts, one log line.
func (d *daemon) readOnlyFailing(tp *topo, when string) {
	t := d.t
	t.Helper()
	failed0 := d.metric("egress_audit_write_failed_events_total")
	body := d.waitReady(tp, 503, when)
	if !strings.Contains(body, "event log write failing") || !strings.Contains(body, "read-only file system") {
		t.Errorf("/readyz %s: %q, want it to name \"event log write failing\" and \"read-only file system\"", when, body)
	}
	for i := 0; i < 3; i++ {
		roTraffic(t, tp, d.mode, fmt.Sprintf("%s (more, %d)", when, i))
		time.Sleep(500 * time.Millisecond)
	}
	if code, body, err := d.get("/healthz"); err != nil || code != 200 {
		t.Errorf("/healthz %s: %d %q %v", when, code, body, err)
	}
	// The journal writes every half flush interval: its failures are
	// counted by then.
	var failed float64
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		failed = d.metric("egress_audit_write_failed_events_total")
		if failed > failed0 || time.Now().After(deadline) {
			break
		}
	}
	if failed <= failed0 {
		t.Errorf("%s: egress_audit_write_failed_events_total %v, was %v: want it to count the events not written", when, failed, failed0)
	}
	// The line is waited for: the JSON log is buffered.
	var lines int
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		if lines = d.roLines(); lines > 0 || time.Now().After(deadline) {
			break
		}
	}
	if lines != 1 {
		t.Errorf("%s: %d log lines say the event log's directory is read-only, want 1\n%s", when, lines, d.logs())
	}
	if !d.alive() {
		t.Fatalf("egressd exited %s: %v\n%s", when, d.proc.Cmd.ProcessState, d.logs())
	}
	t.Logf("%s: /readyz %s; %v events not written", when, strings.TrimSpace(body), failed-failed0)
}

// resumed checks that events are written again after the directory was
// made writable at since.
func (d *daemon) resumed(tp *topo, since time.Time, when string) {
	t := d.t
	t.Helper()
	d.waitReady(tp, 200, when)
	var newer int
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(200 * time.Millisecond) {
		newer = 0
		for _, ev := range d.allEvents() {
			if !ev.Time.Before(since) && ev.Kind == "flow" {
				newer++
			}
		}
		if newer > 0 || time.Now().After(deadline) {
			break
		}
		roTraffic(t, tp, d.mode, when)
	}
	if newer == 0 {
		t.Errorf("%s: no flow event written since", when)
	}
	t.Logf("%s: %d flow events written since", when, newer)
}

func readOnlyAtStart(t *testing.T, tp *topo, mode string) {
	d := newDaemon(t, tp, mode)
	d.dumpOnFailure()
	d.start()
	roTraffic(t, tp, mode, "before")
	// Its decision in the log before the stop (capture's, in audit
	// mode, comes after the connection).
	d.waitEvent(t, "the connection no rule allows", func(e flowEvent) bool {
		return e.Kind == "flow" && e.Name == trackerName && e.Verdict == "deny"
	})
	d.stop()
	// A CA, for ca export on the read-only directory.
	if out, err := exec.Command(egressdBin, "ca", "export", "--state-dir", d.stateDir).CombinedOutput(); err != nil {
		t.Fatalf("egressd ca export: %v\n%s", err, out)
	}
	before := snapshot(t, d.stateDir)
	if len(before["events.ndjson"]) == 0 {
		t.Fatalf("no event log after the first run: %v", before)
	}
	// What the first run counted for the connection no rule allows:
	// the read-only run's live report counts more.
	trackerFlows := func(r *report) uint64 {
		for _, dr := range r.Dropped {
			if dr.Dest == trackerName && dr.Port == 443 && dr.Enforced == (mode == "enforce") {
				return dr.Flows
			}
		}
		return 0
	}
	r0, _ := d.reportStateJSON()
	flows0 := trackerFlows(r0)
	if flows0 == 0 {
		t.Fatalf("the first run's report counts no flow to %s:443", trackerName)
	}
	roRun := func(args ...string) ([]byte, error) {
		cmd := exec.Command("unshare", append([]string{"--mount", "--propagation", "private", "sh", "-c",
			`mount --bind -o ro "$0" "$0" && shift && exec "$@"`, d.stateDir, "--"}, args...)...)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			err = fmt.Errorf("%w: %s", err, stderr.String())
		}
		return out, err
	}
	// Reading commands work on the read-only directory.
	if out, err := roRun(egressdBin, "report", "--state-dir", d.stateDir); err != nil || len(out) == 0 {
		t.Errorf("egressd report on the read-only directory: %v\n%s", err, out)
	}
	if out, err := roRun(egressdBin, "ca", "export", "--state-dir", d.stateDir); err != nil || !bytes.Contains(out, []byte("BEGIN CERTIFICATE")) {
		t.Errorf("egressd ca export on the read-only directory: %v\n%s", err, out)
	}

	// egressd in a mount namespace of its own, where the directory is a
	// read-only bind mount of itself.
	d.wrap = []string{"unshare", "--mount", "--propagation", "private", "sh", "-c",
		`mount --bind -o ro '` + d.stateDir + `' '` + d.stateDir + `' && exec "$0" "$@"`}
	d.unready = true
	d.start()
	defer d.stop()
	// The start says it, with the path and the errno (waited for: the
	// output is buffered).
	warn := "WARNING: audit: write event log: open " + filepath.Join(d.stateDir, "events.ndjson") + ": read-only file system"
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		if b, _ := os.ReadFile(d.logFile); bytes.Contains(b, []byte(warn)) {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("no line %q at the start", warn)
			break
		}
	}
	d.readOnlyFailing(tp, "on a read-only state directory from the start")
	if b, _ := os.ReadFile(d.logFile); bytes.Count(b, []byte(warn)) != 1 {
		t.Errorf("%d lines %q, want 1", bytes.Count(b, []byte(warn)), warn)
	}
	// The live report counts what it decided (in audit mode the
	// connection enforce would refuse, capture's), and the events it
	// could not write.
	waitReport(t, d, func(r *report) bool {
		return r.Mode == mode && r.UnwrittenEvents > 0 && trackerFlows(r) > flows0
	})
	sameFiles(t, d.stateDir, before, false, "read-only from the start")

	made := time.Now()
	if out, err := exec.Command("nsenter", "-m", "-t", fmt.Sprint(d.proc.Cmd.Process.Pid), "mount", "-o", "remount,bind,rw", d.stateDir).CombinedOutput(); err != nil {
		t.Fatalf("remount,rw: %v: %s", err, out)
	}
	d.resumed(tp, made, "after remount,rw")
	sameFiles(t, d.stateDir, map[string][]byte{"events.ndjson": before["events.ndjson"]}, true, "after remount,rw")
}

func readOnlyWhileRunning(t *testing.T, tp *topo) {
	dir := t.TempDir()
	img, mnt := filepath.Join(dir, "state.img"), filepath.Join(dir, "state")
	if err := os.Mkdir(mnt, 0o700); err != nil {
		t.Fatal(err)
	}
	run := func(name string, args ...string) string {
		t.Helper()
		out, err := exec.Command(name, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("%s %v: %v: %s", name, args, err, out)
		}
		return strings.TrimSpace(string(out))
	}
	run("truncate", "-s", "32M", img)
	run("mkfs.ext4", "-q", "-F", img)
	// The loop devices and mounts go at cleanup, after egressd stopped
	// (cleanups run last first).
	var loops []string
	t.Cleanup(func() {
		exec.Command("umount", mnt).Run()
		for _, l := range loops {
			exec.Command("losetup", "-d", l).Run()
		}
	})
	mount := func() string {
		t.Helper()
		loop := run("losetup", "-f", "--show", img)
		loops = append(loops, loop)
		run("mount", "-t", "ext4", "-o", "errors=remount-ro", loop, mnt)
		return loop
	}
	loop := mount()

	d := newDaemon(t, tp, "enforce")
	d.dumpOnFailure()
	d.stateDir = mnt
	d.start()
	defer d.stop()
	roTraffic(t, tp, d.mode, "on a writable state directory")
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		if fi, err := os.Stat(filepath.Join(mnt, "events.ndjson")); err == nil && fi.Size() > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no event in the log after 5 s")
		}
	}
	// What is on the disk before the error: events written before it
	// (the snapshot first: egressd may write more before the sync).
	before := snapshot(t, mnt)
	run("sync", "-f", mnt)

	// The filesystem's error: ext4 remounts it read-only.
	if err := os.WriteFile("/sys/fs/ext4/"+filepath.Base(loop)+"/trigger_fs_error", []byte("1"), 0); err != nil {
		t.Fatalf("trigger ext4 error: %v", err)
	}
	if err := os.WriteFile(filepath.Join(mnt, "probe"), nil, 0o600); err == nil || !strings.Contains(err.Error(), "read-only") {
		t.Fatalf("the state directory is not read-only after the ext4 error: %v", err)
	}
	d.readOnlyFailing(tp, "after the filesystem went read-only")

	// The operator mounts the filesystem anew; egressd still holds the
	// old mount's file. egressd's mount namespace (ip netns exec makes
	// one) does not see the test's new mounts: the same is done there.
	run("umount", "-l", mnt)
	loop = mount()
	pid := fmt.Sprint(d.proc.Cmd.Process.Pid)
	run("nsenter", "-m", "-t", pid, "umount", "-l", mnt)
	run("nsenter", "-m", "-t", pid, "mount", "-t", "ext4", "-o", "errors=remount-ro", loop, mnt)
	made := time.Now()
	sameFiles(t, mnt, map[string][]byte{"events.ndjson": before["events.ndjson"]}, true, "the filesystem mounted anew")
	d.resumed(tp, made, "after the filesystem was mounted anew")
	sameFiles(t, mnt, map[string][]byte{"events.ndjson": before["events.ndjson"]}, true, "writing resumed")
}
