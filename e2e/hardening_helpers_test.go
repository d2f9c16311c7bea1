package e2e

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdh"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// Helpers of the hardening suite (THREATS.md): a recording upstream
// resolver, witness servers that count what reaches them, a ClientHello
// builder for the odd encodings crypto/tls refuses to send, a splitter for
// segments and records, a QUIC Initial builder, and the event log reader.

// recUpstream is the resolver egressd forwards to in the hardening tests
// (--upstream-dns): an authoritative server in the internet namespace that
// serves the topology's zone plus per-test records, and records every
// query it receives, so a test can assert that a name never left the
// gateway (THREATS.md E1). It can be taken down (it stops answering, like
// a dead host) and brought back.
type recUpstream struct {
	addr string
	mu   sync.Mutex
	rrs  map[string][]dns.RR  // lower-case FQDN → records (any type)
	rot  map[rotKey]*rotation // answers that rotate (rotate)
	// hostile are answers given verbatim (any qtype) for a lower-case
	// FQDN: what an attacker's authoritative server puts in them
	// (hostile).
	hostile map[string][]dns.RR
	seen    []string // qnames received, lower case, no trailing dot
	down    atomic.Bool
	recv    atomic.Int64
}

const upstreamDNS4 = "198.18.2.54"

func (tp *topo) startUpstream(t *testing.T) *recUpstream {
	t.Helper()
	tp.inet.MustRun("ip", "addr", "add", upstreamDNS4+"/32", "dev", "eth0")
	u := &recUpstream{addr: upstreamDNS4, rrs: map[string][]dns.RR{}, rot: map[rotKey]*rotation{}, hostile: map[string][]dns.RR{}}
	for _, r := range zone {
		u.add(fmt.Sprintf("%s. 300 IN %s %s", r[0], r[1], r[2]))
	}
	pc, err := tp.inet.ListenPacket("udp", upstreamDNS4+":53")
	if err != nil {
		t.Fatal(err)
	}
	srv := &dns.Server{PacketConn: pc, Handler: dns.HandlerFunc(u.serve)}
	started := make(chan struct{})
	srv.NotifyStartedFunc = func() { close(started) }
	go srv.ActivateAndServe()
	<-started
	t.Cleanup(func() { srv.Shutdown() })
	return u
}

// add adds one record in zone-file form.
func (u *recUpstream) add(rr string) {
	r, err := dns.NewRR(rr)
	if err != nil {
		panic(fmt.Sprintf("e2e: record %q: %v", rr, err))
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	k := strings.ToLower(r.Header().Name)
	u.rrs[k] = append(u.rrs[k], r)
}

// answerVerbatim makes every answer for name, whatever the type asked,
// the records rrs (zone-file form, any owner): a hostile authoritative
// server's.
func (u *recUpstream) answerVerbatim(name string, rrs ...string) {
	var out []dns.RR
	for _, s := range rrs {
		r, err := dns.NewRR(s)
		if err != nil {
			panic(fmt.Sprintf("e2e: record %q: %v", s, err))
		}
		out = append(out, r)
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	u.hostile[strings.ToLower(dns.Fqdn(name))] = out
}

// rotKey is a name (lower-case FQDN) and a record type.
type rotKey struct {
	name  string
	qtype uint16
}

// rotation is a round-robin answer: one record per query, the next one
// each time.
type rotation struct {
	rrs  []dns.RR
	next int
}

// rotate makes the answers for name's records of type qtype (A or AAAA)
// rotate through addrs, one address per query, the next one each time,
// as a CDN's do (THREATS.md A3): a second query for the name never
// returns what the first one did. It overrides the name's records of that
// type.
func (u *recUpstream) rotate(name string, qtype uint16, addrs ...string) {
	var rrs []dns.RR
	for _, a := range addrs {
		r, err := dns.NewRR(fmt.Sprintf("%s. 300 IN %s %s", name, dns.TypeToString[qtype], a))
		if err != nil {
			panic(fmt.Sprintf("e2e: rotation %s %s: %v", name, a, err))
		}
		rrs = append(rrs, r)
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	u.rot[rotKey{strings.ToLower(dns.Fqdn(name)), qtype}] = &rotation{rrs: rrs}
}

func (u *recUpstream) serve(w dns.ResponseWriter, req *dns.Msg) {
	u.recv.Add(1)
	if u.down.Load() || len(req.Question) != 1 {
		return
	}
	q := req.Question[0]
	name := strings.ToLower(q.Name)
	u.mu.Lock()
	u.seen = append(u.seen, strings.TrimSuffix(name, "."))
	m := new(dns.Msg)
	m.SetReply(req)
	m.Authoritative = true
	if rrs, ok := u.hostile[name]; ok {
		for _, rr := range rrs {
			m.Answer = append(m.Answer, dns.Copy(rr))
		}
		u.mu.Unlock()
		w.WriteMsg(m)
		return
	}
	if r := u.rot[rotKey{name, q.Qtype}]; r != nil {
		m.Answer = append(m.Answer, dns.Copy(r.rrs[r.next%len(r.rrs)]))
		r.next++
		u.mu.Unlock()
		w.WriteMsg(m)
		return
	}
	// Follow CNAMEs within the data, like an authoritative server that
	// holds both zones.
	for hops := 0; hops < 8; hops++ {
		var cname string
		for _, rr := range u.rrs[name] {
			switch {
			case rr.Header().Rrtype == q.Qtype:
				m.Answer = append(m.Answer, dns.Copy(rr))
			case rr.Header().Rrtype == dns.TypeCNAME:
				m.Answer = append(m.Answer, dns.Copy(rr))
				cname = strings.ToLower(rr.(*dns.CNAME).Target)
			}
		}
		if cname == "" {
			break
		}
		name = cname
	}
	if len(m.Answer) == 0 && len(u.rrs[strings.ToLower(q.Name)]) == 0 {
		m.Rcode = dns.RcodeNameError
	}
	u.mu.Unlock()
	w.WriteMsg(m)
}

// seenNames returns the qnames received so far.
func (u *recUpstream) seenNames() []string {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]string(nil), u.seen...)
}

// witness counts TCP connections accepted and UDP datagrams received on
// addresses a test adds to the internet namespace: proof that something
// got through, or did not. TCP peers get "hit\n" and then an echo of what
// they send, for as long as the test runs (its connections are closed at
// its cleanup); UDP datagrams are echoed.
type witness struct {
	tcp, udp atomic.Int64
	mu       sync.Mutex
	byAddr   map[string]int
	open     map[net.Conn]struct{} // TCP connections not yet ended; nil once closed
}

func (tp *topo) newWitness(t *testing.T, tcpAddrs, udpAddrs []string) *witness {
	t.Helper()
	w := &witness{byAddr: map[string]int{}, open: map[net.Conn]struct{}{}}
	added := map[string]bool{}
	addAddr := func(hp string) {
		h, _, _ := net.SplitHostPort(hp)
		if added[h] || h == "" {
			return
		}
		added[h] = true
		a := netip.MustParseAddr(h)
		if !testRange(a) {
			t.Fatalf("witness on %s: tests assign only 198.18.0.0/15, TEST-NET and 2001:db8::/32 addresses", a)
		}
		var out string
		var err error
		if a.Is4() {
			out, err = tp.inet.Run("ip", "addr", "add", h+"/32", "dev", "eth0")
		} else {
			out, err = tp.inet.Run("ip", "-6", "addr", "add", h+"/128", "dev", "eth0", "nodad")
		}
		if err != nil && !strings.Contains(out, "File exists") && !strings.Contains(out, "already assigned") {
			t.Fatalf("ip addr add %s: %v: %s", h, err, out)
		}
		tp.inet.WaitAddr(t, h)
	}
	var wg sync.WaitGroup
	t.Cleanup(wg.Wait)
	// Before the wait (cleanups run last first): the connections still
	// open end, whatever their peers do. Not a deadline on each: a tunnel
	// of the load test stays open as long as the test needs it (at a load
	// of 19 on 2 cores opening 9,280 took 61 s, and the first ones' 60 s
	// deadline closed them before their echo was checked).
	t.Cleanup(func() {
		w.mu.Lock()
		defer w.mu.Unlock()
		for c := range w.open {
			c.Close()
		}
		w.open = nil
	})
	for _, a := range tcpAddrs {
		addAddr(a)
		ln, err := tp.inet.Listen("tcp", a)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		wg.Add(1)
		go func() {
			defer wg.Done()
			var conns sync.WaitGroup
			defer conns.Wait()
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				// byAddr before tcp: a count settleAfter has seen is in
				// hits too (the baselines of some tests are hits).
				w.mu.Lock()
				w.byAddr[a]++
				w.tcp.Add(1)
				if w.open == nil { // the cleanup has begun
					w.mu.Unlock()
					c.Close()
					continue
				}
				w.open[c] = struct{}{}
				w.mu.Unlock()
				conns.Add(1)
				go func() {
					defer conns.Done()
					defer func() {
						w.mu.Lock()
						delete(w.open, c)
						w.mu.Unlock()
						c.Close()
					}()
					c.Write([]byte("hit\n"))
					// A read/write loop, not io.Copy: TCPConn to TCPConn
					// splices through a pipe held while blocked, two
					// descriptors per idle echo (the load test holds
					// thousands).
					buf := make([]byte, 2048)
					for {
						n, err := c.Read(buf)
						if n > 0 {
							if _, werr := c.Write(buf[:n]); werr != nil {
								return
							}
						}
						if err != nil {
							return
						}
					}
				}()
			}
		}()
	}
	for _, a := range udpAddrs {
		addAddr(a)
		pc, err := tp.inet.ListenPacket("udp", a)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { pc.Close() })
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, 2048)
			for {
				n, from, err := pc.ReadFrom(buf)
				if err != nil {
					return
				}
				w.mu.Lock()
				w.byAddr["udp:"+a]++
				w.udp.Add(1)
				w.mu.Unlock()
				pc.WriteTo(buf[:n], from)
			}
		}()
	}
	return w
}

func (w *witness) hits(addr string) int {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.byAddr[addr]
}

// flowEvent is one line of the event log, the fields the hardening suite
// checks.
type flowEvent struct {
	Kind       string    `json:"kind"`
	Source     string    `json:"source"`
	Time       time.Time `json:"time"`
	Client     string    `json:"client"`
	ClientPort int       `json:"client_port"`
	ClientMAC  string    `json:"client_mac"`
	Dest       string    `json:"dest_ip"`
	DestPort   int       `json:"dest_port"`
	Proto      string    `json:"proto"`
	Name       string    `json:"name"`
	NameSource string    `json:"name_source"`
	Path       string    `json:"path"`
	Verdict    string    `json:"verdict"`
	Rule       string    `json:"rule"`
	Reason     string    `json:"reason"`
	Enforced   bool      `json:"enforced"`
	Close      string    `json:"close"`
	QType      string    `json:"qtype"`
	RCode      string    `json:"rcode"`
	Filtered   string    `json:"filtered"`
	Front      string    `json:"front"`
	OtherNames []string  `json:"other_names"`
	// Count, on a summary record of the detail budget, is how many events
	// of this shape it stands for (0 on an event written alone).
	Count      uint64 `json:"count"`
	Duplicates uint64 `json:"duplicates"`
	Revised    bool   `json:"revised"`
}

func (e flowEvent) String() string {
	return fmt.Sprintf("%s/%s %s:%d > %s:%d/%s name=%q(%s) %s rule=%q reason=%q enforced=%v close=%s qtype=%s rcode=%s",
		e.Kind, e.Source, e.Client, e.ClientPort, e.Dest, e.DestPort, e.Proto, e.Name, e.NameSource, e.Verdict, e.Rule, e.Reason, e.Enforced, e.Close, e.QType, e.RCode)
}

// allEvents reads every event of the event log in the state directory.
func (d *daemon) allEvents() []flowEvent { return d.eventsWith(nil) }

// eventsWith is allEvents for the lines that contain needle (all when it
// is nil): after a flood has filled the log, decoding every line on each
// poll can take longer than the wait being measured.
func (d *daemon) eventsWith(needle []byte) []flowEvent {
	var out []flowEvent
	files, _ := filepath.Glob(filepath.Join(d.stateDir, "*"))
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		out = append(out, decodeEvents(data, needle)...)
	}
	return out
}

// decodeEvents decodes the event lines of data that contain needle (all
// when it is nil).
func decodeEvents(data, needle []byte) []flowEvent {
	var out []flowEvent
	for _, line := range bytes.Split(data, []byte("\n")) {
		if len(line) == 0 || line[0] != '{' || needle != nil && !bytes.Contains(line, needle) {
			continue
		}
		var ev flowEvent
		if json.Unmarshal(line, &ev) == nil && (ev.Kind == "flow" || ev.Kind == "dns" || ev.Kind == "request") {
			out = append(out, ev)
		}
	}
	return out
}

// waitEvent waits up to 5s for an event of the log that matches and
// returns it; the test fails (with what the log holds) if none comes.
func (d *daemon) waitEvent(t *testing.T, what string, match func(flowEvent) bool) flowEvent {
	t.Helper()
	ev, seen, ok := pollEvents(d.stateDir, 5*time.Second, match, nil)
	if !ok {
		var b strings.Builder
		for _, ev := range seen {
			if ev.Kind == "flow" {
				fmt.Fprintln(&b, ev)
			}
		}
		t.Errorf("no event for %s in the event log after 5s; flows:\n%s", what, b.String())
	}
	return ev
}

// pollEvents reads the event log in dir every 100 ms until an event
// matches, and gives up only after a read that began once window was over:
// the window is the daemon's, to write the event, not this reader's. A
// read begun before the event reached the log can end after the window
// (after a load the log holds tens of thousands of events, and decoding
// them under -race on a busy machine took longer than 5 s), and it must
// not be the last. Each read decodes only the whole lines added since the
// one before (eventTail), so only the first costs that long. It returns
// the match, or every event read when none matched. afterRead, when set,
// is called after each read (a test's hook).
func pollEvents(dir string, window time.Duration, match func(flowEvent) bool, afterRead func()) (flowEvent, []flowEvent, bool) {
	deadline := time.Now().Add(window)
	tail := eventTail{}
	var seen []flowEvent
	for {
		begun := time.Now()
		evs := tail.read(dir)
		for _, ev := range evs {
			if match(ev) {
				return ev, nil, true
			}
		}
		seen = append(seen, evs...)
		if afterRead != nil {
			afterRead()
		}
		if begun.After(deadline) {
			return flowEvent{}, seen, false
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// eventTail reads the event log's files from where its last read ended
// (after the last whole line of each), from the start of a file that is
// new or shorter than that (rotated): a file renamed by a rotation is
// read again under its new name, which only repeats events.
type eventTail map[string]int64

func (tl eventTail) read(dir string) []flowEvent {
	var out []flowEvent
	files, _ := filepath.Glob(filepath.Join(dir, "*"))
	for _, name := range files {
		f, err := os.Open(name)
		if err != nil {
			continue
		}
		off := tl[name]
		if fi, err := f.Stat(); err != nil || !fi.Mode().IsRegular() || fi.Size() < off {
			off = 0
		}
		data, err := io.ReadAll(io.NewSectionReader(f, off, 1<<62))
		f.Close()
		if err != nil {
			continue
		}
		whole := bytes.LastIndexByte(data, '\n') + 1 // a line being written waits for the next read
		out = append(out, decodeEvents(data[:whole], nil)...)
		tl[name] = off + int64(whole)
	}
	return out
}

// dialTimes remembers when each LAN client port was last dialled, so that
// an event is matched to the latest connection from that port, not to an
// earlier one that reused it (the load test cycles through ports).
var dialTimes sync.Map // int → time.Time

// dialTCP dials from the LAN and records the local port's dial time.
func (tp *topo) dialTCP(ctx context.Context, addr string) (net.Conn, error) {
	start := time.Now()
	c, err := tp.lan.DialContext(ctx, "tcp", addr)
	if err == nil {
		dialTimes.Store(c.LocalAddr().(*net.TCPAddr).Port, start)
	}
	return c, err
}

// dialedAt is when the LAN client port was last dialled (zero if never):
// an event from that port before it belongs to an earlier connection.
func dialedAt(port int) time.Time {
	if v, ok := dialTimes.Load(port); ok {
		return v.(time.Time)
	}
	return time.Time{}
}

// byClientPort matches the proxy's event for one client connection.
func byClientPort(port int) func(flowEvent) bool {
	since := dialedAt(port)
	return func(e flowEvent) bool {
		return e.Kind == "flow" && (e.Source == "proxy") && e.ClientPort == port && !e.Time.Before(since)
	}
}

// helloSpec describes a raw ClientHello.
type helloSpec struct {
	// sni are the server_name extensions: each inner slice is one
	// extension with these host_name entries. Nil: no server_name.
	sni [][]string
	ech bool // an encrypted_client_hello (0xfe0d) extension, GREASE-shaped
	pad int  // a padding extension (21) of this many bytes
}

// buildHello builds a TLS 1.3 ClientHello, one record, with a real X25519
// key share, that OpenSSL and Go servers accept when it has one SNI.
func buildHello(s helloSpec) []byte {
	u16 := func(b []byte, v int) []byte { return binary.BigEndian.AppendUint16(b, uint16(v)) }
	ext := func(b []byte, typ int, body []byte) []byte { return append(u16(u16(b, typ), len(body)), body...) }
	var exts []byte
	for _, names := range s.sni {
		var list []byte
		for _, n := range names {
			list = append(u16(append(list, 0), len(n)), n...)
		}
		exts = ext(exts, 0, append(u16(nil, len(list)), list...))
	}
	exts = ext(exts, 10, []byte{0, 4, 0, 0x1d, 0, 0x17})                          // supported_groups: x25519, P-256
	exts = ext(exts, 11, []byte{1, 0})                                            // ec_point_formats
	exts = ext(exts, 13, []byte{0, 8, 4, 3, 8, 4, 4, 1, 8, 7})                    // signature_algorithms
	exts = ext(exts, 16, []byte{0, 9, 8, 'h', 't', 't', 'p', '/', '1', '.', '1'}) // ALPN
	exts = ext(exts, 43, []byte{4, 3, 4, 3, 3})                                   // supported_versions: 1.3, 1.2
	exts = ext(exts, 45, []byte{1, 1})                                            // psk_key_exchange_modes
	key, _ := ecdh.X25519().GenerateKey(rand.Reader)
	pub := key.PublicKey().Bytes()
	ks := u16(u16(nil, 0x1d), len(pub))
	ks = append(ks, pub...)
	exts = ext(exts, 51, append(u16(nil, len(ks)), ks...)) // key_share
	if s.ech {
		// GREASE ECH shape: outer type 0, HPKE suite, config id, enc, payload.
		body := []byte{0, 0, 1, 0, 1, 0x2a}
		enc := make([]byte, 32)
		rand.Read(enc)
		body = append(u16(body, len(enc)), enc...)
		payload := make([]byte, 144)
		rand.Read(payload)
		body = append(u16(body, len(payload)), payload...)
		exts = ext(exts, 0xfe0d, body)
	}
	if s.pad > 0 {
		exts = ext(exts, 21, make([]byte, s.pad))
	}
	var m []byte
	m = append(m, 3, 3)
	random := make([]byte, 32)
	rand.Read(random)
	m = append(m, random...)
	sid := make([]byte, 32)
	rand.Read(sid)
	m = append(append(m, 32), sid...)
	m = append(m, 0, 8, 0x13, 1, 0x13, 2, 0x13, 3, 0xc0, 0x2b) // cipher suites
	m = append(m, 1, 0)                                        // compression: null
	m = append(u16(m, len(exts)), exts...)
	hs := append([]byte{1, byte(len(m) >> 16), byte(len(m) >> 8), byte(len(m))}, m...)
	return reRecord(hs, 16384)
}

// reRecord frames a handshake payload into TLS records of at most n bytes.
func reRecord(hs []byte, n int) []byte {
	var out []byte
	for len(hs) > 0 {
		k := min(n, len(hs))
		out = append(out, 0x16, 3, 1, byte(k>>8), byte(k))
		out = append(out, hs[:k]...)
		hs = hs[k:]
	}
	return out
}

// splitRecords re-frames the handshake records at the start of b into
// records of n bytes (a record-fragmented ClientHello, THREATS.md C2).
func splitRecords(b []byte, n int) []byte {
	var hs []byte
	for len(b) >= 5 && b[0] == 0x16 {
		l := int(binary.BigEndian.Uint16(b[3:5]))
		if len(b) < 5+l {
			break
		}
		hs = append(hs, b[5:5+l]...)
		b = b[5+l:]
	}
	return append(reRecord(hs, n), b...)
}

// writeSegments writes b in pieces of n bytes, each its own TCP segment
// (Nagle off, a pause between writes).
func writeSegments(c net.Conn, b []byte, n int, gap time.Duration) error {
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetNoDelay(true)
	}
	for len(b) > 0 {
		k := min(n, len(b))
		if _, err := c.Write(b[:k]); err != nil {
			return err
		}
		b = b[k:]
		if len(b) > 0 && gap > 0 {
			time.Sleep(gap)
		}
	}
	return nil
}

// splitConn is a client connection whose first write (the ClientHello)
// is re-framed into records of rec bytes (0: as is) and written in
// segments of seg bytes (0: one write).
type splitConn struct {
	net.Conn
	rec, seg int
	gap      time.Duration
	done     bool
}

func (c *splitConn) Write(p []byte) (int, error) {
	if c.done {
		return c.Conn.Write(p)
	}
	c.done = true
	b := p
	if c.rec > 0 {
		b = splitRecords(p, c.rec)
	}
	seg := c.seg
	if seg == 0 {
		seg = len(b)
	}
	if err := writeSegments(c.Conn, b, seg, c.gap); err != nil {
		return 0, err
	}
	return len(p), nil
}

// helloOutcome is what a raw ClientHello got back.
type helloOutcome struct {
	port   int    // the client's local port (to find the proxy's event)
	denied bool   // egressd's access_denied alert, or a close with nothing
	reply  []byte // the first bytes the other side sent
	err    error
}

func (o helloOutcome) String() string {
	if o.err != nil {
		return fmt.Sprintf("port %d: error %v", o.port, o.err)
	}
	return fmt.Sprintf("port %d: denied=%v reply=% x", o.port, o.denied, o.reply[:min(len(o.reply), 8)])
}

// tlsAlertDenied is the alert egressd sends: fatal access_denied.
var tlsAlertDenied = []byte{0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x31}

// sendHello connects from the LAN to addr and sends the raw bytes in
// segments of seg bytes (0: at once), then reads what comes back: a
// ServerHello (0x16) means the hello reached the origin.
func (tp *topo) sendHello(addr string, raw []byte, seg int, gap time.Duration) helloOutcome {
	return sendHelloVia(tp.dialTCP, addr, raw, seg, gap)
}

// sendHelloVia is sendHello over a connection dial makes (another LAN
// host, a given source address).
func sendHelloVia(dial func(context.Context, string) (net.Conn, error), addr string, raw []byte, seg int, gap time.Duration) helloOutcome {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := dial(ctx, addr)
	if err != nil {
		return helloOutcome{err: err}
	}
	defer c.Close()
	o := helloOutcome{port: c.LocalAddr().(*net.TCPAddr).Port}
	if seg == 0 {
		seg = len(raw)
	}
	if err := writeSegments(c, raw, seg, gap); err != nil {
		o.err = err
		return o
	}
	c.SetReadDeadline(time.Now().Add(15 * time.Second))
	buf := make([]byte, 16)
	n, err := io.ReadAtLeast(c, buf, 5)
	o.reply = buf[:n]
	switch {
	case n >= 5 && buf[0] == 0x16:
	case bytes.HasPrefix(buf[:n], tlsAlertDenied), n == 0 && (errors.Is(err, io.EOF) || isReset(err)):
		o.denied = true
	default:
		o.err = fmt.Errorf("reply % x: %v", buf[:n], err)
	}
	return o
}

func isReset(err error) bool {
	return err != nil && (strings.Contains(err.Error(), "connection reset") || strings.Contains(err.Error(), "broken pipe"))
}

// tlsGet speaks TLS from the LAN to addr with sni (Go's client, the test
// CA) through c (which may split the hello), sends one GET and returns the
// origin's body line and the client's local port.
func (tp *topo) tlsGet(addr, sni string, wrap func(net.Conn) net.Conn, cfg func(*tls.Config)) (string, int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := tp.dialTCP(ctx, addr)
	if err != nil {
		return "", 0, err
	}
	defer c.Close()
	port := c.LocalAddr().(*net.TCPAddr).Port
	conf := &tls.Config{ServerName: sni, RootCAs: tp.pool, NextProtos: []string{"http/1.1"}}
	if cfg != nil {
		cfg(conf)
	}
	var nc net.Conn = c
	if wrap != nil {
		nc = wrap(c)
	}
	tc := tls.Client(nc, conf)
	tc.SetDeadline(time.Now().Add(20 * time.Second))
	if err := tc.Handshake(); err != nil {
		return "", port, fmt.Errorf("tls %s (sni %q): %w", addr, sni, err)
	}
	fmt.Fprintf(tc, "GET /hardening HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", sni)
	b, err := io.ReadAll(io.LimitReader(tc, 64<<10))
	if i := bytes.Index(b, []byte("\r\n\r\n")); i >= 0 {
		b = b[i+4:]
	}
	if len(b) == 0 && err != nil {
		return "", port, err
	}
	return string(b), port, nil
}

// rawHTTP sends a raw request from the LAN to addr and returns the status
// line and body, and the client's local port.
func (tp *topo) rawHTTP(addr, req string) (string, int, error) {
	return rawVia(tp.dialTCP, addr, req)
}

// rawVia is rawHTTP over a connection dial makes.
func rawVia(dial func(context.Context, string) (net.Conn, error), addr, req string) (string, int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := dial(ctx, addr)
	if err != nil {
		return "", 0, err
	}
	defer c.Close()
	port := c.LocalAddr().(*net.TCPAddr).Port
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, req); err != nil {
		return "", port, err
	}
	b, err := io.ReadAll(io.LimitReader(c, 64<<10))
	if len(b) == 0 && err != nil {
		return "", port, err
	}
	return string(b), port, nil
}

// dnsQuery asks the gateway's resolver one question from the LAN (from
// local, when valid) over UDP and returns the answer (nil on timeout).
func (tp *topo) dnsQuery(name string, qtype uint16, timeout time.Duration) (*dns.Msg, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout+time.Second)
	defer cancel()
	c, err := tp.lan.DialContext(ctx, "udp", net.JoinHostPort(gwLAN4, "53"))
	if err != nil {
		return nil, err
	}
	defer c.Close()
	m := new(dns.Msg)
	m.SetQuestion(dns.Fqdn(name), qtype)
	m.SetEdns0(1232, false)
	co := &dns.Conn{Conn: c}
	co.SetDeadline(time.Now().Add(timeout))
	if err := co.WriteMsg(m); err != nil {
		return nil, err
	}
	return co.ReadMsg()
}

// quicInitial builds a QUIC v1 Initial datagram (RFC 9000, 9001) carrying
// a real crypto/tls ClientHello for sni, padded to 1200 bytes, protected
// with the Initial keys of a random DCID: what a browser sends first.
func quicInitial(sni string) ([]byte, error) {
	dcid := make([]byte, 8)
	scid := make([]byte, 8)
	rand.Read(dcid)
	rand.Read(scid)
	qc := tls.QUICClient(&tls.QUICConfig{TLSConfig: &tls.Config{ServerName: sni, NextProtos: []string{"h3"}, MinVersion: tls.VersionTLS13, InsecureSkipVerify: true}})
	// Transport parameters: initial_source_connection_id only.
	qc.SetTransportParameters(append([]byte{0x0f, byte(len(scid))}, scid...))
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := qc.Start(ctx); err != nil {
		return nil, err
	}
	defer qc.Close()
	var hello []byte
	for {
		e := qc.NextEvent()
		if e.Kind == tls.QUICNoEvent {
			break
		}
		if e.Kind == tls.QUICWriteData && e.Level == tls.QUICEncryptionLevelInitial {
			hello = append(hello, e.Data...)
		}
	}
	if len(hello) == 0 {
		return nil, errors.New("quic: no ClientHello")
	}
	// Keys (RFC 9001 §5.2).
	salt := []byte{0x38, 0x76, 0x2c, 0xf7, 0xf5, 0x59, 0x34, 0xb3, 0x4d, 0x17, 0x9a, 0xe6, 0xa4, 0xc8, 0x0c, 0xad, 0xcc, 0xbb, 0x7f, 0x0a}
	initial, err := hkdf.Extract(sha256.New, dcid, salt)
	if err != nil {
		return nil, err
	}
	label := func(secret []byte, l string, n int) []byte {
		full := "tls13 " + l
		info := append([]byte{byte(n >> 8), byte(n), byte(len(full))}, full...)
		info = append(info, 0)
		out, err := hkdf.Expand(sha256.New, secret, string(info), n)
		if err != nil {
			panic(err)
		}
		return out
	}
	client := label(initial, "client in", 32)
	key, iv, hp := label(client, "quic key", 16), label(client, "quic iv", 12), label(client, "quic hp", 16)

	// Frames: CRYPTO(0, hello), then PADDING to 1200 bytes on the wire.
	varint := func(b []byte, v int) []byte {
		switch {
		case v < 64:
			return append(b, byte(v))
		case v < 16384:
			return append(b, 0x40|byte(v>>8), byte(v))
		}
		return append(b, 0x80|byte(v>>24), byte(v>>16), byte(v>>8), byte(v))
	}
	payload := varint(varint([]byte{0x06}, 0), len(hello))
	payload = append(payload, hello...)
	hdr := []byte{0xc3, 0, 0, 0, 1, byte(len(dcid))}
	hdr = append(hdr, dcid...)
	hdr = append(append(hdr, byte(len(scid))), scid...)
	hdr = append(hdr, 0) // token length
	const pnLen, tagLen = 4, 16
	if pad := 1200 - (len(hdr) + 2 + pnLen + len(payload) + tagLen); pad > 0 {
		payload = append(payload, make([]byte, pad)...)
	}
	hdr = varint(hdr, pnLen+len(payload)+tagLen)
	if len(hdr) < 2 || hdr[len(hdr)-2]&0xc0 != 0x40 {
		return nil, errors.New("quic: length field not 2 bytes")
	}
	pnOff := len(hdr)
	hdr = append(hdr, 0, 0, 0, 0) // packet number 0
	blk, _ := aes.NewCipher(key)
	aead, _ := cipher.NewGCM(blk)
	ct := aead.Seal(nil, iv, payload, hdr) // nonce = iv XOR 0
	hpb, _ := aes.NewCipher(hp)
	mask := make([]byte, 16)
	hpb.Encrypt(mask, ct[4-pnLen:4-pnLen+16])
	pkt := append(append([]byte(nil), hdr...), ct...)
	pkt[0] ^= mask[0] & 0x0f
	for i := 0; i < pnLen; i++ {
		pkt[pnOff+i] ^= mask[1+i]
	}
	return pkt, nil
}

// rss returns egressd's VmRSS and VmHWM in KiB, and its thread count.
func (d *daemon) rss() (rssKB, hwmKB, threads int) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", d.proc.Cmd.Process.Pid))
	if err != nil {
		return 0, 0, 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		v, _ := strconv.Atoi(f[1])
		switch f[0] {
		case "VmRSS:":
			rssKB = v
		case "VmHWM:":
			hwmKB = v
		case "Threads:":
			threads = v
		}
	}
	return
}

// fds returns the number of egressd's open file descriptors.
func (d *daemon) fds() int {
	ents, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", d.proc.Cmd.Process.Pid))
	return len(ents)
}

// testRanges are the only addresses tests may give a host (the project's
// network rule).
var testRanges = []netip.Prefix{
	netip.MustParsePrefix("198.18.0.0/15"),
	netip.MustParsePrefix("192.0.2.0/24"),
	netip.MustParsePrefix("198.51.100.0/24"),
	netip.MustParsePrefix("203.0.113.0/24"),
	netip.MustParsePrefix("2001:db8::/32"),
}

func testRange(a netip.Addr) bool {
	for _, p := range testRanges {
		if p.Contains(a.Unmap()) {
			return true
		}
	}
	return false
}

// settle waits until the witness's counters have not moved for 300 ms (2 s
// at most): a baseline connection is complete for the client before the
// witness's accept loop has counted it, and a late count must not be taken
// for a connection made while egressd enforces.
func (w *witness) settle() {
	deadline := time.Now().Add(2 * time.Second)
	last, lastU, since := w.tcp.Load(), w.udp.Load(), time.Now()
	for time.Now().Before(deadline) && time.Since(since) < 300*time.Millisecond {
		time.Sleep(20 * time.Millisecond)
		if t, u := w.tcp.Load(), w.udp.Load(); t != last || u != lastU {
			last, lastU, since = t, u, time.Now()
		}
	}
}

// settleAfter waits (10 s at most) until the witness has counted tcp
// connections and udp datagrams in all, the probes made before egressd
// starts ("without egressd, ... is reachable"), then settles. The probe's
// connect completes for the client before the witness's accept loop has
// counted it: on a busy box that count could come after settle's 300 ms
// of quiet (which holds at once while nothing has been counted yet), past
// the baseline, and be taken for a connection made while egressd
// enforces. A witness counts from 0 when it is made.
func (w *witness) settleAfter(t *testing.T, tcp, udp int64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for w.tcp.Load() < tcp || w.udp.Load() < udp {
		if time.Now().After(deadline) {
			t.Fatalf("witness: %d TCP connections and %d datagrams counted 10 s after the probes, want %d and %d", w.tcp.Load(), w.udp.Load(), tcp, udp)
		}
		time.Sleep(20 * time.Millisecond)
	}
	w.settle()
}

// echoSample writes a line to about n of conns, spread over them, and
// checks that each echoes it back (the load tests' tunnels to an echo
// origin); it returns how many did.
func echoSample(t *testing.T, conns []net.Conn, n int) int {
	t.Helper()
	echoed := 0
	for i := 0; i < len(conns); i += max(1, len(conns)/n) {
		c := conns[i]
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.WriteString(c, "ping\n"); err != nil {
			t.Errorf("tunnel %d: %v", i, err)
			continue
		}
		buf := make([]byte, 5)
		if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "ping\n" {
			t.Errorf("tunnel %d echo: %q %v", i, buf, err)
			continue
		}
		echoed++
	}
	return echoed
}
