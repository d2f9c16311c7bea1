package main

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"strings"
)

// loadProxyUsers reads the users of the explicit proxy (--proxy-users): one
// "NAME:sha256:HEX" line per user, HEX the SHA-256 digest of the password
// (printf %s 'PASSWORD' | sha256sum), blank lines and lines starting with
// # ignored. The file must not be readable by group or others. Every
// problem is reported, with its line.
func loadProxyUsers(path string) (map[string][sha256.Size]byte, error) {
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
	users := map[string][sha256.Size]byte{}
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
			bad("expected NAME:sha256:HEX (a name without spaces or colons)")
			continue
		}
		hexDigest, ok := strings.CutPrefix(rest, "sha256:")
		if !ok {
			bad("user %q: expected sha256:HEX after the name (printf %%s 'PASSWORD' | sha256sum)", name)
			continue
		}
		d, err := hex.DecodeString(hexDigest)
		if err != nil || len(d) != sha256.Size {
			bad("user %q: the digest is not 64 hex digits", name)
			continue
		}
		if _, dup := users[name]; dup {
			bad("user %q given twice", name)
			continue
		}
		users[name] = [sha256.Size]byte(d)
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
