package capture

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/google/go-cmp/cmp"
)

// The real captures live outside the repository (not ours to ship); the
// tests read them in place. They must be there: a missing directory fails.
const pcapDir = "../../shared/pcaps"

// tsharkRow is one line of tshark-counts.tsv.
type tsharkRow struct {
	file                               string
	hellos, distinctSNI                int
	queries, responses, distinctQNames int
	quicPkts, httpHosts                int
}

// tsharkNames is one file's block of sni-and-qnames.txt.
type tsharkNames struct {
	snis   []string
	qnames map[string]int // "name\tqtype" -> queries (top 10 only)
}

func readOracle(t *testing.T) ([]tsharkRow, map[string]*tsharkNames) {
	t.Helper()
	f, err := os.Open(filepath.Join(pcapDir, "tshark-counts.tsv"))
	if err != nil {
		t.Fatalf("the real captures are missing (%v): they are expected in %s, read in place", err, pcapDir)
	}
	defer f.Close()
	var rows []tsharkRow
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Split(sc.Text(), "\t")
		if fs[0] == "file" {
			continue
		}
		if len(fs) != 12 {
			t.Fatalf("tshark-counts.tsv: bad line %q", sc.Text())
		}
		n := func(i int) int {
			v, err := strconv.Atoi(fs[i])
			if err != nil {
				t.Fatalf("tshark-counts.tsv: %q: %v", sc.Text(), err)
			}
			return v
		}
		rows = append(rows, tsharkRow{fs[0], n(3), n(4), n(7), n(8), n(9), n(10), n(11)})
	}
	b, err := os.ReadFile(filepath.Join(pcapDir, "sni-and-qnames.txt"))
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]*tsharkNames{}
	var cur *tsharkNames
	section := ""
	for _, line := range strings.Split(string(b), "\n") {
		switch {
		case strings.HasPrefix(line, "== "):
			cur = &tsharkNames{qnames: map[string]int{}}
			names[strings.TrimPrefix(line, "== ")] = cur
		case strings.HasPrefix(line, "-- SNI"):
			section = "sni"
		case strings.HasPrefix(line, "-- DNS"):
			section = "dns"
		case strings.TrimSpace(line) == "" && section != "dns":
		default:
			fs := strings.SplitN(strings.TrimLeft(line, " "), " ", 2)
			if len(fs) != 2 {
				continue
			}
			cnt, err := strconv.Atoi(fs[0])
			if err != nil {
				t.Fatalf("sni-and-qnames.txt: %q", line)
			}
			if section == "sni" {
				cur.snis = append(cur.snis, fs[1])
			} else {
				cur.qnames[fs[1]] += cnt
			}
		}
	}
	return rows, names
}

// tsharkText renders a wire name the way tshark prints it: control bytes
// as \ooo, bytes that are not UTF-8 as U+FFFD each.
func tsharkText(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); {
		c := s[i]
		if c < 0x20 || c == 0x7f {
			fmt.Fprintf(&b, "\\%03o", c)
			i++
			continue
		}
		r, n := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && n <= 1 {
			b.WriteRune(utf8.RuneError)
			i++
			continue
		}
		b.WriteString(s[i : i+n])
		i += n
	}
	return b.String()
}

// Where capture and tshark 4.0 disagree on purpose. Each entry says why;
// the test checks capture's own value instead of tshark's.
var tsharkDisagrees = map[string]struct {
	hellos, queries int // capture's counts
	httpHosts       int
	why             string
}{
	"ndpi/tls_port_80.pcapng": {hellos: 1, httpHosts: 0,
		why: "tshark is wrong: it dissects TCP/80 as HTTP and never looks for TLS there; capture detects a ClientHello by its bytes on any port (this one has no SNI)"},
	"ndpi/doq.pcapng": {hellos: 1, queries: 0,
		why: "tshark is wrong: it decodes QUIC packets on UDP/853 (DoQ), which are encrypted, as 14 DNS queries with empty names; capture decrypts the Initial packets, finds the one ClientHello (no SNI) and sees no cleartext DNS"},
}

func TestRealCapturesMatchTshark(t *testing.T) {
	rows, names := readOracle(t)
	if len(rows) < 38 {
		t.Fatalf("tshark-counts.tsv lists %d files, want at least 38", len(rows))
	}
	for _, row := range rows {
		t.Run(row.file, func(t *testing.T) {
			path := filepath.Join(pcapDir, row.file)
			if _, err := os.Stat(path); err != nil {
				t.Fatalf("capture file missing: %v", err)
			}
			res := runFile(t, path, testPolicy, nil)
			if res.err != nil {
				t.Fatalf("ReadFile: %v", res.err)
			}
			if res.stats.Panics != 0 {
				t.Errorf("%d decodes panicked (recovered)", res.stats.Panics)
			}
			hellos, snis := 0, map[string]bool{}
			hosts := map[string]bool{}
			qnames := map[string]bool{}
			qcount := map[string]int{}
			queries := 0
			for _, o := range res.obs {
				switch o.Kind {
				case obsHello:
					hellos++
				case obsSNI, obsQUICSNI:
					snis[o.Name] = true
				case obsHost:
					hosts[o.Name] = true
				case obsDNSQuery:
					queries++
					n := tsharkText(o.Name)
					qnames[n] = true
					qcount[n+"\t"+strconv.Itoa(int(o.QType))]++
				}
			}
			want := row
			wantQueries := row.queries
			if d, ok := tsharkDisagrees[row.file]; ok {
				t.Logf("differs from tshark by design: %s", d.why)
				want.hellos, want.httpHosts = d.hellos, d.httpHosts
				wantQueries = d.queries
				if row.file == "ndpi/doq.pcapng" {
					want.distinctQNames = 0
					names[row.file].qnames = map[string]int{}
				}
			}
			if hellos != want.hellos {
				t.Errorf("ClientHellos: capture %d, want %d", hellos, want.hellos)
			}
			gotSNI := keys(snis)
			wantSNI := append([]string{}, names[row.file].snis...)
			sort.Strings(wantSNI)
			if diff := cmp.Diff(wantSNI, gotSNI, cmp.Comparer(func(a, b []string) bool { return strings.Join(a, ",") == strings.Join(b, ",") })); diff != "" && !(len(wantSNI) == 0 && len(gotSNI) == 0) {
				t.Errorf("SNI values (-tshark +capture):\n%s", diff)
			}
			if len(gotSNI) != want.distinctSNI {
				t.Errorf("distinct SNI: capture %d, tshark %d", len(gotSNI), want.distinctSNI)
			}
			if uint64(wantQueries) != res.stats.DNSQueries || queries < wantQueries {
				t.Errorf("DNS queries: capture %d (%d questions), want %d", res.stats.DNSQueries, queries, wantQueries)
			}
			if int(res.stats.DNSAnswers) != row.responses {
				t.Errorf("DNS responses: capture %d, tshark %d", res.stats.DNSAnswers, row.responses)
			}
			if len(qnames) != want.distinctQNames {
				t.Errorf("distinct query names: capture %d, tshark %d: %q", len(qnames), want.distinctQNames, keys(qnames))
			}
			for k, n := range names[row.file].qnames {
				if qcount[k] != n {
					t.Errorf("queries for %q: capture %d, tshark %d", k, qcount[k], n)
				}
			}
			if len(hosts) != want.httpHosts {
				t.Errorf("HTTP hosts: capture %q, tshark counts %d", keys(hosts), want.httpHosts)
			}
			// One event per flow, and one per later request of a
			// plain-HTTP flow, each with a verdict.
			flows, requests := 0, 0
			for _, ev := range res.events {
				if ev.Verdict == "" || ev.Source != "capture" || !ev.Client.IsValid() {
					t.Errorf("bad event %+v", ev)
				}
				switch {
				case ev.Kind == "flow":
					flows++
				case ev.Kind == "request" && ev.Proto == "tcp" && (ev.Close == "forwarded" || ev.Close == "denied"):
					requests++
				default:
					t.Errorf("bad event %+v", ev)
				}
			}
			if uint64(flows) != res.stats.Flows || uint64(requests) != res.stats.Requests {
				t.Errorf("flow events %d, request events %d; counted %d flows, %d requests", flows, requests, res.stats.Flows, res.stats.Requests)
			}
		})
	}
}

func keys(m map[string]bool) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// The captures THREATS.md names, checked for what capture must do with them
// beyond counting.
func TestRealCaptureCases(t *testing.T) {
	ev1 := func(t *testing.T, res fileResult) (e struct{ name, src, proto string }) {
		t.Helper()
		if len(res.events) != 1 {
			t.Fatalf("want 1 flow, got %d: %+v", len(res.events), res.events)
		}
		ev := res.events[0]
		return struct{ name, src, proto string }{ev.Name, string(ev.NameSource), ev.Proto}
	}
	t.Run("11KB hello over 12 segments", func(t *testing.T) {
		res := runFile(t, filepath.Join(pcapDir, "ndpi/tls_with_huge_ch.pcapng"), testPolicy, nil)
		var sizes []int
		for _, o := range res.obs {
			if o.Kind == obsHello {
				sizes = append(sizes, o.Size)
			}
		}
		if len(sizes) != 1 || sizes[0] < 11000 {
			t.Fatalf("hello sizes %v, want one of about 11 KB", sizes)
		}
		if e := ev1(t, res); e.src != "no-sni" {
			t.Errorf("flow %+v, want name source no-sni (the hello has no server_name)", e)
		}
	})
	t.Run("missing hello segment gives up", func(t *testing.T) {
		res := runFile(t, filepath.Join(pcapDir, "ndpi/tls_missing_ch_frag.pcap"), testPolicy, nil)
		if res.stats.Hellos != 0 {
			t.Errorf("hellos %d, want 0: the second segment is not in the file", res.stats.Hellos)
		}
		if e := ev1(t, res); e.src != "no-sni" || e.name != "" {
			t.Errorf("flow %+v, want no name and source no-sni", e)
		}
	})
	t.Run("QUIC v2", func(t *testing.T) {
		res := runFile(t, filepath.Join(pcapDir, "ndpi/quic-v2.pcapng"), testPolicy, nil)
		if e := ev1(t, res); e != (struct{ name, src, proto string }{"test", "quic-sni", "udp"}) {
			t.Errorf("flow %+v", e)
		}
	})
	t.Run("QUIC hello over several Initial packets", func(t *testing.T) {
		res := runFile(t, filepath.Join(pcapDir, "ndpi/quic_frags_ch_in_multiple_packets.pcapng"), testPolicy, nil)
		if res.stats.QUICOpened < 2 || res.stats.Hellos != 1 {
			t.Errorf("opened %d Initials, %d hellos; want >= 2 and 1", res.stats.QUICOpened, res.stats.Hellos)
		}
		for _, o := range res.obs {
			if o.Kind == obsHello && o.Size < 1200 {
				t.Errorf("hello of %d bytes: it spans packets, so it must be larger than one", o.Size)
			}
		}
	})
	t.Run("TLS on port 80", func(t *testing.T) {
		res := runFile(t, filepath.Join(pcapDir, "ndpi/tls_port_80.pcapng"), testPolicy, nil)
		if res.stats.Hellos != 1 {
			t.Errorf("hellos %d, want 1", res.stats.Hellos)
		}
	})
	t.Run("fragmented DNS answers teach names", func(t *testing.T) {
		res := runFile(t, filepath.Join(pcapDir, "ndpi/dns_fragmented.pcap"), testPolicy, nil)
		if res.stats.Reassembled == 0 || res.stats.Reassembled*2 > res.stats.Fragments {
			t.Errorf("fragments %d, reassembled %d", res.stats.Fragments, res.stats.Reassembled)
		}
	})
	t.Run("malformed DNS", func(t *testing.T) {
		res := runFile(t, filepath.Join(pcapDir, "ndpi/malformed_dns.pcap"), testPolicy, nil)
		if res.stats.DNSQueries != 2 || res.stats.DNSAnswers != 4 {
			t.Errorf("queries %d answers %d, want 2 and 4", res.stats.DNSQueries, res.stats.DNSAnswers)
		}
	})
}
