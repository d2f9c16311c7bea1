package main

import (
	"context"
	"fmt"
	"io"

	"egressd/policy"
	"egressd/profiles"
)

func init() {
	commands["profiles"] = command{"profiles [show NAME]", "list the embedded policies, or print one", cmdProfiles}
}

func cmdProfiles(_ context.Context, args []string, stdout, stderr io.Writer) int {
	for _, a := range args {
		if a == "-h" || a == "-help" || a == "--help" {
			fmt.Fprintln(stdout, "usage: egressd "+commands["profiles"].usage)
			return exitOK
		}
	}
	switch {
	case len(args) == 0 || args[0] == "list":
		for _, n := range profiles.Names() {
			src, _ := profiles.Get(n)
			desc := ""
			if p, err := policy.Parse(profiles.File(n), src); err == nil {
				desc = fmt.Sprintf("%d rules, mode %s", len(p.Rules), p.Mode)
			}
			def := ""
			if n == profiles.Default {
				def = " (default)"
			}
			fmt.Fprintf(stdout, "%s%s\t%s\n", n, def, desc)
		}
		return exitOK
	case args[0] == "show" && len(args) == 2:
		src, err := profiles.Get(args[1])
		if err != nil {
			fmt.Fprintln(stderr, "egressd:", err)
			return exitFail
		}
		stdout.Write(src)
		return exitOK
	}
	fmt.Fprintln(stderr, "usage: egressd "+commands["profiles"].usage)
	return exitUsage
}
