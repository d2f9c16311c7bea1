package netns_test

import (
	"os"
	"runtime"
	"testing"

	"golang.org/x/sys/unix"

	"egressd/internal/netns"
	"egressd/internal/testnet"
)

// TestDoOwnThread: Do runs its function on another thread than
// the caller's, in the namespace asked, and leaves the caller's thread
// in its own namespace.
func TestDoOwnThread(t *testing.T) {
	testnet.RequireRoot(t)
	ns := testnet.New(t, "ctt")
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	self := func() string {
		l, err := os.Readlink("/proc/thread-self/ns/net")
		if err != nil {
			t.Fatal(err)
		}
		return l
	}
	home, tid := self(), unix.Gettid()
	var inside string
	var itid int
	if err := netns.Do("/var/run/netns/"+ns.Name, func() error {
		inside, itid = self(), unix.Gettid()
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if itid == tid {
		t.Error("the function ran on the caller's thread")
	}
	if inside == home {
		t.Errorf("the function ran in the caller's namespace %s", home)
	}
	if now := self(); now != home {
		t.Errorf("the caller's thread is in %s after, was in %s", now, home)
	}
	if err := netns.Do("/var/run/netns/no-such-ns-egressd", func() error { return nil }); err == nil {
		t.Error("no error for a namespace that does not exist")
	}
}

// TestDoPanic: a panic in the function reaches the caller, and the next
// Do still runs in the namespace asked.
func TestDoPanic(t *testing.T) {
	testnet.RequireRoot(t)
	ns := testnet.New(t, "ctp")
	home, err := os.Readlink("/proc/thread-self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	func() {
		defer func() {
			if p := recover(); p != "boom" {
				t.Errorf("recovered %v, want boom", p)
			}
		}()
		netns.Do("/var/run/netns/"+ns.Name, func() error { panic("boom") })
		t.Error("no panic")
	}()
	var inside string
	if err := netns.Do("/var/run/netns/"+ns.Name, func() (err error) {
		inside, err = os.Readlink("/proc/thread-self/ns/net")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if inside == home {
		t.Error("after a panic, Do ran in the caller's namespace")
	}
}
