package policy

import (
	"fmt"
	"net/netip"
	"slices"
	"testing"
	"time"
)

// FuzzCompile feeds arbitrary bytes to Parse and Compile: they must return
// a policy or an *Error, never panic, and every problem must carry the file.
func FuzzCompile(f *testing.F) {
	f.Add([]byte(matchPolicy))
	f.Add([]byte("rules:\n  - {name: a, to: [\"*.a.test\"], ports: [443/tcp]}\n"))
	// A host/path rule with a glob class in the path.
	f.Add([]byte("rules:\n  - {name: a, to: [\"a.test/x/[ab]*\"], ports: [80/tcp]}\n"))
	// Unicode patterns: fullwidth, eszett, ZWJ.
	f.Add([]byte("rules:\n  - {name: a, to: [\"ｅｘａｍｐｌｅ．ｃｏｍ\", \"faß.de\", \"a\u200db.c\"], ports: [any]}\n"))
	// Broken YAML, anchors and aliases.
	f.Add([]byte("rules: &a [*a]\n"))
	f.Add([]byte("groups: {g: [aa:bb:cc:dd:ee:ff]}\nrules:\n  - {name: a, from: [g], to: [\"::/0\"], ports: [1-65535/udp]}\n"))
	f.Add([]byte("rules:\n  - {name: a, to: [198.51.100.0/24, a.test], ports: [icmp, 7/icmp, icmp/udp]}\n"))
	f.Fuzz(func(t *testing.T, src []byte) {
		// A watchdog: a hang in the YAML decoder or the linter is a bug too.
		tm := time.AfterFunc(2*time.Second, func() { panic(fmt.Sprintf("slow input %q", src)) })
		defer tm.Stop()
		e, err := Compile("fuzz.yaml", src)
		if err != nil {
			pe, ok := err.(*Error)
			if !ok || len(pe.Problems) == 0 {
				t.Fatalf("error of type %T without problems: %v", err, err)
			}
			return
		}
		for _, r := range e.Rules() {
			if r.Name == "" || len(r.To) == 0 || len(r.Ports) == 0 {
				t.Fatalf("compiled an incomplete rule %+v", r)
			}
		}
		e.Decide(Input{Name: "a.test", Port: 443, Proto: TCP})
	})
}

// FuzzDecide checks Decide against a slow reference on arbitrary names,
// addresses, ports and paths, with and without NoPath: the credited rule
// must be the first rule in file order that allows the flow.
func FuzzDecide(f *testing.F) {
	// matchPolicy and a rule for ICMP echo, which a UDP flow to port 0
	// stands for below.
	e, err := Compile("fuzz.yaml", []byte(matchPolicy+fuzzICMPRule))
	if err != nil {
		f.Fatal(err)
	}
	f.Add("status.nirovision.com", []byte{198, 51, 100, 1}, uint16(0), false, "", []byte{192, 168, 10, 5}, false)
	f.Add("api.nirovision.com", []byte{17, 1, 2, 3}, uint16(443), true, "", []byte{192, 168, 10, 5}, false)
	f.Add("A.B.CDN-1.EXAMPLE.ORG.", []byte{}, uint16(443), true, "", []byte{}, false)
	f.Add("notion.so", []byte{}, uint16(80), true, "/nirovision/x", []byte{}, false)
	f.Add("notion.so", []byte{}, uint16(80), true, "", []byte{}, true)
	f.Add("xn--fa-hia.de", []byte{0x20, 0x01, 0x0d, 0xb8, 0, 0x17, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1}, uint16(443), true, "", []byte{}, false)
	f.Add("\xff\x00", []byte{10, 0, 0, 1}, uint16(7001), false, "", []byte{198, 51, 100, 7}, false)
	// Private Relay's ingress at an address the apple rule's CIDR holds,
	// and through the "*" rule's client: refused (private-relay).
	f.Add("mask-h2.icloud.com", []byte{17, 253, 1, 2}, uint16(443), true, "", []byte{}, false)
	f.Add("MASK.icloud.com.", []byte{}, uint16(53), false, "", []byte{198, 51, 100, 7}, false)
	f.Add("mask-h2.icloud.com", []byte{17, 253, 1, 2}, uint16(443), true, "", []byte{192, 168, 20, 5}, false) // the relay rule's client
	f.Fuzz(func(t *testing.T, name string, dst []byte, port uint16, tcp bool, path string, client []byte, noPath bool) {
		in := Input{Name: name, Port: port, Proto: UDP, Path: path, NoPath: noPath}
		if tcp {
			in.Proto = TCP
		} else if port == 0 {
			in.Proto = ICMP
		}
		in.Dest, _ = netip.AddrFromSlice(dst)
		in.Client, _ = netip.AddrFromSlice(client)
		d := e.Decide(in)
		want := referenceDecide(e, in)
		if (d.Verdict == Allow) != (want >= 0) || (want >= 0 && d.RuleIndex != want) {
			t.Fatalf("Decide(%+v) = %+v, reference says rule %d", in, d, want)
		}
		if got, want := e.NameRules(in, 0, nil), referenceNameRules(e, in); !slices.Equal(got, want) {
			t.Fatalf("NameRules(%+v) = %v, reference says %v", in, got, want)
		}
	})
}

// referenceNameRules is NameRules the obvious way: every rule, in order,
// whose names (or "*") let the client resolve the name.
func referenceNameRules(e *Engine, in Input) []int {
	name, ok := NormalizeName(in.Name)
	relay := ok && IsPrivateRelay(name)
	var out []int
	for i, r := range e.Rules() {
		if !r.Expires.IsZero() || !r.From.Contains(in.Client, in.ClientMAC) {
			continue // the fixture's only expiring rule expired in 2020
		}
		for _, t := range r.To {
			m := t.Kind == TargetAny && !relay
			if (t.Kind == TargetName || t.Kind == TargetHostPath) && ok && in.Name != "" {
				g, _ := compileNameGlob(t.Pattern)
				m = g.Match(name) && (!relay || t.Pattern == name)
			}
			if m {
				out = append(out, i)
				break
			}
		}
	}
	return out
}

// referenceDecide is the obvious, slow implementation: every rule in order,
// every target matched on its own. Private Relay's names (relay.go) match
// only targets that name them exactly.
func referenceDecide(e *Engine, in Input) int {
	name, nameOK := NormalizeName(in.Name)
	relay := nameOK && IsPrivateRelay(name)
	dest := in.Dest.Unmap()
	for i, r := range e.Rules() {
		if !r.Expires.IsZero() && !in.Now.IsZero() && !in.Now.Before(r.Expires) {
			continue
		}
		if !r.Expires.IsZero() && in.Now.IsZero() {
			continue // the fixture's only expiring rule expired in 2020
		}
		if !r.From.Contains(in.Client, in.ClientMAC) {
			continue
		}
		portOK := false
		for _, p := range r.Ports {
			portOK = portOK || p.Contains(in.Port, in.Proto)
		}
		if !portOK {
			continue
		}
		for _, t := range r.To {
			ok := false
			switch t.Kind {
			case TargetAny:
				ok = !relay
			case TargetPrefix:
				ok = !relay && dest.IsValid() && t.Prefix.Contains(dest)
			case TargetName, TargetHostPath:
				if !nameOK || in.Name == "" {
					break
				}
				g, _ := compileNameGlob(t.Pattern)
				ok = g.Match(name) && (!relay || t.Pattern == name)
				if ok && t.Kind == TargetHostPath && in.NoPath {
					ok = false // no path seen: a host/path target cannot match
				} else if ok && t.Kind == TargetHostPath && in.Path != "" {
					ok = t.path.Match(in.Path)
				}
			}
			if ok {
				return i
			}
		}
	}
	return -1
}

const fuzzICMPRule = `  - name: ping
    from: [192.168.10.0/24]
    to: [198.51.100.0/24, "*.nirovision.com"]
    ports: [icmp, 7001/udp]
`
