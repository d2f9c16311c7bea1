package dnsfilter

import (
	"errors"
	"net"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// A listener off the netpoller: Close wakes its readers, blocked in
// recvmmsg with no query coming, Run returns, and the socket is released
// (its address can be bound again at once).
func TestRawListenerClose(t *testing.T) {
	up := newFakeUpstream(t, labZone)
	s, err := New(Config{Listen: []string{"127.0.0.1:0"}, Upstreams: []string{up.Addr}, UDPReaders: 2, ClientRate: -1}, Deps{Policy: compile(t, enforcePolicy)})
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
