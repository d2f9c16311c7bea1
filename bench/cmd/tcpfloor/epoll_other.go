//go:build !linux

package main

import (
	"errors"
	"net/netip"
)

var errLinux = errors.New("tcpfloor needs Linux (REDIRECT, SO_ORIGINAL_DST)")

func origDst(int) (netip.AddrPort, error) { return netip.AddrPort{}, errLinux }

func deferAccept(int) error { return errLinux }

func serveEpoll(int, []byte) error { return errLinux }

func serveHybrid(int, []byte) error { return errLinux }
