package audit

import (
	"bufio"
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"egressd/internal/atomicfile"
)

// compressRotated gzips each plain rotated file not yet in the summary,
// oldest first (fold calls it, in the background: the writer only renamed
// the file). A file it cannot compress (a full disk) stays plain, with an
// error line, and is read and folded as it is; the next rotation tries
// again. It returns false when one could not be compressed.
func (j *Journal) compressRotated() bool {
	files, err := LogFiles(j.cfg.Dir)
	if err != nil {
		return false
	}
	j.rotMu.RLock()
	last := j.archLast
	j.rotMu.RUnlock()
	for _, f := range files {
		n := filepath.Base(f)
		if n == CurrentLog || strings.HasSuffix(n, gzSuffix) || (last != "" && n <= last) {
			continue
		}
		if err := j.compressFile(f); err != nil {
			j.log.Error("audit: could not compress a rotated event log file; kept it plain, the next rotation tries again",
				"file", n, LogError, err)
			return false
		}
	}
	return true
}

// compressFile writes path's gzipped copy as path.gz (atomicfile: a
// temporary file, synced, renamed, the directory synced), then removes
// path. A crash at any point leaves the plain file (and perhaps a
// temporary one, removeCompressTemps), or both whole forms (LogFiles
// lists the pair once): nothing is lost, and the next start does it
// again.
func (j *Journal) compressFile(path string) error {
	in, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("audit: compress: %w", err)
	}
	defer in.Close()
	err = atomicfile.Write(path+gzSuffix, 0o640, atomicfile.Replace, func(w io.Writer) error {
		bw := bufio.NewWriterSize(w, 256<<10)
		zw, _ := gzip.NewWriterLevel(bw, gzip.BestSpeed)
		zw.Name = filepath.Base(path)
		if _, err := io.Copy(zw, bufio.NewReaderSize(in, 256<<10)); err != nil {
			return err
		}
		if err := zw.Close(); err != nil {
			return err
		}
		return bw.Flush()
	})
	if err != nil {
		return fmt.Errorf("audit: compress %s: %w", filepath.Base(path), err)
	}
	// Under rotMu: a windowed report's scan that listed the plain file
	// reads it whole, or finds it gone and reads the compressed one.
	j.rotMu.Lock()
	err = os.Remove(path)
	j.rotMu.Unlock()
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("audit: compress: remove the plain file: %w", err)
	}
	return nil
}

// removeCompressTemps removes the temporary files of compressions a
// crash interrupted: beside a rotated file still plain, which is
// compressed again.
func removeCompressTemps(dir string) {
	files, err := LogFiles(dir)
	if err != nil {
		return
	}
	for _, f := range files {
		if !strings.HasSuffix(f, gzSuffix) {
			atomicfile.RemoveTemps(f + gzSuffix)
		}
	}
}
