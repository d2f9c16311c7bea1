package main

import (
	"go/build"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestNoTestHookInBinary: egressd's own build (no build tags) reads no
// test hook from its environment: the e2e tests' way to fail the fast
// path's queue reader (EGRESSD_TEST_BREAK_FAST_QUEUE) and nfq.Conn.Break,
// and to have proxy.New refuse its configuration
// (EGRESSD_TEST_BREAK_PROXY_CONFIG), are only in a build with the tag
// egressd_e2e. Before, run.go read the
// variable in every build, and nfq.Conn.Break was egressd's.
func TestNoTestHookInBinary(t *testing.T) {
	for _, dir := range []string{".", "../../internal/nfq"} {
		pkg, err := build.Default.ImportDir(dir, 0)
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range pkg.GoFiles {
			src, err := os.ReadFile(filepath.Join(dir, f))
			if err != nil {
				t.Fatal(err)
			}
			for _, hook := range []string{"EGRESSD_TEST_", "func (c *Conn) Break("} {
				if strings.Contains(string(src), hook) {
					t.Errorf("%s, in egressd's own build, has the test hook %q", filepath.Join(dir, f), hook)
				}
			}
		}
	}
	// The e2e build has them (else TestFastPathQueueFails and
	// TestFastPathProxyFails break nothing).
	ctx := build.Default
	ctx.BuildTags = append(ctx.BuildTags, "egressd_e2e")
	pkg, err := ctx.ImportDir(".", 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, hook := range []string{"EGRESSD_TEST_BREAK_FAST_QUEUE", "EGRESSD_TEST_BREAK_PROXY_CONFIG"} {
		found := false
		for _, f := range pkg.GoFiles {
			src, _ := os.ReadFile(f)
			found = found || strings.Contains(string(src), hook)
		}
		if !found {
			t.Errorf("the build with the tag egressd_e2e has no %s hook", hook)
		}
	}
}
