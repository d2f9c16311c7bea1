package proxy

import "time"

// workers runs the proxy's per-connection work on goroutines that are kept
// for the next connection instead of a new goroutine for each.
//
// A new goroutine starts with a small stack, and serving a connection
// (the peek, the ClientHello parser, the dial through the net package, the
// canonical log line) needs several times that: the runtime grew and
// copied the stack two or three times per connection, about 5 % of the
// proxy's CPU under a high connection rate. A kept goroutine has its stack
// grown already. One that has had nothing to do for idle ends, so a burst
// leaves no goroutines behind; the garbage collector shrinks the stacks of
// those waiting meanwhile, as it does for any goroutine.
//
// The zero value keeps no goroutine: each task runs on a new one.
type workers struct {
	tasks chan func() // unbuffered: a task goes to a waiting worker or to a new one
	idle  time.Duration
}

// run runs fn on a waiting worker, or on a new one when none waits. It
// never blocks.
func (w *workers) run(fn func()) {
	select {
	case w.tasks <- fn:
	default:
		go w.work(fn)
	}
}

func (w *workers) work(fn func()) {
	fn()
	t := time.NewTimer(w.idle)
	defer t.Stop()
	for {
		select {
		case fn = <-w.tasks:
			fn()
			t.Reset(w.idle)
		case <-t.C:
			return
		}
	}
}
