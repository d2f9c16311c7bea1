package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"egressd/audit"
	"egressd/firewall"
	"egressd/internal/nfq"
	"egressd/policy"
)

// fastKernel is the kernel side of the fast path in the gateway: the
// firewall package's enforce ruleset with FastPath, the queue it feeds
// and an injector, both in the gateway's namespace.
type fastKernel struct {
	marks FastMarks
	q     *nfq.Conn
	inj   *nfq.Injector
}

// installFastPath installs the firewall's ruleset (fast path on queue,
// masquerade out of gws) in the gateway and opens the queue and the
// injector there.
func (tp *topo) installFastPath(t *testing.T, mode string, queue uint16) *fastKernel {
	t.Helper()
	nsPath := "/var/run/netns/" + tp.g.Name
	cfg := firewall.Config{LANs: []string{"gwc"}, WAN: "gws", ProxyPort: transparentPort, DNSPort: 5353,
		Masquerade: true, FastPath: true, FastPathQueue: queue, NetNS: nsPath}
	fw, err := firewall.New(cfg, firewall.Deps{Registerer: prometheus.NewRegistry(), Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fw.Close() })
	eng, err := policy.Compile("test.yaml", []byte(fmt.Sprintf(testPolicy, mode)))
	if err != nil {
		t.Fatal(err)
	}
	if err := fw.Install(eng); err != nil {
		t.Fatal(err)
	}
	q, err := nfq.OpenConfig(nfq.Config{Queue: queue, NetNS: nsPath})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { q.Close() })
	inj, err := nfq.NewInjector(nsPath)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { inj.Close() })
	// FastMarks converts from firewall.Marks: cmd/egressd's wiring.
	return &fastKernel{marks: FastMarks(firewall.FastMarks(cfg)), q: q, inj: inj}
}

// serve runs p.ServeQueue on the queue until the test ends, through tap
// when set (tapQueue).
func (k *fastKernel) serve(t *testing.T, p *Proxy, tap func(nfq.Packet)) {
	var q Queue = k.q
	if tap != nil {
		q = tapQueue{Queue: k.q, tap: tap}
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.ServeQueue(ctx, q) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("ServeQueue: %v", err)
		}
	})
}

// tapQueue is the kernel's queue with a test's look at each packet
// before the fast path's, on the queue's goroutine: tap may wait (the
// kernel keeps the packets behind it queued), as a packet read late would.
type tapQueue struct {
	Queue
	tap func(nfq.Packet)
}

func (q tapQueue) Serve(ctx context.Context, fn func(nfq.Packet)) error {
	return q.Queue.Serve(ctx, func(pk nfq.Packet) {
		q.tap(pk)
		fn(pk)
	})
}

// countListener counts what the server's connections read, and how many
// were accepted and have ended (a read or write failed, or closed).
type countListener struct {
	net.Listener
	read            atomic.Int64
	accepted, ended atomic.Int32
}

func (l *countListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.accepted.Add(1)
	return &countConn{Conn: c, l: l}, nil
}

type countConn struct {
	net.Conn
	l    *countListener
	once atomic.Bool
}

func (c *countConn) end() {
	if c.once.CompareAndSwap(false, true) {
		c.l.ended.Add(1)
	}
}

func (c *countConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	c.l.read.Add(int64(n))
	if err != nil {
		c.end()
	}
	return n, err
}

func (c *countConn) Close() error { c.end(); return c.Conn.Close() }

// idle waits until every connection the server accepted has ended.
func (l *countListener) idle(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for l.ended.Load() != l.accepted.Load() {
		if time.Now().After(deadline) {
			t.Fatalf("server: %d connections accepted, %d ended", l.accepted.Load(), l.ended.Load())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestFastPathKernel runs the fast path on the kernel's own path: the
// firewall package's ruleset with FastPath in the gateway (masquerading),
// a real queue (nfq.Conn), a real injector, ServeQueue reading, a Go TLS
// client in the client namespace and the TLS server in the server's.
func TestFastPathKernel(t *testing.T) {
	tp := newTopo(t, topoOpts{fastQueue: 3301, config: func(c *Config) {
		// A client whose hello is late past the first-byte wait is decided
		// by the address (a server that speaks first): under -race the
		// key shares can take longer than the topology's 300 ms.
		c.FirstByteWait = 5 * time.Second
	}})
	tp.facts.add(clientV4, srvV4, "www.allowed.test")
	dest := netip.AddrPortFrom(srvV4, 443)
	syns := func(result string) float64 { return fastSYNs(tp.proxy, result) }

	t.Run("allowed", func(t *testing.T) {
		fast, onQueue := syns("fast"), counterValue(tp.proxy.met.fastOnQueue)
		c := tp.dialAtFirstWrite(t, dest)
		body, err := tp.tlsGet(c, "www.allowed.test", "/fast", nil)
		if err != nil || !strings.Contains(body, "sni=www.allowed.test") {
			t.Fatalf("GET: %q, %v", body, err)
		}
		ev := tp.ev.wait(t, "of the fast connection", func(ev audit.Event) bool { return ev.ClientPort == uint16(localPort(c)) })
		if ev.Verdict != policy.Allow || ev.Close != closeFast || ev.Name != "www.allowed.test" {
			t.Errorf("event %+v: want allowed, close %s", ev, closeFast)
		}
		if got := syns("fast") - fast; got != 1 {
			t.Errorf("fast_syns_total{result=fast} rose by %v, want 1", got)
		}
		// Go's hello is one segment: the queue's goroutine decides it.
		if got := counterValue(tp.proxy.met.fastOnQueue) - onQueue; got != 1 {
			t.Errorf("fast_decisions_total{on=queue} rose by %v, want 1", got)
		}
	})

	t.Run("denied-sni", func(t *testing.T) {
		tp.tlsSrv.idle(t)
		read, accepted, ended := tp.tlsSrv.read.Load(), tp.tlsSrv.accepted.Load(), tp.tlsSrv.ended.Load()
		c := tp.dialAtFirstWrite(t, dest)
		_, err := tp.tlsGet(c, "evil.example", "/", nil)
		// The injected alert, then the reset: not the handshake's deadline.
		var ne net.Error
		if err == nil || !strings.Contains(err.Error(), "access denied") || (errors.As(err, &ne) && ne.Timeout()) {
			t.Fatalf("handshake: %v, want the TLS alert access_denied", err)
		}
		ev := tp.ev.wait(t, "of the fast connection", func(ev audit.Event) bool { return ev.ClientPort == uint16(localPort(c)) })
		if ev.Verdict != policy.Deny || !ev.Enforced || ev.Close != closeFastDenied || ev.Reason != policy.ReasonNoRule || ev.Name != "evil.example" {
			t.Errorf("event %+v: want denied %s, close %s", ev, policy.ReasonNoRule, closeFastDenied)
		}
		// The server had the connection (the kernel forwarded the
		// handshake), read none of the client's bytes, and was reset.
		// Its accept can come after the client's alert on a busy box:
		// wait for the server's side to end, not only for idle (before,
		// idle with nothing yet accepted passed at once: 0 accepted).
		tp.tlsSrv.refused(t, time.Now().Add(10*time.Second), ended, accepted, read, 1)
	})

	t.Run("not-given-out", func(t *testing.T) {
		// Our DNS gave the address to another client only: the SYN goes to
		// the transparent proxy, which decides it as ever (here by a fresh
		// lookup of the SNI).
		notLearned := syns("not-learned")
		c := tp.dialAtFirstWriteFrom(t, client2V4, dest)
		body, err := tp.tlsGet(c, "www.allowed.test", "/proxied", nil)
		if err != nil || !strings.Contains(body, "sni=www.allowed.test") {
			t.Fatalf("GET: %q, %v", body, err)
		}
		ev := tp.ev.wait(t, "of the proxied connection", func(ev audit.Event) bool { return ev.ClientPort == uint16(localPort(c)) })
		if ev.Verdict != policy.Allow || ev.Close == closeFast || ev.Close == closeFastDenied || ev.BytesIn == 0 {
			t.Errorf("event %+v: want allowed by the proxy (bytes both ways, not a fast-path close)", ev)
		}
		if got := syns("not-learned") - notLearned; got != 1 {
			t.Errorf("fast_syns_total{result=not-learned} rose by %v, want 1", got)
		}
	})
}
