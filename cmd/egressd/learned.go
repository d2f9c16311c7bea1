package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"egressd/audit"
	"egressd/dnsfilter"
	"egressd/internal/atomicfile"
	"egressd/internal/setaside"
)

// The DNS forwarder's learned-address table survives a restart through
// the state directory: a device that resolved once and keeps the address
// (chrony's NTP servers, a VPN client reconnecting to the address it
// cached) would otherwise be dropped by the enforce firewall, whose
// learned sets are seeded from the table at install, and not vouched for
// by the proxy, until it asks DNS again, which may be hours.

const (
	// learnedFileName is the table's file in the state directory.
	learnedFileName = "learned.ndjson"
	// learnedSaveInterval is how often the store looks whether to write
	// the table: when it changed since the last write, and the write
	// budget lets it. A clean stop writes it too. After a kill -9 the
	// answers given since the last write are lost.
	learnedSaveInterval = 30 * time.Second
	// learnedWriteBudget bounds the bytes the periodic writes take (1 GiB)
	// in any 24 hours, plus one file: a write of n bytes holds the next
	// off for n / (1 GiB a day), at least learnedSaveInterval. A table of
	// up to about 2,400 items (370 KB) is so written every 30 s, a full
	// one (65,536 items, 10 MB) every 14 minutes, and a busy site's flash
	// takes 1 GiB a day, not 29 GB (an SD card).
	learnedWriteBudget = 1 << 30
	// learnedStopWait bounds the wait of the save at a clean stop for a
	// save under way (after the stop's 10 s wait for every part): one
	// that has not finished then is stuck (a disk hung in fsync), and
	// the stop goes on without a save rather than wait with it until
	// systemd's SIGKILL. (The process ends only when the kernel returns
	// from the stuck write: no signal ends a thread in fsync.)
	learnedStopWait = 2 * time.Second
)

// learnedStore keeps the table in its file.
type learnedStore struct {
	path  string
	table *dnsfilter.Table
	// admit is what load lets into the table (dnsfilter.Config.WouldLearn
	// under the running policy); nil lets all in.
	admit func(*dnsfilter.Learned) bool
	log   *slog.Logger
	// now is time.Now: its monotonic reading spaces the writes, so a
	// clock NTP sets (a gateway without a real-time clock) moves none.
	now func() time.Time
	// budget is the bytes the periodic writes may take a day.
	budget int64
	// write writes the table to the file (writeFile), returning its items
	// and the bytes written; tests count instead.
	write func() (items int, bytes int64, err error)

	turn    chan struct{} // holds a token while a load or save runs; its holder owns the following
	saved   uint64        // table.Changes() at the last write
	failing string        // the last write's error (failKey), "" when it worked
	next    time.Time     // no periodic write before it (the budget)

	// since is when the write under way began, nil when none; flush reads
	// it without the turn.
	since atomic.Pointer[time.Time]
}

func newLearnedStore(dir string, table *dnsfilter.Table, log *slog.Logger) *learnedStore {
	s := &learnedStore{path: filepath.Join(dir, learnedFileName), table: table, log: log, now: time.Now,
		budget: learnedWriteBudget, turn: make(chan struct{}, 1)}
	s.write = s.writeFile
	return s
}

// spacing is how long a write of n bytes holds the next periodic one off.
func (s *learnedStore) spacing(n int64) time.Duration {
	return time.Duration(float64(n) / float64(s.budget) * float64(24*time.Hour))
}

// load puts the file's items into the table, before anything reads it,
// those admit lets in (the others are counted in left). A missing file is
// a first start: (0, 0, nil). A file it cannot read or that dnsfilter
// refuses is left for the next write to replace; the table starts empty
// then, as before there was a file. The temporary files of saves killed
// before their rename go first. The file counts as a write at load for
// the budget: across restarts, even crashes, periodic writes keep to it.
func (s *learnedStore) load() (n, left int, err error) {
	s.turn <- struct{}{}
	defer func() { <-s.turn }()
	s.removeTemps()
	// Not a FIFO (the open would block), nor a link out of the
	// directory: a regular file, opened without following a link.
	f, err := os.OpenFile(s.path, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_NONBLOCK, 0)
	if errors.Is(err, os.ErrNotExist) {
		return 0, 0, nil
	}
	if err != nil {
		return 0, 0, err
	}
	defer f.Close()
	if fi, err := f.Stat(); err != nil {
		return 0, 0, err
	} else if !fi.Mode().IsRegular() {
		return 0, 0, fmt.Errorf("%s is not a regular file", s.path)
	} else {
		s.next = s.now().Add(s.spacing(fi.Size()))
	}
	admit := s.admit
	if admit != nil {
		admit = func(l *dnsfilter.Learned) bool {
			ok := s.admit(l)
			if !ok {
				left++
			}
			return ok
		}
	}
	n, err = s.table.Load(f, admit)
	if err != nil {
		// Kept aside, not overwritten by the next save: a file refused
		// for a clock that went back is good again once NTP has set it,
		// and the operator may want to see what was refused (each
		// refusal's, under a name of its own: setaside).
		if kept, rerr := setaside.Keep(s.path); rerr == nil {
			return 0, 0, fmt.Errorf("%s (kept as %s): %w", s.path, kept, err)
		}
		return 0, 0, fmt.Errorf("%s: %w", s.path, err)
	}
	return n, left, nil
}

// removeTemps removes the temporary files write leaves when egressd is
// killed during it, which nothing else would (atomicfile.RemoveTemps).
func (s *learnedStore) removeTemps() {
	for _, name := range atomicfile.RemoveTemps(s.path) {
		s.log.Info("learned addresses: removed the temporary file of a save that did not finish", "file", name)
	}
}

// probe finds out whether the state directory takes the file, without
// writing the table: a temporary file, created and removed.
func (s *learnedStore) probe() error {
	dir := filepath.Dir(s.path)
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(dir, learnedFileName+".tmp*")
	if err != nil {
		return err
	}
	tmp.Close()
	return os.Remove(tmp.Name())
}

// tick is the periodic save: it writes the table when it changed since
// the last write (or the last write failed) and the budget lets it (the
// last write was long enough ago for its size).
func (s *learnedStore) tick() error {
	s.turn <- struct{}{}
	defer func() { <-s.turn }()
	now := s.now()
	if s.table.Changes() == s.saved && s.failing == "" || now.Before(s.next) {
		return nil
	}
	return s.saveLocked(now)
}

// errLearnedStuck is flush's error when a save under way did not finish.
var errLearnedStuck = errors.New("learned addresses: a save under way did not finish")

// flush is the save at a clean stop: it writes the table, changed or not,
// whatever the budget, once the save under way (if any) has finished;
// one that does not within wait is stuck (a disk hung in fsync): then it
// writes nothing and says so, rather than hold the stop until systemd's
// SIGKILL. The next start reads the file of the last save that finished.
func (s *learnedStore) flush(wait time.Duration) error {
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case s.turn <- struct{}{}:
	case <-t.C:
		var stuck time.Duration
		if since := s.since.Load(); since != nil {
			stuck = s.now().Sub(*since)
		}
		s.log.Warn("learned addresses: a save of the table has not finished (a hung disk?): no save at stop, the next start reads the file of the last save that finished",
			audit.LogDuration, stuck.Seconds(), "file", s.path)
		return errLearnedStuck
	}
	defer func() { <-s.turn }()
	return s.saveLocked(s.now())
}

// saveLocked writes the table's live items to the file and sets the
// earliest time of the next periodic write. A failure is logged when it
// is new, and its recovery once. The caller holds the turn.
func (s *learnedStore) saveLocked(now time.Time) error {
	changes := s.table.Changes()
	s.since.Store(&now)
	n, size, err := s.write()
	s.since.Store(nil)
	// A failed write counts too: a disk that fails at the end (at the
	// sync) has taken the bytes.
	s.next = now.Add(s.spacing(size))
	switch {
	case err != nil && failKey(err) != s.failing:
		s.failing = failKey(err)
		s.log.Warn("learned addresses: cannot write the table to the state directory: a restart loses them", audit.LogError, err.Error())
	case err == nil && s.failing != "":
		s.failing = ""
		s.log.Info("learned addresses: writing the table to the state directory again", "items", n)
	}
	if err == nil {
		s.saved = changes
	}
	return err
}

// failKey is what tells one write failure from another: its errno, when
// it has one, else its text. The text of a failure to create the
// temporary file names that file, a new random name at each save: on a
// read-only state directory each save said it again, every 30 s.
func failKey(err error) string {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		return "errno " + errno.Error()
	}
	return err.Error()
}

// writeFile writes the table as its file (atomicfile), mode 0600. It
// returns the items and the bytes written.
func (s *learnedStore) writeFile() (int, int64, error) {
	if err := os.MkdirAll(filepath.Dir(s.path), 0o750); err != nil {
		return 0, 0, err
	}
	var n int
	var written int64
	err := atomicfile.Write(s.path, 0o600, atomicfile.Replace, func(w io.Writer) error {
		cw := &countingWriter{w: w}
		var err error
		n, err = s.table.Save(cw)
		written = cw.n
		return err
	})
	return n, written, err
}

// countingWriter counts the bytes written through it.
type countingWriter struct {
	w io.Writer
	n int64
}

func (c *countingWriter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// run looks every learnedSaveInterval whether to write the table (tick),
// until ctx is done.
func (s *learnedStore) run(ctx context.Context) {
	t := time.NewTicker(learnedSaveInterval)
	defer t.Stop()
	for {
		select {
		case <-t.C:
			s.tick()
		case <-ctx.Done():
			return
		}
	}
}

// restoreLearned loads the table's file into table at start, keeping
// what the forwarder configured by dnsCfg would learn under the running
// policy, and finds out whether the state directory can be written; then
// it keeps the file written while ctx runs. Nothing here stops egressd:
// without the file the table starts empty, as it did before there was one.
func (d *daemon) restoreLearned(ctx context.Context, wg *sync.WaitGroup, table *dnsfilter.Table, dnsCfg dnsfilter.Config) {
	s := newLearnedStore(d.cfg.stateDir, table, d.log.With(audit.LogComponent, "dns"))
	var macs dnsfilter.ClientMACs
	if d.macs != nil {
		macs = d.macs
	}
	s.admit = dnsCfg.WouldLearn(d.store.Load(), macs)
	n, left, err := s.load()
	switch {
	case err != nil:
		d.log.Warn("learned addresses: ignoring the table's file: it starts empty, and clients that kept an answer from before the restart are dropped until they ask again", audit.LogError, err.Error())
		d.say("warning: learned addresses: %v: ignored, the table starts empty", err)
	case left > 0:
		d.log.Info("learned addresses: left out of the table's file what the running policy and answer filter would not learn", "items", n, "left_out", left)
		d.say("learned addresses: %d restored from %s, %d left out (the running policy or the answer filter would not learn them)", n, s.path, left)
	default:
		d.say("learned addresses: %d restored from %s", n, s.path)
	}
	if err := s.probe(); err != nil {
		// Said here, as the saves say it (component dns): the saves
		// that fail alike say nothing more.
		s.failing = failKey(err)
		s.log.Warn("learned addresses: cannot write the table to the state directory: a restart loses them", audit.LogError, err.Error())
		d.say("warning: learned addresses: %v: they will not survive a restart", err)
	}
	d.learned = s
	wg.Add(1)
	go func() {
		defer wg.Done()
		s.run(ctx)
	}()
}
