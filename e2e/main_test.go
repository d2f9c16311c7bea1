package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"
)

// egressdBin is the egressd binary TestMain builds once for every test.
var egressdBin string

func TestMain(m *testing.M) {
	// The test binary re-executed as a server in a namespace of the
	// topology (startEchoOrigin): it serves and never runs the tests.
	if addr := os.Getenv(echoOriginEnv); addr != "" {
		os.Exit(echoOriginMain(addr))
	}
	// Without root the tests skip (testnet.RequireRoot), so there is
	// nothing to build; as root, and in CI, build the real binary.
	if os.Geteuid() != 0 && os.Getenv("CI") == "" {
		os.Exit(m.Run())
	}
	dir, err := os.MkdirTemp("", "egressd-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e:", err)
		os.Exit(1)
	}
	egressdBin = filepath.Join(dir, "egressd")
	gobin := filepath.Join(runtime.GOROOT(), "bin", "go")
	if _, err := os.Stat(gobin); err != nil {
		gobin = "go"
	}
	out, err := exec.Command(gobin, "build", "-tags", "egressd_e2e", "-o", egressdBin, "egressd/cmd/egressd").CombinedOutput()
	if err != nil {
		// Once more: a build cache shared with concurrent builds (go test
		// ./... builds packages in parallel) can fail a build spuriously.
		out, err = exec.Command(gobin, "build", "-tags", "egressd_e2e", "-o", egressdBin, "egressd/cmd/egressd").CombinedOutput()
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "e2e: go build egressd: %v\n%s", err, out)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}
