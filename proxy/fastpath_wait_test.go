package proxy

import (
	"net/netip"
	"testing"
	"time"

	"egressd/audit"
	"egressd/policy"
)

// TestServeQueueFirstByteFromHandshake: the fast path's first-byte wait
// is the proxy's counted from the same point. The proxy counts
// FirstByteWait from the completed handshake (TCP_DEFER_ACCEPT holds it
// up to the SYN-ACK's initial RTO, deferAcceptWait); the fast path sees
// the SYN, so its wait is FirstByteWait plus that allowance from the
// SYN, still bounded by HelloTimeout. A client whose hello comes after
// FirstByteWait from its SYN but within the allowance (a busy client, a
// SYN or SYN-ACK lost and resent after the RTO) is decided on its hello,
// not allowed on the address as silent. Before, the wait ran
// min(FirstByteWait, HelloTimeout) from the SYN: this client was allowed
// on the address, its hello never read.
func TestServeQueueFirstByteFromHandshake(t *testing.T) {
	const wait = 200 * time.Millisecond
	dest := netip.AddrPortFrom(srvV4, 443)
	hello := goClientHello(t, "evil.example")
	t.Run("hello after FirstByteWait, within the handshake's allowance", func(t *testing.T) {
		r := newFastRig(t, func(c *Config) { c.FirstByteWait = wait })
		client := netip.AddrPortFrom(clientV4, 42701)
		_, isn := r.connect(t, client, dest)
		// Past FirstByteWait from the SYN, well before FirstByteWait +
		// deferAcceptWait (1.2 s).
		time.Sleep(3 * wait)
		checkDenied(t, r.q.wait(t, r.stream(client, dest, isn, hello, 1000, false)))
		ev := r.evs.wait(t, "of the flow", func(ev audit.Event) bool { return ev.ClientPort == client.Port() })
		if ev.Verdict != policy.Deny || ev.Name != "evil.example" {
			t.Fatalf("event %+v: want denied on its hello (evil.example), not allowed on the address as silent", ev)
		}
	})
	t.Run("bounded by HelloTimeout", func(t *testing.T) {
		const helloTimeout = 500 * time.Millisecond
		r := newFastRig(t, func(c *Config) { c.FirstByteWait, c.HelloTimeout = wait, helloTimeout })
		client := netip.AddrPortFrom(clientV4, 42702)
		syn := time.Now()
		r.connect(t, client, dest)
		ev := r.evs.wait(t, "of the flow", func(ev audit.Event) bool { return ev.ClientPort == client.Port() })
		if ev.Verdict != policy.Allow || ev.Close != closeFast {
			t.Fatalf("silent client: event %+v: want allowed on the address, close %s", ev, closeFast)
		}
		if d := time.Since(syn); d < helloTimeout {
			t.Errorf("the silent client was decided %v after its SYN, want not before HelloTimeout (%v)", d, helloTimeout)
		}
	})
}
