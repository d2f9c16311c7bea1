package dnsfilter

import (
	"fmt"
	"net"
	"runtime"
	"strings"
	"testing"

	"github.com/miekg/dns"
)

// bigUpstream answers every TXT question with about 60 KiB of TXT records
// (whole over TCP, truncated over UDP): the zone of a name a LAN client
// controls.
func bigUpstream(t *testing.T) string {
	t.Helper()
	var pc net.PacketConn
	var l net.Listener
	for i := 0; ; i++ { // the TCP port of the UDP one may be taken
		var err error
		if pc, err = net.ListenPacket("udp", "127.0.0.1:0"); err != nil {
			t.Fatal(err)
		}
		if l, err = net.Listen("tcp", pc.LocalAddr().String()); err == nil {
			break
		}
		pc.Close()
		if i >= 10 {
			t.Fatal(err)
		}
	}
	h := dns.HandlerFunc(func(w dns.ResponseWriter, r *dns.Msg) {
		m := new(dns.Msg)
		m.SetReply(r)
		m.Compress = true
		q := r.Question[0]
		for i := range 240 {
			m.Answer = append(m.Answer, &dns.TXT{Hdr: dns.RR_Header{Name: q.Name, Rrtype: dns.TypeTXT, Class: dns.ClassINET, Ttl: 3600},
				Txt: []string{fmt.Sprintf("%03d%s", i, strings.Repeat("y", 240))}})
		}
		if opt := r.IsEdns0(); opt != nil {
			m.SetEdns0(opt.UDPSize(), false)
		}
		if _, udp := w.RemoteAddr().(*net.UDPAddr); udp {
			m.Truncate(dns.MinMsgSize)
		}
		_ = w.WriteMsg(m)
	})
	for _, srv := range []*dns.Server{{PacketConn: pc, Handler: h}, {Listener: l, Handler: h}} {
		started := make(chan struct{})
		srv.NotifyStartedFunc = func() { close(started) }
		go func() { _ = srv.ActivateAndServe() }()
		<-started
		t.Cleanup(func() { _ = srv.Shutdown() })
	}
	return pc.LocalAddr().String()
}

func heapInUse() uint64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapInuse
}

// TestCacheBoundedInBytes: one LAN client asks for 600 distinct names (in
// audit mode a denied name is forwarded and cached too) whose answers are
// 60 KiB each. The cache was bounded in entries only (10,000), so it kept
// every answer, parsed and packed: 600 of them held over 70 MB of heap, and
// 10,000 would hold more than a gigabyte. Its bytes are bounded too: the
// packed answers it holds, and so the heap it takes.
func TestCacheBoundedInBytes(t *testing.T) {
	up := bigUpstream(t)
	ts := startServer(t, auditPolicy, Config{Upstreams: []string{up}}, Deps{})
	before := heapInUse()
	const names = 600
	for i := range names {
		r, err := tryAsk("tcp", ts.Addr, fmt.Sprintf("n%d.tunnel.example.", i), dns.TypeTXT, false)
		if err != nil || len(r.Answer) != 240 {
			t.Fatalf("query %d: %v %v", i, err, r)
		}
	}
	grown := int64(heapInUse()) - int64(before)
	t.Logf("heap grew %d KiB for %d answers of 60 KiB; cache holds %d entries", grown>>10, names, ts.cache.len())
	held := 0
	for i := range ts.cache.shards {
		sh := &ts.cache.shards[i]
		sh.mu.RLock()
		for _, e := range sh.m {
			held += e.msg.Len()
		}
		sh.mu.RUnlock()
	}
	if held > cacheBytes {
		t.Errorf("the cache holds %d KiB of answers (packed), over its %d KiB", held>>10, cacheBytes>>10)
	}
	if limit := int64(cacheBytes) * 4; grown > limit {
		t.Errorf("heap grew %d MiB for %d cached 60 KiB answers, over %d MiB (4 × the cache's byte budget)", grown>>20, names, limit>>20)
	}
}
