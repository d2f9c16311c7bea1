package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"syscall"

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
	_, certPEM, err := proxy.LoadOrCreateCA(*stateDir)
	if err == nil {
		err = caToDirOwner(*stateDir)
	}
	if err != nil {
		fmt.Fprintln(stderr, "egressd:", err)
		return exitFail
	}
	stdout.Write(certPEM)
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
		path := filepath.Join(dir, f)
		// Only a plain file of root's with one name: the directory's
		// owner can put anything under these names, and root must not
		// hand over a file of its own that a hard link there points at.
		fi, err := os.Lstat(path)
		if err != nil {
			return fmt.Errorf("ca: %w", err)
		}
		st, ok := fi.Sys().(*syscall.Stat_t)
		if !ok || st.Uid == owner.Uid {
			continue
		}
		if !fi.Mode().IsRegular() || st.Nlink != 1 || st.Uid != 0 {
			return fmt.Errorf("ca: %s is not a file root made: not giving it to the state directory's owner", path)
		}
		if caChownHook != nil {
			caChownHook(path)
		}
		if err := os.Lchown(path, int(owner.Uid), int(owner.Gid)); err != nil {
			return fmt.Errorf("ca: give %s to the state directory's owner: %w", f, err)
		}
	}
	return nil
}
