package main

import (
	"context"
	"encoding/pem"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"egressd/proxy"
)

func init() {
	commands["ca"] = command{"ca export [--state-dir DIR]",
		"print the inspection CA certificate (PEM) for clients to trust; generated on first use", cmdCA}
}

// cmdCA prints the certificate of the CA the proxy signs inspected
// connections with, creating the CA in the state directory when it does
// not exist yet (the same files the proxy loads).
func cmdCA(_ context.Context, args []string, stdout, stderr io.Writer) int {
	fs := newFlags("ca export", stderr)
	stateDir := fs.String("state-dir", defaultStateDir, "the daemon's state directory, where the CA lives")
	pos, err := parseArgs(fs, args)
	if err != nil {
		return flagErr(err)
	}
	if len(pos) != 1 || pos[0] != "export" {
		fmt.Fprintln(stderr, "usage: egressd "+commands["ca"].usage)
		return exitUsage
	}
	if *stateDir == "" {
		// "" would be the working directory's files, which no egressd
		// run with --inspect loads (it refuses --state-dir "").
		fmt.Fprintln(stderr, `egressd ca export: --state-dir "": the inspection CA needs a state directory`)
		return exitUsage
	}
	ca, _, err := proxy.LoadOrCreateCA(*stateDir)
	if err == nil {
		err = caToDirOwner(*stateDir)
	}
	if err != nil {
		fmt.Fprintln(stderr, "egressd:", err)
		return exitFail
	}
	// Printed all the same: it is the CA clients trust, or will once the
	// clock is right.
	if problem := proxy.CAClockProblem(ca, time.Now()); problem != "" {
		fmt.Fprintln(stderr, "egressd: warning:", problem)
	}
	// The certificates as parsed, not the file as read: the file is the
	// state directory owner's to fill, or to link to one of root's that
	// holds a key beside its certificate, and what this prints goes to
	// every client.
	for _, der := range ca.Certificate {
		stdout.Write(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
	}
	return exitOK
}

// caChownHook, for tests, is called between the checks of a CA file and
// its chown: where the state directory's owner may swap the file.
var caChownHook func(path string)

// caToDirOwner gives the CA's files to the state directory's owner when
// root ran the export: under dist/egressd.service the directory is the
// service's dynamic user's, and a key root made there is one the daemon
// cannot read (every inspected connection would fail).
func caToDirOwner(dir string) error {
	if os.Geteuid() != 0 {
		return nil
	}
	st, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("ca: state directory: %w", err)
	}
	owner, ok := st.Sys().(*syscall.Stat_t)
	if !ok || owner.Uid == 0 {
		return nil
	}
	for _, f := range []string{proxy.CACertFile, proxy.CAKeyFile} {
		if err := fileToOwner(filepath.Join(dir, f), owner.Uid, owner.Gid); err != nil {
			return err
		}
	}
	return nil
}

// fileToOwner gives the file at path to uid:gid, if it is a plain file of
// root's with one name. The directory's owner can put anything under
// that name, and swap it at any time: the file is opened once, without
// following a symbolic link, and checked and given away through that
// descriptor, so root never hands over a file of its own that a hard
// link there points at. One the owner has already is left as it is.
func fileToOwner(path string, uid, gid uint32) error {
	fd, err := unix.Open(path, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("ca: %s: %w", path, err)
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("ca: %s: %w", path, err)
	}
	if st.Uid == uid {
		return nil
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG || st.Nlink != 1 || st.Uid != 0 {
		return fmt.Errorf("ca: %s is not a file root made: not giving it to the state directory's owner", path)
	}
	if caChownHook != nil {
		caChownHook(path)
	}
	if err := unix.Fchownat(fd, "", int(uid), int(gid), unix.AT_EMPTY_PATH); err != nil {
		return fmt.Errorf("ca: give %s to the state directory's owner: %w", filepath.Base(path), err)
	}
	return nil
}
