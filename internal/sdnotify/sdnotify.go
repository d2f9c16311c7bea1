// Package sdnotify tells systemd about the daemon's state (Type=notify):
// READY=1 when serving, RELOADING=1 around a reload, STOPPING=1 on the way
// out. Without $NOTIFY_SOCKET it does nothing.
package sdnotify

import (
	"fmt"
	"net"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// The states.
const (
	Ready     = "READY=1"
	Stopping  = "STOPPING=1"
	Reloading = "RELOADING=1"
)

// Notify sends state to systemd. It reports false, nil when there is no
// $NOTIFY_SOCKET.
func Notify(state string) (bool, error) {
	path := os.Getenv("NOTIFY_SOCKET")
	if path == "" {
		return false, nil
	}
	if path[0] == '@' {
		path = "\x00" + path[1:]
	}
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return false, fmt.Errorf("sdnotify: %w", err)
	}
	defer c.Close()
	if state == Reloading {
		// systemd ≥ 253 wants the monotonic time with RELOADING=1.
		var ts unix.Timespec
		unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
		state += fmt.Sprintf("\nMONOTONIC_USEC=%d", ts.Nano()/int64(time.Microsecond))
	}
	if _, err := c.Write([]byte(state)); err != nil {
		return false, fmt.Errorf("sdnotify: %w", err)
	}
	return true, nil
}
