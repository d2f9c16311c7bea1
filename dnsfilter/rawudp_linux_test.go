package dnsfilter

import (
	"errors"
	"fmt"
	"net"
	"slices"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// A listener off the netpoller: Close wakes its readers, blocked in
// recvmmsg with no query coming, Run returns, and the socket is released
// (its address can be bound again at once).
func TestRawListenerClose(t *testing.T) {
	procsAtLeast(t, 3) // two raw readers and one more
	up := newFakeUpstream(t, labZone)
	s, err := New(Config{Listen: []string{"127.0.0.1:0"}, Upstreams: []string{up.Addr}, UDPReaders: 2, ClientRate: -1, UDPRawReads: true}, Deps{Policy: compile(t, enforcePolicy)})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Run(t.Context()) }()
	<-s.Ready()
	s.mu.Lock()
	raw := isRawUDP(s.udp[0])
	s.mu.Unlock()
	if !raw {
		t.Fatal("the IPv4 listener is on the netpoller")
	}
	addr := s.Addrs()[0].String()
	if r := ask(t, "udp", addr, "api.allowed.test.", dns.TypeA, false); r.Rcode != dns.RcodeSuccess {
		t.Fatalf("query before Close: %s", dns.RcodeToString[r.Rcode])
	}
	time.Sleep(50 * time.Millisecond) // the readers are back in recvmmsg
	closed := make(chan struct{})
	go func() { _ = s.Close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not return: a reader stayed blocked in recvmmsg")
	}
	select {
	case err := <-done:
		if err != nil && !errors.Is(err, net.ErrClosed) {
			t.Fatalf("run: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return after Close")
	}
	c, err := net.ListenPacket("udp4", addr)
	if err != nil {
		t.Fatalf("the listener's address is still taken after Close: %v", err)
	}
	_ = c.Close()
}

// With UDPRawReads, listener readers leave the netpoller only while a
// processor stays free for everything else: none with one processor (a one-CPU machine), and
// with two, the first listen address's reader but not the second's.
// Each listener answers either way.
func TestRawReadersLeaveAProcessor(t *testing.T) {
	for procs, want := range map[int]int{1: 0, 2: 1, 3: 2, 16: 15} {
		if got := rawReaders(procs); got != want {
			t.Errorf("rawReaders(%d) = %d, want %d", procs, got, want)
		}
	}
	for _, tc := range []struct {
		procs int
		want  []bool // per listen address: off the netpoller
	}{
		{1, []bool{false, false}},
		{2, []bool{true, false}},
		{3, []bool{true, true}},
	} {
		t.Run(fmt.Sprintf("gomaxprocs=%d", tc.procs), func(t *testing.T) {
			setProcs(t, tc.procs)
			up := newFakeUpstream(t, labZone)
			ts := startServer(t, enforcePolicy, Config{Listen: []string{"127.0.0.1:0", "127.0.0.2:0"}, Upstreams: []string{up.Addr}, UDPReaders: 1, UDPRawReads: true}, Deps{})
			ts.mu.Lock()
			var got []bool
			for _, c := range ts.udp {
				got = append(got, isRawUDP(c))
			}
			ts.mu.Unlock()
			if !slices.Equal(got, tc.want) {
				t.Errorf("listeners off the netpoller: %v, want %v", got, tc.want)
			}
			for _, a := range ts.Addrs() {
				for _, name := range []string{"www.allowed.test.", "api.allowed.test.", "www.allowed.test."} {
					if r := ask(t, "udp", a.String(), name, dns.TypeA, false); r.Rcode != dns.RcodeSuccess || len(answerAddrs(r)) == 0 {
						t.Errorf("%s %s: %s, %d addresses", a, name, dns.RcodeToString[r.Rcode], len(answerAddrs(r)))
					}
				}
			}
		})
	}
}
