package proxy

import (
	"bytes"
	"fmt"
	"runtime"
	"strings"
	"testing"
	"time"
)

// goroutineID is the running goroutine's number, from its stack header.
func goroutineID() string {
	buf := make([]byte, 64)
	buf = buf[:runtime.Stack(buf, false)]
	f := bytes.Fields(buf)
	return string(f[1]) // "goroutine N [running]:"
}

// waitingWorkers counts w's goroutines waiting for a task.
func waitingWorkers(w *workers) int {
	fn := fmt.Sprintf("proxy.(*workers).work(%p", w)
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	n := 0
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "[select") && strings.Contains(g, fn) {
			n++
		}
	}
	return n
}

// runningWorkers counts w's goroutines, waiting or not.
func runningWorkers(w *workers) int {
	buf := make([]byte, 1<<20)
	return strings.Count(string(buf[:runtime.Stack(buf, true)]), fmt.Sprintf("proxy.(*workers).work(%p", w))
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("waited 5 s for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

func TestWorkersReuseGoroutine(t *testing.T) {
	w := &workers{tasks: make(chan func()), idle: time.Minute}
	ids := map[string]bool{}
	for i := 0; i < 20; i++ {
		ch := make(chan string)
		w.run(func() { ch <- goroutineID() })
		ids[<-ch] = true
		waitFor(t, "the worker to wait again", func() bool { return waitingWorkers(w) == 1 })
	}
	if len(ids) != 1 {
		t.Fatalf("20 tasks one after another ran on %d goroutines, want 1", len(ids))
	}
}

func TestWorkersNeverBlock(t *testing.T) {
	w := &workers{tasks: make(chan func()), idle: time.Minute}
	release := make(chan struct{})
	defer close(release)
	started := make(chan struct{})
	w.run(func() { close(started); <-release })
	<-started
	done := make(chan struct{})
	w.run(func() { close(done) }) // the only worker is busy: a new one
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("a task waited for a busy worker")
	}
}

func TestWorkersEndWhenIdle(t *testing.T) {
	w := &workers{tasks: make(chan func()), idle: 20 * time.Millisecond}
	const n = 8
	release := make(chan struct{})
	for i := 0; i < n; i++ {
		w.run(func() { <-release })
	}
	waitFor(t, "the tasks to start", func() bool { return runningWorkers(w) == n })
	close(release)
	waitFor(t, "the idle workers to end", func() bool { return runningWorkers(w) == 0 })
	// Still usable afterwards.
	done := make(chan struct{})
	w.run(func() { close(done) })
	<-done
}

func TestWorkersZeroValue(t *testing.T) {
	var w workers // as in a Proxy built without New (the tunnel tests)
	done := make(chan struct{})
	w.run(func() { close(done) })
	<-done
	waitFor(t, "the task's goroutine to end", func() bool { return runningWorkers(&w) == 0 })
}

// stackUser uses about 600 bytes of stack per level: 12 levels are about
// what serving a connection takes (the peek, the hello parser, a dial
// through the net package, the log line), which a new goroutine's stack
// must grow twice for.
//
//go:noinline
func stackUser(n int) int {
	var buf [512]byte
	buf[n%len(buf)] = byte(n)
	if n == 0 {
		return int(buf[0])
	}
	return stackUser(n-1) + int(buf[n%len(buf)])
}

// benchmarkTasks runs tasks one after another, each as deep as a
// connection's, through run.
func benchmarkTasks(b *testing.B, run func(func())) {
	done := make(chan struct{})
	task := func() {
		stackUser(12)
		done <- struct{}{}
	}
	b.ReportAllocs()
	for b.Loop() {
		run(task)
		<-done
	}
}

func BenchmarkTaskNewGoroutine(b *testing.B) {
	benchmarkTasks(b, func(fn func()) { go fn() })
}

func BenchmarkTaskWorkers(b *testing.B) {
	w := &workers{tasks: make(chan func()), idle: time.Minute}
	benchmarkTasks(b, w.run)
}
