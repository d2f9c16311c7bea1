package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"maps"
	"os"
	"slices"
	"strings"

	"egressd/proxy"
)

func init() {
	commands["proxy-users"] = command{"proxy-users hash [--cost N] NAME",
		"print a --proxy-users line (NAME:bcrypt:HASH) for the password read from standard input", cmdProxyUsers}
}

// loadProxyUsers reads the users of the explicit proxy (--proxy-users): one
// "NAME:bcrypt:HASH" line per user (egressd proxy-users hash NAME; HASH as
// htpasswd -B writes it too), or "NAME:sha256:HEX", HEX the unsalted
// SHA-256 digest of the password (printf %s 'PASSWORD' | sha256sum), the
// only form before bcrypt; blank lines and lines starting with # ignored.
// The file must not be readable by group or others. Every problem is
// reported, with its line.
func loadProxyUsers(path string) (map[string]proxy.UserSecret, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("--proxy-users: %w", err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("--proxy-users: %s is readable or writable by group or others (mode %04o); chmod 600 it", path, fi.Mode().Perm())
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("--proxy-users: %w", err)
	}
	return parseProxyUsers(path, b)
}

// parseProxyUsers parses the text of a --proxy-users file (loadProxyUsers);
// path names it in the errors.
func parseProxyUsers(path string, b []byte) (map[string]proxy.UserSecret, error) {
	users := map[string]proxy.UserSecret{}
	var errs []error
	sc := bufio.NewScanner(bytes.NewReader(b))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		bad := func(format string, a ...any) {
			errs = append(errs, fmt.Errorf("--proxy-users: %s:%d: %s", path, n, fmt.Sprintf(format, a...)))
		}
		name, rest, ok := strings.Cut(line, ":")
		if !ok || name == "" || strings.ContainsAny(name, " \t") {
			bad("expected NAME:bcrypt:HASH or NAME:sha256:HEX (a name without spaces or colons)")
			continue
		}
		var secret proxy.UserSecret
		scheme, value, _ := strings.Cut(rest, ":")
		switch scheme {
		case "bcrypt":
			s, err := proxy.BcryptSecret(value)
			if err != nil {
				if e := errors.Unwrap(err); e != nil {
					err = e
				}
				bad("user %q: %v (egressd proxy-users hash %s writes the line)", name, err, name)
				continue
			}
			secret = s
		case "sha256":
			d, err := hex.DecodeString(value)
			if err != nil || len(d) != sha256.Size {
				bad("user %q: the digest is not 64 hex digits", name)
				continue
			}
			secret = proxy.SHA256Secret([sha256.Size]byte(d))
		default:
			bad("user %q: expected bcrypt:HASH (egressd proxy-users hash %s) or sha256:HEX after the name", name, name)
			continue
		}
		if _, dup := users[name]; dup {
			bad("user %q given twice", name)
			continue
		}
		users[name] = secret
	}
	if err := sc.Err(); err != nil {
		errs = append(errs, fmt.Errorf("--proxy-users: %s: %w", path, err))
	}
	if len(errs) == 0 && len(users) == 0 {
		errs = append(errs, fmt.Errorf("--proxy-users: %s names no user (the proxy would be open to anyone)", path))
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return users, nil
}

// formatProxyUsers writes users as a --proxy-users file, one line each,
// sorted by name: what parseProxyUsers reads back.
func formatProxyUsers(users map[string]proxy.UserSecret) []byte {
	var b bytes.Buffer
	for _, n := range slices.Sorted(maps.Keys(users)) {
		fmt.Fprintf(&b, "%s:%s\n", n, users[n].Line())
	}
	return b.Bytes()
}

// unsaltedUsers are the names, sorted, of the users given by an unsalted
// SHA-256 digest.
func unsaltedUsers(users map[string]proxy.UserSecret) []string {
	var names []string
	for n, s := range users {
		if !s.Salted() {
			names = append(names, n)
		}
	}
	slices.Sort(names)
	return names
}

// cmdProxyUsers is `egressd proxy-users hash NAME`: it reads a password
// from standard input (its first line, without the line end; no echo is
// turned off: pipe it or type it in a terminal you trust) and prints the
// NAME:bcrypt:HASH line for the --proxy-users file.
func cmdProxyUsers(_ context.Context, args []string, stdout, stderr io.Writer) int {
	return proxyUsersHash(args, os.Stdin, stdout, stderr)
}

func proxyUsersHash(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	fs := newFlags("proxy-users hash", stderr)
	cost := fs.Int("cost", proxy.DefaultBcryptCost, fmt.Sprintf("bcrypt cost, %d..%d (each step doubles the time of a check)", proxy.MinBcryptCost, proxy.MaxBcryptCost))
	pos, err := parseArgs(fs, args)
	if err != nil {
		return flagErr(err)
	}
	if len(pos) != 2 || pos[0] != "hash" {
		fmt.Fprintln(stderr, "usage: egressd "+commands["proxy-users"].usage)
		return exitUsage
	}
	name := pos[1]
	if name == "" || strings.ContainsAny(name, ": \t\r\n") || strings.HasPrefix(name, "#") {
		fmt.Fprintf(stderr, "egressd: proxy-users hash: the name %q is empty, starts with # or has a colon or a space\n", name)
		return exitUsage
	}
	if *cost < proxy.MinBcryptCost || *cost > proxy.MaxBcryptCost {
		fmt.Fprintf(stderr, "egressd: proxy-users hash: --cost %d is outside %d..%d\n", *cost, proxy.MinBcryptCost, proxy.MaxBcryptCost)
		return exitUsage
	}
	// One line, at most 72 bytes (bcrypt's limit) plus its end: read a
	// little more to tell a longer one.
	line, err := bufio.NewReaderSize(io.LimitReader(stdin, 4096), 4096).ReadString('\n')
	if err != nil && !errors.Is(err, io.EOF) {
		fmt.Fprintln(stderr, "egressd: proxy-users hash: reading the password:", err)
		return exitFail
	}
	pass := strings.TrimSuffix(strings.TrimSuffix(line, "\n"), "\r")
	if pass == "" {
		fmt.Fprintln(stderr, "egressd: proxy-users hash: no password on standard input")
		return exitFail
	}
	h, err := proxy.HashPassword([]byte(pass), *cost)
	if err != nil {
		fmt.Fprintln(stderr, "egressd: proxy-users hash:", err)
		return exitFail
	}
	fmt.Fprintf(stdout, "%s:bcrypt:%s\n", name, h)
	return exitOK
}
