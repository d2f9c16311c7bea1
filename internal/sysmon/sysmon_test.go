package sysmon

import (
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestHasSchedtrace(t *testing.T) {
	for gd, want := range map[string]bool{
		"":                              false,
		"madvdontneed=1":                false,
		"schedtrace=0":                  true,
		"madvdontneed=1,schedtrace=100": true,
		" schedtrace=5":                 false, // the runtime does not trim keys
		"schedtrace":                    false, // nor take a key without a value
		"scheddetail=1":                 false,
		"xschedtrace=1":                 false,
	} {
		if got := hasSchedtrace(gd); got != want {
			t.Errorf("hasSchedtrace(%q) = %v, want %v", gd, got, want)
		}
	}
}

func TestEnviron(t *testing.T) {
	for _, c := range []struct{ in, want []string }{
		{[]string{"A=1"}, []string{"A=1", "GODEBUG=" + Setting}},
		{[]string{"GODEBUG=", "A=1"}, []string{"GODEBUG=" + Setting, "A=1"}},
		{[]string{"GODEBUG=madvdontneed=1", "A=1"}, []string{"GODEBUG=madvdontneed=1," + Setting, "A=1"}},
		// The first GODEBUG is the one Go reads; a later one stays as it was.
		{[]string{"GODEBUG=a=1", "GODEBUG=b=1"}, []string{"GODEBUG=a=1," + Setting, "GODEBUG=b=1"}},
	} {
		if got := environ(c.in); !slices.Equal(got, c.want) {
			t.Errorf("environ(%q) = %q, want %q", c.in, got, c.want)
		}
	}
}

// helperEnv marks the test binary run as a child by TestReexec.
const helperEnv = "EGRESSD_SYSMON_HELPER"

// TestMain runs the child's part when the binary is started by TestReexec:
// it calls Reexec, then reports its pid, its GODEBUG and how often its
// threads woke up in an idle second (sysmon's wakeups, as nothing else
// runs).
func TestMain(m *testing.M) {
	switch os.Getenv(helperEnv) {
	case "":
		os.Exit(m.Run())
	case "before":
		os.Setenv(helperEnv, "after")
		fmt.Printf("pid-before %d\n", os.Getpid())
		if err := Reexec(); err != nil {
			fmt.Printf("error %v\n", err)
		}
	}
	fmt.Printf("pid-after %d\n", os.Getpid())
	fmt.Printf("godebug %q\n", os.Getenv("GODEBUG"))
	time.Sleep(100 * time.Millisecond) // let start-up settle
	w0, err := wakeups()
	if err == nil {
		time.Sleep(time.Second)
		var w1 int
		w1, err = wakeups()
		fmt.Printf("wakeups %d\n", w1-w0)
	}
	if err != nil {
		fmt.Printf("error %v\n", err)
	}
	os.Exit(0)
}

// wakeups sums the voluntary context switches of the process's threads.
func wakeups() (int, error) {
	ents, err := os.ReadDir("/proc/self/task")
	if err != nil {
		return 0, err
	}
	n := 0
	for _, e := range ents {
		b, err := os.ReadFile("/proc/self/task/" + e.Name() + "/status")
		if err != nil {
			continue // the thread ended
		}
		for l := range strings.Lines(string(b)) {
			if v, ok := strings.CutPrefix(l, "voluntary_ctxt_switches:"); ok {
				k, _ := strconv.Atoi(strings.TrimSpace(v))
				n += k
			}
		}
	}
	return n, nil
}

// runHelper runs the test binary as TestMain's child with GODEBUG set to
// gd and returns what it reported.
func runHelper(t *testing.T, gd string) map[string]string {
	t.Helper()
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(slices.DeleteFunc(os.Environ(), func(kv string) bool {
		return strings.HasPrefix(kv, "GODEBUG=")
	}), helperEnv+"=before", "GODEBUG="+gd)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("helper: %v\n%s", err, out)
	}
	got := map[string]string{}
	for l := range strings.Lines(string(out)) {
		if k, v, ok := strings.Cut(strings.TrimSpace(l), " "); ok {
			got[k] = v
		}
	}
	return got
}

// TestReexec: Reexec runs the binary again in the same process with
// schedtrace added to GODEBUG, other settings kept; with schedtrace
// already set it does nothing. And the setting does what it is here for,
// in this Go version: an idle process's sysmon no longer sleeps until a
// system call wakes it but ticks on its own (every 10 ms once backed off),
// where without it the idle process hardly wakes at all.
func TestReexec(t *testing.T) {
	// The wakeups are counted on a shared machine: a loaded one once woke
	// the idle process 61 times without the setting against 82 with it.
	// The counts are taken again, up to three times, before the test
	// fails; without the setting's effect every try fails.
	var tries []string
	for try := 1; try <= 3; try++ {
		awake := runHelper(t, "madvdontneed=1")
		if awake["error"] != "" {
			t.Fatalf("Reexec: %s", awake["error"])
		}
		if awake["pid-before"] == "" || awake["pid-before"] != awake["pid-after"] {
			t.Fatalf("pid before %q and after %q: not the same process run again", awake["pid-before"], awake["pid-after"])
		}
		if want := strconv.Quote("madvdontneed=1," + Setting); awake["godebug"] != want {
			t.Fatalf("GODEBUG after Reexec: %s, want %s", awake["godebug"], want)
		}

		deep := runHelper(t, "schedtrace=0")
		if deep["error"] != "" || deep["godebug"] != `"schedtrace=0"` {
			t.Fatalf("with schedtrace=0: error %q, GODEBUG %s; want no exec and GODEBUG unchanged", deep["error"], deep["godebug"])
		}

		wa, _ := strconv.Atoi(awake["wakeups"])
		wd, _ := strconv.Atoi(deep["wakeups"])
		t.Logf("try %d: thread wakeups in 1 s idle: %d with %s, %d with schedtrace=0", try, wa, Setting, wd)
		// At its 10 ms tick sysmon wakes about 100 times a second (53 or
		// 54 in 500 ms, in every trial run here); in deep sleep it sleeps
		// until the runtime's next timer, and the idle process's threads
		// woke 12-26 times in 500 ms.
		if wa >= 60 && 3*wd <= 2*wa {
			return
		}
		tries = append(tries, fmt.Sprintf("%d with, %d without", wa, wd))
	}
	t.Errorf("idle wakeups in 1 s: %s: want sysmon's 10 ms tick with %s (at least 60) and fewer than two thirds as many without", strings.Join(tries, "; "), Setting)
}
