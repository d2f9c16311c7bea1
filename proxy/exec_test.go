package proxy

import "os/exec"

func execLookPath(s string) (string, error) { return exec.LookPath(s) }
