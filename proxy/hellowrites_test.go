package proxy

import (
	"bytes"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"egressd/audit"
	"egressd/internal/tlshello/hellotest"
	"egressd/policy"
)

// TestTransparentHelloWrites (THREATS.md C1, the matrix): one real Go
// ClientHello with an X25519MLKEM768 key share (about 1.5 KB) replayed through the
// transparent listener cut into N writes, N in {1, 2, 3, 4, 7, 16, one
// byte per write}, with TCP_NODELAY on the client and 0, 50 ms, 1 s or
// 3 s between the writes (a gap only where the whole hello takes at most
// 6 s, well inside the 12 s hello deadline: so 3 s for N <= 3, 1 s up to
// N = 7, none for one byte per write), for an allowed and a denied name.
// Every connection is recorded with the same name, name source, verdict,
// reason, rule and enforcement as the hello sent in one write, and the
// client reads the same kind of answer (the origin's handshake record or
// the access_denied alert). The connections (both names' too) run at
// once, so the test takes about its longest one.
func TestTransparentHelloWrites(t *testing.T) {
	tp := newTopo(t, topoOpts{config: func(c *Config) { c.HelloTimeout = 12 * time.Second }})
	tp.facts.add(clientV4, srvV4, "www.allowed.test")
	type verdict struct {
		name, source, rule, reason string
		verdict                    policy.Verdict
		enforced                   bool
		answer                     byte // the first byte the client read: 0x16 handshake, 0x15 alert
	}
	type outcome struct {
		local, remote netip.AddrPort
		answer        byte
		err           error
	}
	// send replays hello to dst in writes pieces, gap apart.
	send := func(dst netip.Addr, hello []byte, writes int, gap time.Duration) outcome {
		var c net.Conn
		err := tp.c.Do(func() (err error) {
			d := net.Dialer{Timeout: 5 * time.Second}
			c, err = d.Dial("tcp", netip.AddrPortFrom(dst, 443).String())
			return err
		})
		if err != nil {
			return outcome{err: err}
		}
		defer c.Close()
		o := outcome{local: addrPortOf(c.LocalAddr()), remote: addrPortOf(c.RemoteAddr())}
		if err := c.(*net.TCPConn).SetNoDelay(true); err != nil {
			o.err = err
			return o
		}
		for i := range writes {
			if i > 0 {
				time.Sleep(gap)
			}
			if _, err := c.Write(hello[i*len(hello)/writes : (i+1)*len(hello)/writes]); err != nil {
				o.err = fmt.Errorf("write %d of %d: %w", i+1, writes, err)
				return o
			}
		}
		c.SetReadDeadline(time.Now().Add(20 * time.Second))
		var b [1]byte
		if _, err := io.ReadFull(c, b[:]); err != nil {
			o.err = fmt.Errorf("no answer: %w", err)
			return o
		}
		o.answer = b[0]
		return o
	}
	// recorded is the proxy's event for o's connection, once it closed.
	recorded := func(t *testing.T, what string, o outcome) verdict {
		t.Helper()
		ev := tp.ev.wait(t, what, func(ev audit.Event) bool {
			return ev.ClientPort == o.local.Port() && ev.Client.Unmap() == o.local.Addr().Unmap() &&
				ev.DestPort == o.remote.Port() && ev.Dest.Unmap() == o.remote.Addr().Unmap()
		})
		return verdict{ev.Name, string(ev.NameSource), ev.Rule, string(ev.Reason), ev.Verdict, ev.Enforced, o.answer}
	}

	type cut struct {
		writes int // 0: one byte per write
		gaps   []time.Duration
	}
	cuts := []cut{
		{2, []time.Duration{0, 50 * time.Millisecond, time.Second, 3 * time.Second}},
		{3, []time.Duration{0, 50 * time.Millisecond, time.Second, 3 * time.Second}},
		{4, []time.Duration{0, 50 * time.Millisecond, time.Second}},
		{7, []time.Duration{0, 50 * time.Millisecond, time.Second}},
		{16, []time.Duration{0, 50 * time.Millisecond}},
		{0, []time.Duration{0}},
	}
	for _, c := range []struct {
		name    string
		dst     netip.Addr
		verdict policy.Verdict
	}{
		{"www.allowed.test", srvV4, policy.Allow},
		{"evil.example", deniedV4, policy.Deny},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			hello := hellotest.GoHello(t, c.name, &tls.Config{CurvePreferences: []tls.CurveID{tls.X25519MLKEM768, tls.X25519}})
			// An X25519MLKEM768 key share: group 0x11ec, 1216 bytes.
			if !bytes.Contains(hello, []byte{0x11, 0xec, 0x04, 0xc0}) {
				t.Fatalf("the %d-byte hello has no ML-KEM key share", len(hello))
			}
			// The single write is the reference.
			o := send(c.dst, hello, 1, 0)
			if o.err != nil {
				t.Fatalf("one write: %v", o.err)
			}
			want := recorded(t, "one write", o)
			if want.name != c.name || want.source != string(audit.NameSNI) || want.verdict != c.verdict {
				t.Fatalf("one write recorded as %+v, want %s by SNI, %s", want, c.name, c.verdict)
			}
			t.Logf("%d-byte hello in one write: %+v", len(hello), want)
			type run struct {
				what string
				o    outcome
			}
			var (
				mu   sync.Mutex
				runs []run
				wg   sync.WaitGroup
			)
			for _, k := range cuts {
				writes := k.writes
				if writes == 0 {
					writes = len(hello)
				}
				for _, gap := range k.gaps {
					wg.Add(1)
					go func() {
						defer wg.Done()
						o := send(c.dst, hello, writes, gap)
						mu.Lock()
						runs = append(runs, run{fmt.Sprintf("%d writes %v apart", writes, gap), o})
						mu.Unlock()
					}()
				}
			}
			wg.Wait()
			for _, r := range runs {
				if r.o.err != nil {
					t.Errorf("%s: %v", r.what, r.o.err)
					continue
				}
				if got := recorded(t, r.what, r.o); got != want {
					t.Errorf("%s: recorded %+v, want %+v as for one write", r.what, got, want)
				}
			}
		})
	}
}
