package sdnotify

import (
	"net"
	"path/filepath"
	"strings"
	"testing"
)

func TestNotify(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "")
	if ok, err := Notify(Ready); ok || err != nil {
		t.Fatalf("without a socket: %v %v", ok, err)
	}
	path := filepath.Join(t.TempDir(), "notify")
	ln, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	t.Setenv("NOTIFY_SOCKET", path)
	for _, st := range []string{Ready, Reloading, Stopping} {
		if ok, err := Notify(st); !ok || err != nil {
			t.Fatalf("%s: %v %v", st, ok, err)
		}
		buf := make([]byte, 256)
		n, err := ln.Read(buf)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.HasPrefix(string(buf[:n]), st) {
			t.Fatalf("got %q, want %q", buf[:n], st)
		}
		if st == Reloading && !strings.Contains(string(buf[:n]), "MONOTONIC_USEC=") {
			t.Fatalf("RELOADING without MONOTONIC_USEC: %q", buf[:n])
		}
	}
}
