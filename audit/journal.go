package audit

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"github.com/prometheus/client_golang/prometheus"

	"egressd/policy"
)

// The event log's files in the state directory: the current file, and
// rotated ones named by the time they were rotated (so that sorting the
// names sorts them in time).
const (
	CurrentLog    = "events.ndjson"
	rotatedPrefix = "events-"
	rotatedSuffix = ".ndjson"
	// gzSuffix ends a rotated file's name once it is compressed
	// (JournalConfig.Compress): events-TIME.ndjson.gz.
	gzSuffix = ".gz"
	// maxLine bounds one event line; longer lines are skipped on read.
	maxLine = 1 << 20
)

// JournalConfig configures the event log.
type JournalConfig struct {
	// Dir is the state directory; it is created if missing (when its
	// parent is read-only, the journal opens as on a read-only
	// directory and the first flush that can makes it). Required.
	Dir string
	// MaxFileBytes is the size at which the current file is rotated.
	// Default 64 MiB.
	MaxFileBytes int64
	// MaxFiles is how many rotated files are kept, compressed or not;
	// the events of older
	// ones are added to the summary (ArchiveFile) before they are
	// deleted: counts survive a restart, the events themselves do not
	// (windowed reports and replays read the kept files). Default 16.
	MaxFiles int
	// QueueLen bounds the events waiting for the disk; beyond it Emit
	// sheds (and counts) events instead of waiting. Default 65536.
	QueueLen int
	// QueueBytes bounds the memory of those events in bytes
	// (queueBytes: an Event and the client's text it keeps), the batch
	// the writer has taken and not yet written included; beyond it Emit
	// sheds as beyond QueueLen.
	// A client's text makes an event up to 3 KiB (a 2 KiB path), not
	// the 550 B of most: 65,536 such would hold 200 MiB. Default
	// defaultQueueBytes, which 65,536 events of short names fit.
	QueueBytes int64
	// FlushInterval is the longest an event waits before it reaches the
	// kernel (and so survives kill -9) and the ledger (the report): the
	// writer takes the queued events and writes them every half of it.
	// Default 250 ms; at most 1 s.
	FlushInterval time.Duration
	// Logger receives warnings (torn or bad lines, write errors). Nil
	// means slog.Default().
	Logger *slog.Logger
	// DetailBurst and DetailRate are each device's budget of event lines
	// (a burst, and lines a second after it) and DetailInterval how often
	// the events held back past it are written as summary records
	// (detail.go). Defaults DefaultDetailBurst, DefaultDetailRate,
	// DefaultDetailInterval; a negative DetailBurst writes every event.
	DetailBurst    int
	DetailRate     float64
	DetailInterval time.Duration
	// Compress gzips each rotated file in the background (the writer
	// only renames it): events-TIME.ndjson becomes events-TIME.ndjson.gz.
	// MaxFiles bounds the kept rotated files alike (overLimit).
	Compress bool
	// Background leaves the read of the event log into the ledger to
	// Run: OpenJournal only opens the log for appending (it reads
	// nothing, returns empty LoadStats, and cuts a torn last line off),
	// and Run reads the log on a goroutine of its own while it writes,
	// so the daemon serves while the log is read (a restart's read of a
	// full log takes seconds). Events emitted
	// meanwhile are written to the log as they come (the read stops at
	// the current file's size at open, so it does not read them), whole
	// (the detail budget applies from the read's end), and once the read
	// ended the writer reads them back from the current file into the
	// ledger, after the old ones, each once: a crash during the read
	// loses none of them, and none waits in memory (but those whose write
	// fails, held to be counted after the read as unwritten: hold).
	// Reports made
	// meanwhile say the read is not done (Report.Loading). No rotation,
	// fold or compression runs before the read ends; Close stops it and
	// still writes what is queued (the ledger then lacks what was
	// written since the start: the report says its counts are partial).
	Background bool
	// LoadDone, when set with Background, is called by Run once the read
	// ended: what it read, how long it took, and why it did not end
	// (ErrLoadStopped when Close or Run's context stopped it; another
	// error leaves the ledger partial, said in every report, while the
	// events since the start are still written).
	LoadDone func(LoadStats, time.Duration, error)
}

// ErrLoadStopped is the error of a background read of the event log that
// Close (or Run's context) stopped before its end.
var ErrLoadStopped = errors.New("audit: the read of the event log was stopped")

// Validate returns all problems of c.
func (c JournalConfig) Validate() error {
	var errs []error
	if c.Dir == "" {
		errs = append(errs, errors.New("audit: journal: state directory is required"))
	}
	if c.MaxFileBytes < 0 || c.MaxFiles < 0 || c.QueueLen < 0 || c.QueueBytes < 0 {
		errs = append(errs, errors.New("audit: journal: sizes must not be negative"))
	}
	if c.FlushInterval > time.Second {
		errs = append(errs, fmt.Errorf("audit: journal: flush interval %s is over 1s", c.FlushInterval))
	}
	return errors.Join(errs...)
}

func (c *JournalConfig) fill() {
	if c.MaxFileBytes <= 0 {
		c.MaxFileBytes = 64 << 20
	}
	if c.MaxFiles <= 0 {
		c.MaxFiles = 16
	}
	if c.QueueLen <= 0 {
		c.QueueLen = 65536
	}
	if c.QueueBytes <= 0 {
		c.QueueBytes = defaultQueueBytes
	}
	if c.FlushInterval <= 0 {
		c.FlushInterval = 250 * time.Millisecond
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.DetailBurst == 0 {
		c.DetailBurst = DefaultDetailBurst
	}
	if c.DetailRate <= 0 {
		c.DetailRate = DefaultDetailRate
	}
	if c.DetailInterval <= 0 {
		c.DetailInterval = DefaultDetailInterval
	}
}

// LoadStats say what reading the event log found.
type LoadStats struct {
	Files   int    // files read
	Events  uint64 // events added to the ledger
	Shed    uint64 // events recorded as shed
	Skipped int    // lines that were not events (bad JSON, too long)
	Torn    bool   // the last line of the current file was incomplete
	// Damaged are compressed rotated files that could not be read to
	// their end (truncated, corrupt): their events before the damage are
	// counted, the rest are lost.
	Damaged int
	// Summarized are the events of rotated-out files the ledger started
	// from (the summary, ArchiveFile), from SummarizedFiles files.
	Summarized      uint64
	SummarizedFiles uint64
}

// Journal is the append-only event log in front of a ledger: the [Sink]
// the components emit into when the daemon runs. Emit never blocks: it
// puts the event on a bounded queue, or, when the queue is full, sheds it
// and counts it. One writer goroutine (Run) takes the queued events as a
// batch every half FlushInterval (sooner when a burst fills a quarter of
// the queue), adds them to the ledger and appends them to the log with one
// write, and records shed counts in the log as KindShed
// records, so a report after a restart still says how many were lost.
//
// Because the ledger is fed from the queue, the ledger and the log hold the
// same events: counts after a restart continue from where they were.
type Journal struct {
	cfg    JournalConfig
	ledger *Ledger
	log    *slog.Logger

	shed        atomic.Uint64 // events shed by Emit, ever
	written     atomic.Uint64 // events written to the kernel
	writeFailed atomic.Uint64 // events lost to write errors
	summarized  atomic.Uint64 // events held back into summary records
	quieted     atomic.Uint64 // decision lines held back into summary lines
	// lostFirst are the connections whose first report Emit shed or the
	// writer could not write, where no other report counted them: a
	// revised report of one is written as a first report (writeEvent).
	lostFirst *lostFirsts

	linesMu sync.Mutex    // guards lines
	lines   *detailBudget // of decision log lines (QuietLine); nil: none
	queued  atomic.Int64  // for the queue gauge

	// The queue is a list of chunks of at most queueChunk events, not
	// one slice: a burst (capture's flush of its open flows at a stop, a
	// flood's evictions) is held once, with no copy of what is queued as
	// append's growth made (1.25 times at a time: five times the events
	// allocated, and the old array with the new at each growth), and the
	// writer lets each chunk go once written.
	qmu      sync.Mutex // guards pending, npending, qbytes and spare
	pending  [][]Event  // queued by Emit, at most QueueLen events in all
	npending int
	// qbytes is what the queued events take (queueBytes), and those
	// of the writer's batch not yet written: at most QueueBytes.
	qbytes int64
	spare  []Event // a written chunk's array, for reuse
	kick   chan struct{}
	// syncs carries Sync's waiters to the writer, which closes each once
	// it has taken the queue and flushed.
	syncs chan chan struct{}

	rotMu sync.RWMutex // rotate and fold's deletes hold it; scan reads under it
	// archLast is the newest file in the summary (guarded by rotMu): it
	// and older files are not read.
	archLast string
	foldMu   sync.Mutex     // one fold at a time
	unfolded atomic.Int64   // rotated files past the limit not yet in the summary
	lost     atomic.Uint64  // rotated files deleted without their counts in the summary
	folds    sync.WaitGroup // running folds, for finish
	mu       sync.Mutex     // guards following
	lastErr  error          // the last write error, nil once a write succeeds
	foldErr  error          // the last fold's error, nil once one succeeds
	closed   bool

	// Owned by the writer (Run, or Close when Run never ran).
	f           *os.File
	size        int64     // of f
	buf         []byte    // lines not yet written
	ends        []int     // end offsets in buf of the event lines
	firstLines  []int     // indexes in ends of the lines lostFirsts notes if lost (writeEvent's keep)
	shedLogged  uint64    // shed count already recorded in the log
	torn        bool      // the file may end in a partial line (after a write error)
	reopen      bool      // a rotation could not open the new file: flush tries again
	mkdir       bool      // the state directory could not be made at the open: openCurrent makes it
	loggedErr   error     // the write error the last failure line said (failed)
	lastErrLog  time.Time // when
	errSaid     bool      // the failure going on was said in a line
	lastFlush   time.Time
	encodeBuf   []byte
	detail      *detailBudget // nil: every event written
	testHookPre func()        // tests: called before each write, to stall the writer
	// bgWrite: the background read of the log runs (Background): the
	// writer appends what it takes to the current file without the
	// ledger, which reads those lines (readTail) once the read ended.
	bgWrite bool
	// shedLines are the shed records in buf while bgWrite: one that
	// does not reach the file is recorded again (recordShed).
	shedLines []shedLine
	// held are the lines of the events whose write failed while bgWrite
	// (a read-only state directory at the start), heldN of them: not in
	// the log, so not read back (readTail), they are counted after the
	// read (endLoad), as unwritten, as the events after it are. They
	// count against the queue's bounds with the queued events (heldN
	// with npending against QueueLen, their bytes in qbytes): past
	// them, they are shed, and Emit sheds. The writer alone writes
	// them; heldN under qmu, which Emit reads. The lines are kept in
	// chunks of heldChunk bytes, each line whole in one, not in one
	// array append grows (1.25 times the bytes, and the old array with
	// the new at each growth): heldBytes of lines in at most one
	// chunk's more.
	held      [][]byte
	heldN     int
	heldBytes int64
	// testHookFolded, when set, is called by fold after each file it
	// deleted (tests: a report taken then).
	testHookFolded func()
	now            func() time.Time // the clock rotation names files by; nil is time.Now (tests set it)
	newest         time.Time        // the latest time of a record in the log, and of a rotated file's name

	stop    chan struct{}
	done    chan struct{}
	running atomic.Bool
	once    sync.Once

	// The read of the log into the ledger (load): in OpenJournal, or,
	// with Background, in Run before it takes the queue.
	ctl        *loadCtl
	loading    atomic.Bool   // a background read has not ended
	loaded     chan struct{} // closed when it ended (at once without Background)
	archReady  chan struct{} // closed once archLast is known (scan waits for it)
	loadStats  LoadStats     // of the read; the writer's until loaded is closed
	loadErr    error         // why the read did not end; set before loaded is closed
	loadedFrom int64         // the current file's size at open: the read stops there
	loadStop   chan struct{} // closed by runLoad to stop a background read
	// unfed are the events the writer wrote during the background read:
	// in the log, not yet in the ledger (readTail counts them).
	unfed atomic.Uint64
	// tornCut: OpenJournal cut a torn last line off (Background).
	tornCut bool
	// noDir: the state directory did not exist at the open and could
	// not be made (a read-only parent): load reads nothing. Set before
	// Run, read by the load only.
	noDir bool
}

// shedLine is a shed record in the write buffer: its end in buf and its
// count.
type shedLine struct {
	end int
	n   uint64
}

// loadCtl steers and counts a read of the log (readDirCtl).
type loadCtl struct {
	stop     <-chan struct{} // closed: stop reading (errLoadStopped)
	curLimit int64           // the current file is read up to this size; < 0: whole
	// appended: the writer appends to the current file meanwhile, so a
	// torn last line is not cut (OpenJournal cut it before).
	appended bool
	files    atomic.Int64  // files read so far
	total    atomic.Int64  // files to read
	events   atomic.Uint64 // events read so far
	// fileHook, when set (tests), is called after each file read, with
	// the files read so far: a test stalls the read there.
	fileHook func(files int, stop <-chan struct{})
}

// testHookLoadFile, when set, is the fileHook of each journal's read.
var testHookLoadFile func(files int, stop <-chan struct{})

var _ Sink = (*Journal)(nil)

// OpenJournal reads the event log in cfg.Dir into ledger (counts continue
// across restarts; a torn last line is skipped with a warning and cut off),
// then opens the log for appending; with cfg.Background, it only opens the
// log and Run reads it first. Call Run to start writing and Close
// when done. The ledger should be fresh.
func OpenJournal(cfg JournalConfig, ledger *Ledger) (*Journal, LoadStats, error) {
	if err := cfg.Validate(); err != nil {
		return nil, LoadStats{}, err
	}
	cfg.fill()
	// A state directory that is missing and cannot be made because its
	// parent is read-only (a read-only root image, a card remounted
	// read-only) is a read-only directory: the journal opens, counts
	// what it cannot write, and the flush makes the directory once it
	// can (openCurrent).
	mkdirErr := os.MkdirAll(cfg.Dir, 0o750)
	if mkdirErr != nil && !errors.Is(mkdirErr, syscall.EROFS) {
		return nil, LoadStats{}, fmt.Errorf("audit: state directory: %w", mkdirErr)
	}
	j := &Journal{
		cfg: cfg, ledger: ledger, log: cfg.Logger, lostFirst: newLostFirsts(),
		kick: make(chan struct{}, 1), syncs: make(chan chan struct{}),
		stop: make(chan struct{}), done: make(chan struct{}),
		loaded: make(chan struct{}), archReady: make(chan struct{}),
	}
	removeArchiveTemps(cfg.Dir)
	removeCompressTemps(cfg.Dir)
	if cfg.DetailBurst >= 0 {
		j.detail = newDetailBudget(cfg.DetailBurst, cfg.DetailRate, cfg.DetailInterval)
		j.lines = newDetailBudget(cfg.DetailBurst, cfg.DetailRate, cfg.DetailInterval)
		j.lines.lines = true
	}
	cur := filepath.Join(cfg.Dir, CurrentLog)
	var f *os.File
	err := mkdirErr
	if err == nil {
		f, err = os.OpenFile(cur, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o640)
	}
	switch {
	case mkdirErr != nil:
		// No directory: nothing to read; the flush makes it.
		j.noDir, j.mkdir, j.reopen = true, true, true
		j.failed(mkdirErr)
	case errors.Is(err, syscall.EROFS):
		// A read-only directory (a card the kernel remounted read-only
		// after I/O errors, a read-only image): the log is read, events
		// are counted, and each flush tries to open the log again
		// (openCurrent), so writing resumes once it is writable. What
		// is not written is counted (WriteFailed, Err, one log line).
		fi, serr := os.Stat(cur)
		if serr != nil && !errors.Is(serr, os.ErrNotExist) {
			return nil, LoadStats{}, fmt.Errorf("audit: open event log: %w", serr)
		}
		if serr == nil {
			j.size = fi.Size()
		}
		j.reopen = true
		j.failed(err)
	case err != nil:
		return nil, LoadStats{}, fmt.Errorf("audit: open event log: %w", err)
	default:
		fi, err := f.Stat()
		if err != nil {
			f.Close()
			return nil, LoadStats{}, fmt.Errorf("audit: open event log: %w", err)
		}
		j.f, j.size = f, fi.Size()
	}
	j.torn = endsTorn(cur, j.size)
	if cfg.Background && j.torn {
		// The writer appends while the log is read, so the read cannot
		// cut a partial last line (a crash mid-write) off: it is cut
		// now. If it cannot be, the next line starts on a line of its
		// own (torn) and the fragment is a bad line to readers.
		if good, err := cutTorn(cur, j.size); err == nil {
			cfg.Logger.Warn("audit: event log ends in a torn line; cut it off", "file", CurrentLog, "bytes", j.size-good)
			j.size, j.torn, j.tornCut = good, false, true
		}
	}
	j.loadedFrom = j.size
	j.ctl = &loadCtl{curLimit: j.loadedFrom, fileHook: testHookLoadFile, appended: cfg.Background}
	ledger.mu.Lock()
	ledger.history = j.scan
	ledger.mu.Unlock()
	if cfg.Background {
		j.loadStop = make(chan struct{})
		j.ctl.stop = j.loadStop
		j.loading.Store(true)
		ledger.mu.Lock()
		ledger.loadWait = j.waitLoaded
		ledger.mu.Unlock()
		return j, LoadStats{}, nil
	}
	st, err := j.load(j.saw)
	if err != nil {
		f.Close()
		return nil, st, err
	}
	j.afterLoad(true)
	j.loadStats = st
	close(j.loaded)
	return j, st, nil
}

// load reads the log into the ledger, the current file up to its size at
// open, so it never reads a line appended since (with Background the
// writer appends meanwhile; readTail reads those lines after). saw sees
// each event's time. Closing j.ctl.stop ends the read (ErrLoadStopped).
func (j *Journal) load(saw func(time.Time)) (LoadStats, error) {
	defer j.archKnown()
	if j.noDir {
		// The directory did not exist at the open (and could not be
		// made): an empty log, as a new directory's.
		return LoadStats{}, nil
	}
	st, err := loadInto(j.cfg.Dir, j.cfg.Logger, true, j.ledger, j.ctl, func(ev Event) { saw(ev.Time) }, func() {
		j.rotMu.Lock()
		j.archLast = j.ledger.archLast()
		j.rotMu.Unlock()
		j.archKnown()
	})
	if err == nil && !j.cfg.Background {
		// The read cut a torn last line off: the file ends whole now.
		if fi, serr := os.Stat(filepath.Join(j.cfg.Dir, CurrentLog)); serr == nil {
			j.size = fi.Size()
		}
		j.torn = endsTorn(filepath.Join(j.cfg.Dir, CurrentLog), j.size)
	}
	return st, err
}

// archKnown says archLast is set (scan may read).
func (j *Journal) archKnown() {
	select {
	case <-j.archReady:
	default:
		close(j.archReady)
	}
}

// afterLoad does what waits for the read: the gauge of files pending a
// fold, and, with start, the compression of rotated files left plain.
func (j *Journal) afterLoad(start bool) {
	plain := false
	if files, err := LogFiles(j.cfg.Dir); err == nil {
		var rotated []string
		for _, p := range files {
			if end, ok := rotatedTime(p); ok {
				j.saw(end)
				if n := logName(p); j.archLast == "" || n > j.archLast {
					rotated = append(rotated, p)
					plain = plain || !strings.HasSuffix(p, gzSuffix)
				}
			}
		}
		// Files a failed summary write left past the limit (fold) are
		// pending from the start: the gauge must not read 0 until the
		// next rotation's fold because the daemon restarted.
		j.unfolded.Store(int64(max(0, j.overLimit(rotated))))
	}
	if start && j.cfg.Compress && plain {
		// Rotated files left plain (a crash or a stop during their
		// compression, a failed one, or a run without Compress) are
		// compressed now, in the background.
		j.folds.Add(1)
		go j.fold()
	}
}

// endsTorn says whether the file at path, size bytes long, ends in a
// partial line (not in a newline).
func endsTorn(path string, size int64) bool {
	if size == 0 {
		return false
	}
	f, err := os.Open(path)
	if err != nil {
		return false
	}
	defer f.Close()
	var b [1]byte
	if _, err := f.ReadAt(b[:], size-1); err != nil {
		return false
	}
	return b[0] != '\n'
}

// loadResult is how Run's background read of the log ended.
type loadResult struct {
	st     LoadStats
	err    error
	took   time.Duration
	newest time.Time // the latest event time it read (saw)
}

// startLoad starts Run's background read of the log on a goroutine of
// its own, and stops it when ctx is done or Close is called. It touches
// nothing of the writer's, which writes meanwhile (bgWrite).
func (j *Journal) startLoad(ctx context.Context) <-chan loadResult {
	res := make(chan loadResult, 1)
	fin := make(chan struct{})
	go func() {
		select {
		case <-ctx.Done():
		case <-j.stop:
		case <-fin:
		}
		close(j.loadStop)
	}()
	go func() {
		start := time.Now()
		var newest time.Time
		st, err := j.load(func(t time.Time) {
			if t = t.Round(0); t.After(newest) {
				newest = t
			}
		})
		close(fin)
		res <- loadResult{st, err, time.Since(start), newest}
	}()
	return res
}

// endLoad is the writer's end of the background read: unless Close or
// ctx stopped it, the writer writes what it holds, reads the lines it
// appended to the current file during the read into the ledger
// (readTail: the events emitted since the start, after the old ones,
// each once) and from then on feeds the ledger as it writes; rotation may
// run again. A stopped read leaves the writer writing to the log alone
// until it finishes (the counts are said partial).
func (j *Journal) endLoad(r loadResult) {
	j.saw(r.newest)
	st, err := r.st, r.err
	st.Torn = st.Torn || j.tornCut
	stopped := errors.Is(err, ErrLoadStopped)
	if err != nil && !stopped {
		j.log.Error("audit: the event log could not be read whole; counts are partial, events from now on are counted and written",
			LogError, err, "files_read", st.Files, "events_read", st.Events)
	}
	if j.cfg.LoadDone != nil {
		j.cfg.LoadDone(st, r.took, err)
	}
	if !stopped {
		j.recordShed()
		j.flush()
		if terr := j.readTail(); terr != nil {
			j.log.Error("audit: the events written during the read of the event log could not be read back; counts lack them until a restart",
				LogError, terr)
			if err == nil {
				err = terr
			}
		}
		j.feedHeld()
		j.bgWrite = false
		j.unfed.Store(0)
	}
	j.dropHeld()
	j.afterLoad(!stopped)
	j.loadStats, j.loadErr = st, err
	j.loading.Store(false)
	close(j.loaded)
	if !stopped && j.f != nil && j.size >= j.cfg.MaxFileBytes {
		// It grew past its size during the read: rotated now (after a
		// stop, at the next start).
		j.rotate()
	}
}

// readTail reads the lines the writer appended to the current file during
// the background read (from its size at open, where the read stopped, to
// its end) into the ledger, in order. The writer calls it: nothing is
// appended meanwhile, and nothing rotated the file since the open.
func (j *Journal) readTail() error {
	path := filepath.Join(j.cfg.Dir, CurrentLog)
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) && j.loadedFrom == 0 {
		// No log, and none could be made during the read (a read-only
		// state directory): nothing was written to read back.
		return nil
	}
	if err != nil {
		return fmt.Errorf("audit: read event log: %w", err)
	}
	defer f.Close()
	// Up to its size now: a file that is not one (a device: /dev/full
	// reads zeros without end) is not read.
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("audit: read event log: %w", err)
	}
	if !fi.Mode().IsRegular() || fi.Size() <= j.loadedFrom {
		return nil
	}
	var st LoadStats
	_, err = readStream(io.NewSectionReader(f, j.loadedFrom, fi.Size()-j.loadedFrom), path, j.log, &st, func(ev Event) {
		j.saw(ev.Time)
		if ev.Kind == KindShed {
			j.ledger.addShed(ev.Time, ev.Count)
			return
		}
		j.ledger.emit(ev)
	})
	return err
}

// cutTorn cuts the partial last line off the file at path, size bytes
// long, and returns its size after: the end of its last whole line.
func cutTorn(path string, size int64) (int64, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return size, err
	}
	defer f.Close()
	buf := make([]byte, 64<<10)
	end := size
	for end > 0 {
		n := min(int64(len(buf)), end)
		if _, err := f.ReadAt(buf[:n], end-n); err != nil {
			return size, err
		}
		if i := bytes.LastIndexByte(buf[:n], '\n'); i >= 0 {
			end = end - n + int64(i) + 1
			break
		}
		end -= n
	}
	if err := f.Truncate(end); err != nil {
		return size, err
	}
	return end, nil
}

// LoadErr returns why the background read of the event log did not end
// (the ledger's counts are partial), or nil: a degraded state for
// /readyz ("event log read failed"). A read stopped by Close is none.
func (j *Journal) LoadErr() error {
	select {
	case <-j.loaded:
	default:
		return nil
	}
	if errors.Is(j.loadErr, ErrLoadStopped) {
		return nil
	}
	return j.loadErr
}

// reportLoadWait is how long a report waits for a background read of the
// event log to end before it answers with the counts so far, marked
// partial (Report.Loading).
var reportLoadWait = 2 * time.Second

// waitLoaded waits up to timeout for the background read to end; it
// returns nil when it ended whole, else how far it got.
func (j *Journal) waitLoaded(timeout time.Duration) *Loading {
	if timeout > 0 {
		t := time.NewTimer(timeout)
		defer t.Stop()
		select {
		case <-j.loaded:
		case <-t.C:
		}
	}
	select {
	case <-j.loaded:
		// A read Close stopped left the counts partial too (a report in
		// flight while the daemon stops): said, though no failure.
		if j.loadErr == nil {
			return nil
		}
		st := j.loadStats
		return &Loading{Files: st.Files, FilesTotal: int(j.ctl.total.Load()), Events: st.Events, Error: j.loadErr.Error()}
	default:
	}
	c := j.ctl
	if c == nil {
		return &Loading{}
	}
	return &Loading{Files: int(c.files.Load()), FilesTotal: int(c.total.Load()), Events: c.events.Load(),
		Queued: uint64(max(0, j.queued.Load())) + j.unfed.Load(), Shed: j.shed.Load()}
}

// LoadDir reads the event log in dir into a new ledger, without writing
// anything (for `egressd report` when the daemon is not running).
func LoadDir(dir string, eng *policy.Engine, opt LedgerOptions, log *slog.Logger) (*Ledger, LoadStats, error) {
	if log == nil {
		log = slog.Default()
	}
	// A running daemon may rotate or fold a file while this reads: a
	// fold between the read of the summary and the listing of the files
	// would leave a file's events in neither, a rotation would rename
	// the current file before it is read. Read again when the summary or
	// the rotated files changed meanwhile.
	var l *Ledger
	var st LoadStats
	var err error
	for try := 1; ; try++ {
		before := dirState(dir)
		l = NewLedger(eng, opt)
		st, err = loadInto(dir, log, false, l, nil, nil, nil)
		changed := before != dirState(dir)
		if (err == nil || errors.Is(err, os.ErrNotExist)) && changed && try < 4 {
			continue
		}
		if err == nil && changed {
			log.Warn("audit: the event log kept changing while it was read (a running daemon rotating it); counts may miss a file", "dir", dir)
			l.mu.Lock()
			l.archNote = strings.TrimPrefix(l.archNote+"; the event log kept changing while it was read (a running daemon rotating it): counts may miss a file", "; ")
			l.mu.Unlock()
		}
		break
	}
	if err != nil {
		return nil, st, err
	}
	skip := l.archLast()
	l.history = func(ctx context.Context, since time.Time, fn func(Event)) error {
		return scanDir(ctx, dir, since, skip, fn)
	}
	return l, st, nil
}

// dirState identifies what a rotation or a fold changes in dir: the
// summary file and the names of the rotated files, not their compression.
func dirState(dir string) string {
	var b strings.Builder
	if fi, err := os.Stat(filepath.Join(dir, ArchiveFile)); err == nil {
		fmt.Fprintf(&b, "%d %d", fi.Size(), fi.ModTime().UnixNano())
		if sys, ok := fi.Sys().(*syscall.Stat_t); ok {
			fmt.Fprintf(&b, " %d", sys.Ino)
		}
	}
	// A file as the plain one it was (logName): its compression changes
	// none of its events, and a reader that listed the plain file reads
	// the compressed one (readFile).
	files, _ := LogFiles(dir)
	for _, f := range files {
		b.WriteString("\n" + logName(f))
	}
	return b.String()
}

// loadInto starts the fresh ledger l from dir's summary of rotated-out
// files, if any, then adds the events of the kept files. With repair
// (the daemon), a torn last line is cut and an unreadable summary is set
// aside (not one a newer egressd wrote); never does either stop the load.
// each, when not nil, sees every event of the kept files first; arch,
// when not nil, is called once the summary is in l. ctl, when not nil,
// steers and counts the read (readDirCtl).
func loadInto(dir string, log *slog.Logger, repair bool, l *Ledger, ctl *loadCtl, each func(Event), arch func()) (LoadStats, error) {
	a, note, _ := loadArchive(dir, log, repair)
	if testHookArchiveRead != nil {
		testHookArchiveRead()
	}
	skip := ""
	if a != nil {
		l.importArchive(a)
		skip = a.LastFile
	}
	if note != "" {
		l.mu.Lock()
		l.archNote = note
		l.mu.Unlock()
	}
	if arch != nil {
		arch()
	}
	st, err := readDirAhead(dir, log, repair, skip, ctl, func(ev Event) {
		if each != nil {
			each(ev)
		}
		if ctl != nil {
			ctl.events.Add(1)
		}
		if ev.Kind == KindShed {
			l.addShed(ev.Time, ev.Count)
			return
		}
		l.add(&ev)
	})
	if a != nil {
		st.Summarized, st.SummarizedFiles = a.Events, a.Files
	}
	return st, err
}

// readDirAhead is readDir of every kept file, the reading (gzip, JSON)
// on a goroutine of its own a few batches of events ahead of fn, which
// sees them in order on the caller's: a restart's read of the log takes
// the longer of the two, not their sum (BenchmarkOpenJournalFull).
func readDirAhead(dir string, log *slog.Logger, repair bool, skip string, ctl *loadCtl, fn func(Event)) (LoadStats, error) {
	const batchLen, ahead = 512, 4
	// A batch is events, and, with files > 0, the mark that the files
	// before it are read whole once its events are taken (ctl counts a
	// file when its events are in the ledger, not when read ahead).
	type aheadBatch struct {
		evs   []Event
		files int
	}
	batches := make(chan aheadBatch, ahead)
	free := make(chan []Event, ahead+1)
	var st LoadStats
	var err error
	go func() {
		defer close(batches)
		batch := make([]Event, 0, batchLen)
		next := func(files int) {
			batches <- aheadBatch{batch, files}
			select {
			case batch = <-free:
			default:
				batch = make([]Event, 0, batchLen)
			}
		}
		var fileEnd func(int)
		if ctl != nil {
			fileEnd = next
		}
		st, err = readDirCtl(dir, log, time.Time{}, repair, skip, ctl, fileEnd, func(ev Event) {
			batch = append(batch, ev)
			if len(batch) == batchLen {
				next(0)
			}
		})
		if len(batch) > 0 {
			batches <- aheadBatch{batch, 0}
		}
	}()
	for b := range batches {
		for i := range b.evs {
			fn(b.evs[i])
		}
		clear(b.evs) // no references kept to the events' strings
		select {
		case free <- b.evs[:0]:
		default:
		}
		if b.files > 0 {
			ctl.files.Store(int64(b.files))
			if ctl.fileHook != nil {
				ctl.fileHook(b.files, ctl.stop)
			}
		}
	}
	return st, err // set before batches closed
}

// testHookArchiveRead, when set, is called by loadInto between reading
// the summary and reading the files (tests: a fold then).
var testHookArchiveRead func()

// scan streams the recorded events (for windowed reports). It holds off
// rotation, which renames the current file and opens a new one: a listing
// taken in between would miss the renamed file.
func (j *Journal) scan(ctx context.Context, since time.Time, fn func(Event)) error {
	// A background read sets archLast once it read the summary: before,
	// the files in it would be read again.
	select {
	case <-j.archReady:
	case <-ctx.Done():
		return ctx.Err()
	}
	j.rotMu.RLock()
	defer j.rotMu.RUnlock()
	return scanDir(ctx, j.cfg.Dir, since, j.archLast, fn)
}

// scanDir is readDir for a window's report (Ledger.history): it stops,
// with ctx's error, once ctx ends (its caller left), before the next file
// or at the next 64 KiB of one.
func scanDir(ctx context.Context, dir string, since time.Time, skip string, fn func(Event)) error {
	ctl := &loadCtl{stop: ctx.Done(), curLimit: -1}
	_, err := readDirCtl(dir, slog.New(slog.DiscardHandler), since, false, skip, ctl, nil, fn)
	if err != nil && ctx.Err() != nil {
		return ctx.Err()
	}
	return err
}

// LogFiles returns the event log files of dir, oldest first: the rotated
// ones, plain (events-TIME.ndjson) or compressed (events-TIME.ndjson.gz),
// then the current one. A rotated file in both forms (the compression
// renamed its file in and has not removed the plain one yet, or a crash
// came in between) is listed once, plain: both are whole.
func LogFiles(dir string) ([]string, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("audit: state directory: %w", err)
	}
	var files []string
	for _, e := range ents {
		if n := e.Name(); e.Type().IsRegular() && isRotated(n) {
			files = append(files, filepath.Join(dir, n))
		}
	}
	slices.Sort(files)
	// Sorted, a plain file comes right before its compressed form.
	files = slices.CompactFunc(files, func(a, b string) bool { return logName(a) == logName(b) })
	if fi, err := os.Stat(filepath.Join(dir, CurrentLog)); err == nil && fi.Mode().IsRegular() {
		files = append(files, filepath.Join(dir, CurrentLog))
	}
	return files, nil
}

// isRotated says whether a base name is a rotated event log file's, plain
// or compressed.
func isRotated(n string) bool {
	return strings.HasPrefix(n, rotatedPrefix) && (strings.HasSuffix(n, rotatedSuffix) || strings.HasSuffix(n, rotatedSuffix+gzSuffix))
}

// logName is the base name of an event log file as the plain file it was:
// names compare (the summary's LastFile, the order of files) in this form.
func logName(path string) string {
	return strings.TrimSuffix(filepath.Base(path), gzSuffix)
}

// readDir reads every log file of dir in order. With repair, a torn last
// line of the current file is cut off so that appends start on a fresh
// line. With since, a rotated file named before it is skipped (rotate
// names a file no earlier than the records it holds), except one named
// before SourceFloor: rotated while the clock was wrong (a log begun at
// 1970, before NTP set the clock), its events are the ones a windowed
// report counts as in no window. Rotated files named skip or older are in
// the summary already and are not read.
func readDir(dir string, log *slog.Logger, since time.Time, repair bool, skip string, fn func(Event)) (LoadStats, error) {
	return readDirCtl(dir, log, since, repair, skip, nil, nil, fn)
}

// readDirCtl is readDir steered by ctl, when not nil: the read stops
// (ErrLoadStopped) once ctl.stop is closed, reads the current file up to
// ctl.curLimit, and counts the files to read. fileEnd, when not nil, is
// called after each file with the files read so far.
func readDirCtl(dir string, log *slog.Logger, since time.Time, repair bool, skip string, ctl *loadCtl, fileEnd func(int), fn func(Event)) (LoadStats, error) {
	var st LoadStats
	files, err := LogFiles(dir)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) && !repair {
			return st, nil
		}
		return st, err
	}
	skip = strings.TrimSuffix(skip, gzSuffix)
	var read []string
	for i, path := range files {
		if n := logName(path); skip != "" && n != CurrentLog && n <= skip {
			continue
		}
		if !since.IsZero() && i < len(files)-1 {
			if end, ok := rotatedTime(path); ok && end.Before(since) && !end.Before(SourceFloor) {
				continue
			}
		}
		read = append(read, path)
	}
	if ctl != nil {
		ctl.total.Store(int64(len(read)))
	}
	for i, path := range read {
		last := i == len(read)-1 && filepath.Base(path) == CurrentLog
		if ctl != nil && ctl.stopped() {
			return st, ErrLoadStopped
		}
		cut := repair && last && (ctl == nil || !ctl.appended)
		if err := readFileCtl(path, log, cut, &st, ctl, last, fn); err != nil {
			if !errors.As(err, new(damagedError)) {
				return st, err
			}
			st.Damaged++
		}
		st.Files++
		if fileEnd != nil {
			fileEnd(st.Files)
		}
	}
	return st, nil
}

// stopped says whether the read is to stop.
func (c *loadCtl) stopped() bool {
	if c.stop == nil {
		return false
	}
	select {
	case <-c.stop:
		return true
	default:
		return false
	}
}

// stopReader ends a read with ErrLoadStopped once its loadCtl says stop:
// a read of a long log on a slow disk ends at the next 64 KiB.
type stopReader struct {
	r   io.Reader
	ctl *loadCtl
}

func (s stopReader) Read(p []byte) (int, error) {
	if s.ctl.stopped() {
		return 0, ErrLoadStopped
	}
	return s.r.Read(p)
}

func rotatedTime(path string) (time.Time, bool) {
	n := strings.TrimSuffix(strings.TrimPrefix(logName(path), rotatedPrefix), rotatedSuffix)
	n, _, _ = strings.Cut(n, "-")
	t, err := time.Parse(rotateStamp, n)
	return t, err == nil
}

const rotateStamp = "20060102T150405.000000000Z"

// ReadEvents calls fn for each event of an NDJSON stream (an events file),
// skipping lines that are not events; it returns how many it skipped and
// whether the last line was torn. Shed records are passed on too.
func ReadEvents(r io.Reader, fn func(Event)) (skipped int, torn bool, err error) {
	var st LoadStats
	_, err = readStream(r, "events", slog.New(slog.DiscardHandler), &st, fn)
	return st.Skipped, st.Torn, err
}

// readFile reads one event log file. A compressed rotated file that
// cannot be read to its end (truncated, corrupt) is an error line on log
// and a damagedError: its events before the damage went to fn, and the
// caller goes on with the next file. A plain rotated file that is gone
// is read in its compressed form (the compression removed it after the
// caller listed it).
func readFile(path string, log *slog.Logger, repair bool, st *LoadStats, fn func(Event)) error {
	return readFileCtl(path, log, repair, st, nil, false, fn)
}

// readFileCtl is readFile steered by ctl, when not nil (readDirCtl);
// current says path is the current file.
func readFileCtl(path string, log *slog.Logger, repair bool, st *LoadStats, ctl *loadCtl, current bool, fn func(Event)) error {
	f, err := os.Open(path)
	if err != nil && errors.Is(err, os.ErrNotExist) && isRotated(filepath.Base(path)) && !strings.HasSuffix(path, gzSuffix) {
		path += gzSuffix
		f, err = os.Open(path)
	}
	if err != nil {
		return fmt.Errorf("audit: read event log: %w", err)
	}
	defer f.Close()
	var r io.Reader = f
	if ctl != nil {
		r = stopReader{f, ctl}
		if current && ctl.curLimit >= 0 {
			r = io.LimitReader(r, ctl.curLimit)
		}
	}
	if strings.HasSuffix(path, gzSuffix) {
		before := st.Events
		zr, err := gzip.NewReader(bufio.NewReaderSize(r, 64<<10))
		if err != nil {
			err = fmt.Errorf("audit: read %s: %w", path, err)
		} else {
			_, err = readStream(zr, path, log, st, fn)
		}
		if errors.Is(err, ErrLoadStopped) {
			return err
		}
		if err != nil {
			err = damagedError{err}
			log.Error("audit: a compressed event log file is damaged; counted its events before the damage, the rest of it is lost",
				"file", filepath.Base(path), "events_read", st.Events-before, LogError, err)
		}
		return err
	}
	good, err := readStream(r, path, log, st, fn)
	if err != nil {
		return err
	}
	if st.Torn && repair {
		// Cut the partial line so the next event starts on its own line.
		// On a read-only filesystem it stays: the journal opens degraded
		// (OpenJournal), and its first write there, once it is writable,
		// starts on a line of its own (torn), as after a cut that failed
		// at a background open.
		if err := os.Truncate(path, good); err != nil && !errors.Is(err, syscall.EROFS) {
			return fmt.Errorf("audit: repair event log: %w", err)
		}
	}
	return nil
}

// damagedError is a compressed event log file that could not be read to
// its end.
type damagedError struct{ err error }

func (e damagedError) Error() string { return e.err.Error() }
func (e damagedError) Unwrap() error { return e.err }

// readStream reads events line by line and returns the offset after the
// last complete line.
func readStream(r io.Reader, name string, log *slog.Logger, st *LoadStats, fn func(Event)) (int64, error) {
	br := bufio.NewReaderSize(r, 64<<10)
	var off, good int64 // bytes read; offset after the last complete line
	var line []byte
	tooLong := false
	lineNo := 0
	for {
		chunk, err := br.ReadSlice('\n')
		off += int64(len(chunk))
		if !tooLong && len(line)+len(chunk) <= maxLine {
			line = append(line, chunk...)
		} else {
			tooLong, line = true, line[:0]
		}
		if errors.Is(err, bufio.ErrBufferFull) {
			continue
		}
		if errors.Is(err, io.EOF) {
			if tooLong || len(bytes.TrimSpace(line)) > 0 {
				st.Torn = true
				log.Warn("audit: event log ends in a torn line; skipped it", "file", name, "line", lineNo+1, "bytes", off-good)
			}
			return good, nil
		}
		if err != nil {
			return good, fmt.Errorf("audit: read %s: %w", name, err)
		}
		lineNo++
		good = off
		body := bytes.TrimSpace(line)
		bad := tooLong
		line, tooLong = line[:0], false
		if len(body) == 0 && !bad {
			continue
		}
		var ev Event
		if bad || body[0] != '{' || !decodeEvent(body, &ev) || ev.Kind == "" {
			st.Skipped++
			if st.Skipped <= 5 {
				log.Warn("audit: skipped a line of the event log that is not an event", "file", name, "line", lineNo)
			}
			continue
		}
		switch {
		case ev.Kind == KindShed:
			st.Shed += ev.Count
		case ev.isSummary():
			st.Events += ev.Count + ev.Duplicates
			ev.expand(fn)
			continue
		default:
			st.Events++
		}
		fn(ev)
	}
}

// Emit queues ev for the ledger and the log. It never blocks: when the
// queue is full the event is shed and counted. It does not wake the
// writer either, except when the queue reaches kickLen: the writer takes
// the queue as a batch every half flush interval, so that a connection's
// event costs neither a goroutine switch nor a write(2) of its own. The
// event is bounded (Event.Bound) before it is queued: the queue, the log
// and the ledger hold the same shortened text.
func (j *Journal) Emit(ev Event) {
	ev.Bound()
	ev.ownText()
	size := queueBytes(&ev)
	j.qmu.Lock()
	if j.npending+j.heldN >= j.cfg.QueueLen || j.qbytes+size > j.cfg.QueueBytes {
		j.qmu.Unlock()
		j.shed.Add(1)
		if firstReport(&ev) && !j.ledger.holdsFlow(&ev, true) {
			// The connection's only report so far: no other
			// component's counted it (lostFirsts). Not noted where
			// the ledger is busy (the writer's): Emit never waits.
			j.lostFirst.add(&ev, lostShed)
		}
		return
	}
	if last := len(j.pending) - 1; last >= 0 && len(j.pending[last]) < queueChunk {
		j.pending[last] = append(j.pending[last], ev)
	} else {
		c := j.spare
		j.spare = nil
		if c == nil && last >= 0 {
			// A burst: its later chunks are whole at once. The
			// first grows as append makes it, so that a trickle
			// at rest holds a few events' array, not a chunk's.
			c = make([]Event, 0, min(j.cfg.QueueLen, queueChunk))
		}
		j.pending = append(j.pending, append(c, ev))
	}
	j.npending++
	j.qbytes += size
	n := j.npending
	j.qmu.Unlock()
	j.queued.Add(1)
	if n == j.kickLen() {
		select {
		case j.kick <- struct{}{}:
		default:
		}
	}
}

// kickLen is the queue length at which Emit wakes the writer before its
// tick: a burst is written in batches of this size, not held until the
// tick with the queue filling up.
func (j *Journal) kickLen() int { return max(1, min(j.cfg.QueueLen/4, 1024)) }

// queueChunk is the most events one chunk of the queue holds (about
// 500 KB).
const queueChunk = 1024

// takeBatch writes the queued events (the writer's side of Emit).
func (j *Journal) takeBatch() {
	j.qmu.Lock()
	batch := j.pending
	j.pending, j.npending = nil, 0
	j.qmu.Unlock()
	for ci, c := range batch {
		var size int64
		for i := range c {
			size += queueBytes(&c[i])
			j.writeEvent(c[i])
		}
		j.queued.Add(-int64(len(c)))
		clear(c) // no references kept to the events' strings
		batch[ci] = nil
		// The chunk's bytes count against QueueBytes until it is let
		// go: a write that stalls in the batch holds it.
		j.qmu.Lock()
		j.qbytes -= size
		if ci == len(batch)-1 {
			// One chunk's array is kept for the next (written at
			// the next tick or kick, a chunk at most).
			j.spare = c[:0]
		}
		j.qmu.Unlock()
	}
}

// defaultQueueBytes is JournalConfig.QueueBytes's default: 65,536 events
// of short names (some 550 B each queued) fit, some 21,000 of the
// longest text an event keeps.
const defaultQueueBytes = 64 << 20

// queueBytes is what ev takes queued: the Event, and the client's text
// ownText copies for it (the rule, the MAC and the rest are the policy's
// and the component's, shared), and an alarm's top clients.
func queueBytes(ev *Event) int64 {
	n := int64(unsafe.Sizeof(*ev)) + int64(len(ev.Name)+len(ev.Path)+len(ev.Front)+len(ev.LearnedName))
	for _, c := range ev.TopClients {
		n += int64(unsafe.Sizeof(c)) + int64(len(c))
	}
	for _, o := range ev.OtherNames {
		n += int64(unsafe.Sizeof(o)) + int64(len(o))
	}
	return n
}

// Shed returns how many events Emit has shed since the journal opened.
func (j *Journal) Shed() uint64 { return j.shed.Load() }

// Written returns how many events reached the log file.
func (j *Journal) Written() uint64 { return j.written.Load() }

// WriteFailed returns how many events were lost to write errors.
func (j *Journal) WriteFailed() uint64 { return j.writeFailed.Load() }

// Err returns the last write error, or nil when the latest write
// succeeded: a degraded state for /readyz ("event log write failing").
func (j *Journal) Err() error {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.lastErr
}

// FoldErr returns why the latest fold could not add a rotated-out file
// to the summary (ArchiveFile), or nil when it could: a degraded state
// for /readyz ("summary of rotated-out event log files failing"). The
// file is kept meanwhile, up to two past the limit.
func (j *Journal) FoldErr() error {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.foldErr
}

// Ledger returns the journal's ledger.
func (j *Journal) Ledger() *Ledger { return j.ledger }

// Run writes queued events until ctx is done or Close is called, then
// drains the queue, records the shed count, flushes and closes the file.
// With Background it reads the event log into the ledger meanwhile
// (stopped early by ctx or Close), writing what it takes to the log alone
// until the read ends, then reads that back into the ledger (endLoad).
func (j *Journal) Run(ctx context.Context) error {
	if !j.running.CompareAndSwap(false, true) {
		return errors.New("audit: journal: Run called twice")
	}
	defer close(j.done)
	var loadRes <-chan loadResult
	if j.cfg.Background {
		// The old events into the ledger first; what is emitted
		// meanwhile is written to the log as it comes (a crash loses
		// none of it) and read into the ledger after them (endLoad).
		j.bgWrite = true
		loadRes = j.startLoad(ctx)
	}
	tick := time.NewTicker(j.cfg.FlushInterval / 2)
	defer tick.Stop()
	j.lastFlush = time.Now()
	for {
		var synced chan struct{}
		select {
		case r := <-loadRes:
			loadRes = nil
			j.endLoad(r)
			continue
		case <-j.kick:
		case <-tick.C:
		case synced = <-j.syncs:
		case <-ctx.Done():
			if loadRes != nil {
				j.endLoad(<-loadRes)
			}
			return j.finish()
		case <-j.stop:
			if loadRes != nil {
				j.endLoad(<-loadRes)
			}
			return j.finish()
		}
		j.takeBatch()
		if j.detail != nil && j.detail.due(j.clock()) {
			j.writeSummaries()
		}
		j.logSummaries(false)
		j.recordShed()
		if len(j.buf) > 0 {
			j.flush()
		}
		if synced != nil {
			close(synced)
		}
	}
}

// Sync waits until the writer has taken the events queued before the
// call into the ledger and the log (flushed), and reports whether it did
// within timeout; false at once when Run is not running or is still
// reading the log (Background). The daemon's
// live report calls it after listing capture's open flows: a flow capture
// reported just before is then in the ledger, not in neither.
func (j *Journal) Sync(timeout time.Duration) bool {
	if !j.running.Load() || j.loading.Load() {
		// While the log is read (Background), the writer writes the
		// queue to the log alone, not to the ledger: the report says
		// its counts are partial (Loading).
		return false
	}
	t := time.NewTimer(timeout)
	defer t.Stop()
	done := make(chan struct{})
	select {
	case j.syncs <- done:
	case <-j.done:
		return false
	case <-t.C:
		return false
	}
	select {
	case <-done:
		return true
	case <-j.done:
		return false
	case <-t.C:
		return false
	}
}

// QuietLine reports whether the decision log line of ev is left out:
// the same budget as the event log's detail, kept apart (a component
// logs as it emits, before the writer sees the event), counts it into a
// summary line the writer logs at the interval's end: a decision line
// with count, the number of decisions of that shape it stands for (the
// first at time, the last at until). Components call it through
// [QuietLine]. Safe for concurrent use.
func (j *Journal) QuietLine(ev Event) bool {
	if j.lines == nil || !budgeted(&ev) {
		return false // not bounded, locked or timed: every allowed line asks
	}
	ev.Bound()
	j.linesMu.Lock()
	held := j.lines.hold(&ev, true, j.clock())
	j.linesMu.Unlock()
	if held {
		j.quieted.Add(1)
	}
	return held
}

// logSummaries logs the summary line of each shape of decision lines
// QuietLine held back, when the interval is over (or all is).
func (j *Journal) logSummaries(all bool) {
	if j.lines == nil {
		return
	}
	var sums []Event
	now := j.clock()
	j.linesMu.Lock()
	if all || j.lines.due(now) {
		j.lines.roll(now, func(s Event) { sums = append(sums, s) })
	}
	j.linesMu.Unlock()
	for _, s := range sums {
		attrs := make([]slog.Attr, 0, FlowAttrsMax+6)
		attrs = s.AppendFlowAttrs(attrs)
		if s.QType != "" {
			attrs = append(attrs, slog.String(LogQType, s.QType), slog.String(LogRCode, s.RCode))
		}
		attrs = append(attrs, slog.String("source", string(s.Source)), slog.Uint64("count", s.Count), slog.Time("first_seen", s.Time))
		if !s.Until.IsZero() {
			attrs = append(attrs, slog.Time("last_seen", s.Until))
		}
		j.log.LogAttrs(context.Background(), slog.LevelWarn, CanonicalMessage, attrs...)
	}
}

// writeSummaries ends the detail budget's interval: it writes a summary
// record for each shape that held events back.
func (j *Journal) writeSummaries() {
	if j.detail == nil {
		return
	}
	j.detail.roll(j.clock(), func(s Event) {
		if !s.Until.IsZero() {
			j.saw(s.Until)
		}
		line, err := s.appendJSON(j.encodeBuf[:0])
		j.encodeBuf = line
		if err != nil {
			j.writeFailed.Add(s.Count + s.Duplicates)
			j.ledger.addUnwritten(s.Count + s.Duplicates)
			return
		}
		j.append(line, true)
	})
}

// finish drains what is queued now, records shed events and closes the
// file.
func (j *Journal) finish() error {
	j.takeBatch()
	j.writeSummaries()
	j.logSummaries(true)
	j.recordShed()
	j.flush()
	var err error
	if j.f != nil {
		err = j.f.Close()
		j.f = nil
	}
	j.folds.Wait()
	j.mu.Lock()
	j.closed = true
	j.mu.Unlock()
	if err != nil {
		return fmt.Errorf("audit: close event log: %w", err)
	}
	return nil
}

// Close stops Run (or, if Run never ran, writes what is queued) and closes
// the log. It is idempotent.
func (j *Journal) Close() error {
	var err error
	j.once.Do(func() {
		close(j.stop)
		if j.running.CompareAndSwap(false, true) {
			// Run never started: do its final work here.
			if j.cfg.Background {
				j.loadErr = ErrLoadStopped
				j.loading.Store(false)
				j.archKnown()
				close(j.loaded)
			}
			err = j.finish()
			close(j.done)
			return
		}
		<-j.done
	})
	return err
}

func (j *Journal) writeEvent(ev Event) {
	j.saw(ev.Time)
	// first: ev is a revised report of a flow whose first report the
	// log lacks (lostFirsts), written as a first report.
	first := false
	if ev.Revised && ev.Kind == KindFlow {
		switch j.lostFirst.take(&ev) {
		case lostShed:
			// Neither the ledger nor the log has the flow: this
			// report counts as it, unless another component's
			// report of the connection, queued when the first was
			// shed, counted it since.
			ev.Revised = j.ledger.holdsFlow(&ev, false)
		case lostUnwritten:
			// The ledger counted the flow: this report merges into
			// it (or is a duplicate of it, forgotten), and stands
			// for it in the log.
			first = true
		}
	}
	if j.bgWrite {
		// The ledger reads the line (readTail), and the lost first
		// report after it (feedHeld): counted as the line says.
		ev.Revised = ev.Revised && !first
		// During the background read the event is written alone, whole,
		// and counted by readTail after the read: the detail budget's
		// choice to hold it back needs the ledger's count of its flow
		// (a twin written or held), which lacks the rest of the log and
		// the events since the start until then.
		if j.testHookPre != nil {
			j.testHookPre()
		}
		line, err := ev.appendJSON(j.encodeBuf[:0])
		j.encodeBuf = line
		if err != nil {
			j.shed.Add(1) // in no count: not in the log for readTail
			j.lostFirst.add(&ev, lostShed)
			return
		}
		j.unfed.Add(1)
		if firstReport(&ev) {
			// Counted after the read: kept if its write fails.
			j.firstLines = append(j.firstLines, len(j.ends))
		}
		j.append(line, true)
		return
	}
	var counted bool
	if j.detail == nil || first {
		// A revised report that stands for a lost first report is
		// written whole, never held back into a summary (whose later
		// reports count as duplicates).
		counted = j.ledger.emit(ev)
		ev.Revised = ev.Revised && !first
	} else {
		if j.detail.full() {
			j.writeSummaries()
		}
		now := j.clock()
		var held bool
		counted, held = j.ledger.emitHold(ev, j.detail.gen, func(counted bool, twin *heldFlow) (bool, *heldFlow) {
			return j.detail.holdFlow(&ev, counted, twin, now)
		})
		if held {
			j.summarized.Add(1)
			return
		}
	}
	// keep: the log must keep ev for its connection to count read back
	// (lostFirsts notes it if the write fails). A first report merged
	// into another component's report counted is not: that one stands.
	keep := first || counted && firstReport(&ev)
	if j.testHookPre != nil {
		j.testHookPre()
	}
	line, err := ev.appendJSON(j.encodeBuf[:0])
	j.encodeBuf = line
	if err != nil {
		j.writeFailed.Add(1)
		j.ledger.addUnwritten(1)
		if keep {
			j.lostFirst.add(&ev, lostUnwritten)
		}
		return
	}
	if keep {
		j.firstLines = append(j.firstLines, len(j.ends))
	}
	j.append(line, true)
}

// recordShed writes a KindShed record for events shed since the last one.
func (j *Journal) recordShed() {
	n := j.shed.Load() - j.shedLogged
	if n == 0 {
		return
	}
	j.shedLogged += n
	now := time.Now().UTC()
	j.saw(now)
	b, _ := json.Marshal(Event{Kind: KindShed, Time: now, Count: n})
	if j.bgWrite {
		// readTail counts the record once it is in the log; one the
		// write loses is recorded again (flush).
		j.appendLine(append(b, '\n'), false, n)
		return
	}
	j.ledger.addShed(now, n)
	j.append(append(b, '\n'), false)
}

// append adds one line to the write buffer; event says whether it is an
// event (counted as written or lost) or a shed record.
func (j *Journal) append(line []byte, event bool) { j.appendLine(line, event, 0) }

// appendLine is append; shed > 0 is the count of a shed record written
// during the background read (shedLines).
func (j *Journal) appendLine(line []byte, event bool, shed uint64) {
	if len(j.buf) == 0 && j.torn {
		// The previous write may have left a partial line: start a new
		// one, so readers skip only the fragment.
		j.buf = append(j.buf, '\n')
	}
	j.buf = append(j.buf, line...)
	if event {
		j.ends = append(j.ends, len(j.buf))
	}
	if shed > 0 {
		j.shedLines = append(j.shedLines, shedLine{len(j.buf), shed})
	}
	if len(j.buf) >= 64<<10 || j.size+int64(len(j.buf)) >= j.cfg.MaxFileBytes {
		j.flush()
	}
}

// flush writes the buffer to the file. Accounting is exact: the events
// whose whole line reached the file are written, the others lost.
func (j *Journal) flush() {
	j.lastFlush = time.Now()
	if len(j.buf) == 0 {
		return
	}
	var n int
	err := errJournalClosed
	if j.f == nil && j.reopen {
		err = j.openCurrent()
		if err == nil && j.torn && j.buf[0] != '\n' {
			// The file opened ends in a partial line (a filesystem
			// mounted anew after its last write reached the disk in
			// part), and the lines were put together before it was
			// known: the first starts on a line of its own.
			j.buf = append([]byte{'\n'}, j.buf...)
			for i := range j.ends {
				j.ends[i]++
			}
			for i := range j.shedLines {
				j.shedLines[i].end++
			}
		}
	}
	if j.f != nil {
		n, err = j.f.Write(j.buf)
	}
	var ok uint64
	for _, e := range j.ends {
		if e > n {
			break
		}
		ok++
	}
	j.written.Add(ok)
	j.size += int64(n)
	for _, sl := range j.shedLines {
		if sl.end > n {
			j.shedLogged -= sl.n // not in the log: recorded again
		}
	}
	j.shedLines = j.shedLines[:0]
	if err != nil {
		lost := uint64(len(j.ends)) - ok
		if j.bgWrite {
			// Not in the log, so not read back after the read
			// (readTail): held to be counted after it, as the events
			// whose write fails after it are (write-failed,
			// unwritten); past the bound, shed (in no count).
			kept := j.hold(int(ok))
			j.writeFailed.Add(kept)
			j.unfed.Add(-(lost - kept))
			j.shed.Add(lost - kept)
			j.lostLines(int(ok), int(ok+kept), lostUnwritten)
			j.lostLines(int(ok+kept), len(j.ends), lostShed)
		} else {
			j.writeFailed.Add(lost)
			j.ledger.addUnwritten(lost)
			j.lostLines(int(ok), len(j.ends), lostUnwritten)
		}
		j.torn = (n > 0 && j.buf[n-1] != '\n') || (n == 0 && j.torn)
		if j.f != nil && (errors.Is(err, syscall.EROFS) || errors.Is(err, syscall.EIO)) {
			// The filesystem went read-only under the open file (ext4
			// errors=remount-ro) or the device fails: that file stays
			// so until a restart. The next flush opens the log by its
			// name, which a filesystem mounted anew makes writable.
			j.f.Close()
			j.f, j.reopen = nil, true
		}
		j.failed(err)
	} else {
		j.torn = false
		j.mu.Lock()
		was := j.lastErr
		j.lastErr = nil
		j.mu.Unlock()
		if was != nil && j.errSaid {
			// Only after a failure a line said (failed).
			j.log.Info("audit: event log written again", "lost_events", j.writeFailed.Load())
		}
		j.errSaid = false
	}
	j.buf, j.ends, j.firstLines = j.buf[:0], j.ends[:0], j.firstLines[:0]
	if j.f != nil && j.size >= j.cfg.MaxFileBytes && !j.bgWrite {
		// Not during the background read, which reads the current
		// file by its name (endLoad rotates it after).
		j.rotate()
	}
}

var errJournalClosed = errors.New("audit: event log is not open")

// lostLines notes the first reports the log must keep (firstLines) among
// the event lines of buf from the from-th to the to-th (a write that did
// not reach the log) as lost how (lostFirsts).
func (j *Journal) lostLines(from, to int, how lostHow) {
	for _, i := range j.firstLines {
		if i >= from && i < to {
			j.lostFirst.addLine(j.buf, j.ends[i], how)
		}
	}
}

// hold keeps the event lines of buf from the from-th on (a write during
// the background read that did not reach the file) for the ledger after
// the read (feedHeld), and returns how many it kept: the first ones. They
// count against the queue's bounds, with what is queued: QueueLen events
// and QueueBytes bytes in all (Emit sheds past them).
func (j *Journal) hold(from int) uint64 {
	var kept uint64
	j.qmu.Lock()
	defer j.qmu.Unlock()
	for _, end := range j.ends[from:] {
		start := bytes.LastIndexByte(j.buf[:end-1], '\n') + 1
		size := int64(end - start)
		if j.npending+j.heldN >= j.cfg.QueueLen || j.qbytes+size > j.cfg.QueueBytes {
			break
		}
		last := len(j.held) - 1
		if last < 0 || cap(j.held[last])-len(j.held[last]) < int(size) {
			j.held = append(j.held, make([]byte, 0, max(heldChunk, int(size))))
			last++
		}
		j.held[last] = append(j.held[last], j.buf[start:end]...)
		j.heldN++
		j.heldBytes += size
		j.qbytes += size
		kept++
	}
	return kept
}

// heldChunk is the size of a chunk of held event lines (hold).
const heldChunk = 64 << 10

// dropHeld lets the held events go (counted by feedHeld, or not after a
// stopped read), and their place in the queue's bounds.
func (j *Journal) dropHeld() {
	j.qmu.Lock()
	j.qbytes -= j.heldBytes
	j.held, j.heldN, j.heldBytes = nil, 0, 0
	j.qmu.Unlock()
}

// feedHeld counts the events held by hold in the ledger, as unwritten
// (endLoad, after readTail: after the events written during the read,
// though some of those may have come later, once the log was writable
// again).
func (j *Journal) feedHeld() {
	if j.heldN == 0 {
		return
	}
	var st LoadStats
	for _, c := range j.held {
		readStream(bytes.NewReader(c), "held events", j.log, &st, func(ev Event) {
			j.saw(ev.Time)
			j.ledger.emit(ev)
		})
	}
	j.ledger.addUnwritten(uint64(j.heldN))
	j.dropHeld()
}

// failed records a write error and logs it when it starts a failure,
// or is of another errno than the one before (a full disk that went
// read-only): once, not at each flush while it lasts ("event log
// written again" ends it).
func (j *Journal) failed(err error) {
	err = fmt.Errorf("audit: write event log: %w", err)
	j.mu.Lock()
	was := j.lastErr
	j.lastErr = err
	j.mu.Unlock()
	// A failure that comes back at once after a write that worked (a
	// rotation failing while appends work, a card failing now and then)
	// is said once per 10 s, not at each flush, unless its errno is new.
	var e1, e2 syscall.Errno
	newErrno := j.loggedErr == nil || !errors.As(j.loggedErr, &e1) || !errors.As(err, &e2) || e1 != e2
	if (was == nil || newErrno) && (newErrno || time.Since(j.lastErrLog) >= 10*time.Second) {
		j.loggedErr, j.lastErrLog, j.errSaid = err, time.Now(), true
		j.log.Error("audit: event log write failed; events are still counted but will be missing after a restart",
			LogError, err, "lost_events", j.writeFailed.Load())
	}
}

// rotate closes the current file under a rotated name and opens a new one;
// the oldest rotated files beyond MaxFiles are folded into the summary
// and deleted in the background (fold).
func (j *Journal) rotate() {
	j.rotMu.Lock()
	defer j.rotMu.Unlock()
	if err := j.f.Sync(); err != nil {
		j.failed(err)
	}
	cur := filepath.Join(j.cfg.Dir, CurrentLog)
	// The name says when the file ended, and orders it: it is never
	// before a record in the log or an earlier file's name. The clock
	// alone may be behind them: a gateway without a real-time clock
	// restarted at 1970 before NTP set it, with a log of real times. A
	// file named 1970 would sort first, so be the first deleted beyond
	// MaxFiles (the newest events lost), and a report --since would skip
	// it, with the real-time events it holds from before the restart.
	end := j.clock().UTC()
	if !j.newest.IsZero() && !end.After(j.newest) {
		end = j.newest.UTC().Add(time.Nanosecond)
	}
	// A taken name (a file put there since the start) moves the end on
	// by a nanosecond: a suffix would sort before the name it extends.
	name := filepath.Join(j.cfg.Dir, rotatedPrefix+end.Format(rotateStamp)+rotatedSuffix)
	// Any error but "exists" ends the search (EIO on a failing card): the
	// rename then fails or succeeds on its own, and the writer goes on.
	for i := 0; ; i++ {
		if _, err := os.Lstat(name); err != nil {
			if _, err := os.Lstat(name + gzSuffix); err != nil {
				break
			}
		}
		if i == 1<<16 {
			j.failed(fmt.Errorf("rotate: %s and the %d names after it are taken", name, i))
			return
		}
		end = end.Add(time.Nanosecond)
		name = filepath.Join(j.cfg.Dir, rotatedPrefix+end.Format(rotateStamp)+rotatedSuffix)
	}
	j.newest = end
	if err := os.Rename(cur, name); err != nil {
		j.failed(err)
		return
	}
	j.f.Close()
	f, err := os.OpenFile(cur, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o640)
	if err != nil {
		// The next flush tries again (openCurrent): a full disk or no
		// free descriptor must not end the log until a restart.
		// Said here (failed): the retries fail with the same errno,
		// which failed takes for the failure already said.
		j.f, j.reopen = nil, true
		j.failed(fmt.Errorf("rotate: %w", err))
		return
	}
	j.f, j.size = f, 0
	j.folds.Add(1)
	go j.fold()
}

// saw notes a time recorded in the log, for rotate. It compares wall
// times: an event stamped by time.Now carries a monotonic reading, and two
// such times compare by it, so after the clock was set back an event
// years earlier by the wall clock would count as newer than the records
// before it, and name the file before them.
func (j *Journal) saw(t time.Time) {
	t = t.Round(0) // the wall time alone
	if t.After(j.newest) {
		j.newest = t
	}
}

func (j *Journal) clock() time.Time {
	if j.now != nil {
		return j.now()
	}
	return time.Now()
}

// openCurrent opens the current file for appending after a rotation, the
// open at the start or a write on a read-only filesystem could not. The
// error is the open's as it is (the path and the errno).
func (j *Journal) openCurrent() error {
	if j.mkdir {
		// The state directory could not be made at the open.
		if err := os.MkdirAll(j.cfg.Dir, 0o750); err != nil {
			return err
		}
		j.mkdir = false
	}
	cur := filepath.Join(j.cfg.Dir, CurrentLog)
	f, err := os.OpenFile(cur, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o640)
	if err != nil {
		return err
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return err
	}
	j.f, j.size, j.reopen = f, fi.Size(), false
	// The file may end in a partial line (a write cut short before the
	// failure): the next line starts on a line of its own (flush).
	j.torn = endsTorn(cur, j.size)
	return nil
}

// RegisterMetrics registers the journal's metrics on reg:
// egress_audit_events_shed_total, egress_audit_events_written_total,
// egress_audit_events_summarized_total,
// egress_audit_decision_lines_summarized_total,
// egress_audit_write_failed_events_total, egress_audit_queue_length,
// egress_audit_summary_pending_files and
// egress_audit_summary_lost_files_total.
func (j *Journal) RegisterMetrics(reg prometheus.Registerer) error {
	cs := []prometheus.Collector{
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Namespace: "egress", Subsystem: "audit", Name: "events_shed_total",
			Help: "Events dropped because the event log could not keep up (they are in no count).",
		}, func() float64 { return float64(j.shed.Load()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Namespace: "egress", Subsystem: "audit", Name: "events_written_total",
			Help: "Events written to the event log.",
		}, func() float64 { return float64(j.written.Load()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Namespace: "egress", Subsystem: "audit", Name: "decision_lines_summarized_total",
			Help: "Decision log lines of denials past a device's detail budget, counted into a summary line instead of logged one by one.",
		}, func() float64 { return float64(j.quieted.Load()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Namespace: "egress", Subsystem: "audit", Name: "events_summarized_total",
			Help: "Denied events past a device's detail budget, counted into a summary record instead of written one by one (in every count).",
		}, func() float64 { return float64(j.summarized.Load()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Namespace: "egress", Subsystem: "audit", Name: "write_failed_events_total",
			Help: "Events counted but lost to event log write errors (missing after a restart).",
		}, func() float64 { return float64(j.writeFailed.Load()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Namespace: "egress", Subsystem: "audit", Name: "queue_length",
			Help: "Events waiting for the event log writer.",
		}, func() float64 { return float64(j.queued.Load()) }),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Namespace: "egress", Subsystem: "audit", Name: "summary_pending_files",
			Help: "Rotated event log files kept past the limit because the summary of rotated-out files could not be written (at most 2).",
		}, func() float64 { return float64(j.unfolded.Load()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Namespace: "egress", Subsystem: "audit", Name: "summary_lost_files_total",
			Help: "Rotated event log files deleted without their counts in the summary (it could not be written and more than 2 waited, or a newer egressd's is left in place).",
		}, func() float64 { return float64(j.lost.Load()) }),
	}
	for _, c := range cs {
		if err := reg.Register(c); err != nil {
			return fmt.Errorf("audit: register metrics: %w", err)
		}
	}
	return nil
}

func jsonEncode(w io.Writer, ev Event) error {
	return json.NewEncoder(w).Encode(ev)
}

// readPath reads a state directory's event log (not its summary of
// rotated-out files: the summary, if any, is returned), or one events
// file.
func readPath(path string, fn func(Event)) (LoadStats, *archive, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return LoadStats{}, nil, fmt.Errorf("audit: %w", err)
	}
	log := slog.New(slog.DiscardHandler)
	if fi.IsDir() {
		a, _, _ := loadArchive(path, log, false)
		skip := ""
		if a != nil {
			skip = a.LastFile
		}
		st, err := readDir(path, log, time.Time{}, false, skip, fn)
		return st, a, err
	}
	var st LoadStats
	err = readFile(path, log, false, &st, fn)
	if errors.As(err, new(damagedError)) {
		// As in a directory (readDir): the events before the damage
		// count, and the file is counted damaged.
		st.Damaged, err = 1, nil
	}
	st.Files = 1
	return st, nil, err
}
