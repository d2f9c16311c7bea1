package firewall

import (
	"sync"
	"testing"
	"time"
)

// TestRuleExpiryTimerFollowsWallClock: the re-render at a rule's expiry
// waits on a timer, which counts real (monotonic) time, while the expiry
// is a wall-clock date. On a gateway without a real-time clock, started
// at 1970, a rule that expires next week armed a timer of 56 years; when
// NTP then set the clock forward, the rule stayed in the kernel's ruleset
// past its expiry for as long as the step (a step of three days from a
// fake-hwclock's saved time: three days too long). The timer must wake at
// least every minute and look at the clock: re-arm while the expiry is
// ahead by the wall clock, re-render once it is not.
func TestRuleExpiryTimerFollowsWallClock(t *testing.T) {
	var mu sync.Mutex
	clock := time.Unix(1000, 0) // 1970: before NTP
	f, err := New(Config{}, Deps{Now: func() time.Time { mu.Lock(); defer mu.Unlock(); return clock }})
	if err != nil {
		t.Fatal(err)
	}
	var delays []time.Duration
	var fire []func()
	f.afterFunc = func(d time.Duration, fn func()) *time.Timer {
		delays, fire = append(delays, d), append(fire, fn)
		return time.NewTimer(time.Hour) // stopped by the next schedule; never fires here
	}
	expires := time.Date(2026, 12, 12, 0, 0, 0, 0, time.UTC)
	f.mu.Lock()
	f.rs = &Ruleset{}
	f.scheduleLocked(expires, f.now())
	f.mu.Unlock()
	if len(delays) != 1 || delays[0] > time.Minute {
		t.Fatalf("armed %v, want one timer of at most a minute", delays)
	}
	// Fired while the wall clock is still before the expiry: re-armed,
	// not re-rendered.
	fire[0]()
	if len(delays) != 2 || delays[1] > time.Minute {
		t.Fatalf("after a wake before the expiry: armed %v, want a second timer of at most a minute", delays)
	}
	// Near the expiry the timer is armed for it, plus the second's margin.
	mu.Lock()
	clock = expires.Add(-10 * time.Second)
	mu.Unlock()
	fire[1]()
	if len(delays) != 3 || delays[2] != 11*time.Second {
		t.Fatalf("10 s before the expiry: armed %v, want 11s last", delays)
	}
	f.mu.Lock()
	if f.timer != nil {
		f.timer.Stop()
	}
	f.mu.Unlock()
}
