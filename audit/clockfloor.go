package audit

import (
	"runtime/debug"
	"sync"
	"time"
)

// SourceFloor is a date before which no egressd event can have happened:
// it is earlier than this source. A time before it comes from a clock that
// was wrong, as on a gateway without a real-time clock (a Raspberry Pi)
// that starts at 1970 and runs until NTP sets its clock. It may be moved
// on at a release; a date too early only catches less.
var SourceFloor = time.Date(2025, 12, 1, 0, 0, 0, 0, time.UTC)

// BuildFloor returns the earliest time a correct clock can show to this
// binary: the later of SourceFloor and the time of the commit it was built
// from (vcs.time, when the build recorded it). Unlike SourceFloor it says
// nothing of times recorded by an older binary.
var BuildFloor = sync.OnceValue(func() time.Time {
	f := SourceFloor
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			if s.Key == "vcs.time" {
				if t, err := time.Parse(time.RFC3339, s.Value); err == nil && t.After(f) {
					f = t
				}
			}
		}
	}
	return f
})
