package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime/debug"
	"sort"
	"strings"
)

// Exit codes.
const (
	exitOK      = 0
	exitFail    = 1 // the command ran and the answer is "no" (invalid policy) or it failed
	exitUsage   = 2 // the command line is wrong
	exitUnknown = 2
)

// version is set with -ldflags "-X main.version=...".
var version = "dev"

// command is one subcommand. Handlers return an exit code; they print their
// own errors to stderr.
type command struct {
	usage string
	help  string
	run   func(ctx context.Context, args []string, stdout, stderr io.Writer) int
}

// commands is the table of subcommands. Each command's file registers it
// in an init function, so that adding one touches only its own file.
var commands = map[string]command{}

func init() {
	commands["version"] = command{"version", "print the version and build information", cmdVersion}
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		if c, ok := commands["run"]; ok {
			return c.run(ctx, nil, stdout, stderr)
		}
		usage(stderr)
		return exitUsage
	}
	switch args[0] {
	case "-h", "-help", "--help", "help":
		usage(stdout)
		return exitOK
	case "-version", "--version":
		return cmdVersion(ctx, nil, stdout, stderr)
	}
	c, ok := commands[args[0]]
	if !ok {
		fmt.Fprintf(stderr, "egressd: unknown command %q\n", args[0])
		usage(stderr)
		return exitUnknown
	}
	return c.run(ctx, args[1:], stdout, stderr)
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "usage: egressd COMMAND [ARGS]")
	fmt.Fprintln(w)
	names := make([]string, 0, len(commands))
	for n := range commands {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(w, "  egressd %s\n      %s\n", commands[n].usage, commands[n].help)
	}
}

// parseArgs parses flags that may come before or after positional
// arguments ("egressd policy check FILE --json" and "--json FILE" alike).
// -h prints the flags; a flag error prints one line prefixed with the
// command ("egressd run: flag provided but not defined: -x"), not the
// flag package's bare message followed by every flag.
func parseArgs(fs *flag.FlagSet, args []string) ([]string, error) {
	out := fs.Output()
	fs.SetOutput(io.Discard)
	defer fs.SetOutput(out)
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			fs.SetOutput(out)
			if errors.Is(err, flag.ErrHelp) {
				fmt.Fprintf(out, "usage of %s:\n", fs.Name())
				fs.PrintDefaults()
			} else {
				fmt.Fprintf(out, "%s: %v (%s -h lists the flags)\n", fs.Name(), err, fs.Name())
			}
			return nil, err
		}
		rest := fs.Args()
		if len(rest) == 0 {
			return pos, nil
		}
		if rest[0] == "--" {
			return append(pos, rest[1:]...), nil
		}
		pos = append(pos, rest[0])
		args = rest[1:]
	}
}

// given reports whether the flag name of fs was set on the command line
// (not left at its default).
func given(fs *flag.FlagSet, name string) bool {
	set := false
	fs.Visit(func(f *flag.Flag) { set = set || f.Name == name })
	return set
}

// exclusive reports, on stderr, the first pair of flags of fs that were
// both given though they exclude each other; false when there is none.
func exclusive(fs *flag.FlagSet, stderr io.Writer, pairs ...[2]string) bool {
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	for _, p := range pairs {
		if set[p[0]] && set[p[1]] {
			fmt.Fprintf(stderr, "%s: --%s and --%s exclude each other\n", fs.Name(), p[0], p[1])
			return true
		}
	}
	return false
}

// newFlags returns a flag set that prints its usage to stderr and returns
// errors instead of exiting.
func newFlags(name string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet("egressd "+name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	return fs
}

// flagErr turns a parse error into an exit code (help is not an error).
func flagErr(err error) int {
	if errors.Is(err, flag.ErrHelp) {
		return exitOK
	}
	return exitUsage
}

func cmdVersion(_ context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 1 && (args[0] == "-h" || args[0] == "-help" || args[0] == "--help") {
		fmt.Fprintln(stdout, "usage: egressd version")
		return exitOK
	}
	if len(args) > 0 {
		// As every command: a malformed command line is exit 2.
		fmt.Fprintf(stderr, "egressd version: takes no arguments, got %q\nusage: egressd version\n", args)
		return exitUsage
	}
	fmt.Fprintf(stdout, "egressd %s\n", version)
	if bi, ok := debug.ReadBuildInfo(); ok {
		fmt.Fprintf(stdout, "go %s\n", bi.GoVersion)
		for _, s := range bi.Settings {
			if strings.HasPrefix(s.Key, "vcs.") || s.Key == "CGO_ENABLED" {
				fmt.Fprintf(stdout, "%s %s\n", s.Key, s.Value)
			}
		}
	}
	return exitOK
}

// readPolicySource reads a policy file, or "-" for standard input.
func readPolicySource(path string) ([]byte, error) {
	if path == "-" {
		return io.ReadAll(os.Stdin)
	}
	return os.ReadFile(path)
}
