//go:build !linux

package main

import "errors"

func runRaw(string) error { return errors.New("raw mode is Linux only") }
