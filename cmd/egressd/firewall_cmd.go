package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"strconv"
	"strings"

	"egressd/firewall"
	"egressd/policy"
)

func init() {
	commands["firewall"] = command{
		"firewall print [--policy FILE | --profile NAME] [--mode audit|enforce] [--lan IFACE,...] [--wan IFACE] ... | firewall remove",
		"show the nftables ruleset egressd would install, or remove egressd's table", cmdFirewall}
}

// defaultProxyPort is the transparent proxy's port when none is given (the
// port of the proxy's documented listen address, [::]:15001).
const defaultProxyPort = 15001

func cmdFirewall(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprintln(stderr, "usage: egressd "+commands["firewall"].usage)
		return exitUsage
	}
	switch args[0] {
	case "print":
		return cmdFirewallPrint(args[1:], stdout, stderr)
	case "remove":
		return cmdFirewallRemove(args[1:], stdout, stderr)
	}
	fmt.Fprintf(stderr, "egressd firewall: unknown subcommand %q (expected print or remove)\n", args[0])
	return exitUsage
}

func cmdFirewallPrint(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("firewall print", stderr)
	file := fs.String("policy", "", "policy file (default: the embedded profile)")
	profile := fs.String("profile", "nirovision", "embedded profile, when no --policy is given")
	mode := fs.String("mode", "", "audit or enforce (default: the policy's mode)")
	lan := fs.String("lan", "", "LAN interfaces, comma-separated (required in enforce mode)")
	wan := fs.String("wan", "", "WAN interface (new connections arriving there are dropped in enforce mode)")
	proxyPort := fs.Uint("proxy-port", defaultProxyPort, "transparent proxy port that LAN TCP is redirected to")
	proxyPort6 := fs.Uint("proxy-port6", 0, "transparent proxy port for IPv6 (default: --proxy-port)")
	dnsPort := fs.Uint("dns-port", firewall.DefaultDNSPort, "DNS forwarder port that LAN DNS is redirected to")
	var tcpPorts string
	tcpPortsFlag(fs, &tcpPorts)
	masq := fs.Bool("masquerade", false, "NAT traffic leaving the WAN interface")
	guard := fs.Bool("guard-wan", false, "drop new connections from the WAN side in audit mode too")
	wanOpen := fs.String("wan-open", "", "ports of the gateway reachable from the WAN side, such as 22/tcp,51820/udp")
	markBits := fs.String("ct-mark-bits", defaultCTMarkBits, ctMarkBitsUsage)
	var nat64 string
	nat64Flag(fs, &nat64)
	var fast bool
	var fastPorts string
	fastPathFlags(fs, &fast, &fastPorts)
	pos, err := parseArgs(fs, args)
	if err != nil {
		return flagErr(err)
	}
	if len(pos) != 0 {
		fmt.Fprintln(stderr, "usage: egressd "+commands["firewall"].usage)
		return exitUsage
	}
	if exclusive(fs, stderr, [2]string{"policy", "profile"}) {
		return exitUsage
	}
	lans, err := parseLANs(*lan)
	if err == nil {
		err = lansNameWAN(lans, *wan, " (--wan)")
	}
	if err != nil {
		fmt.Fprintln(stderr, "egressd firewall print: --lan:", err)
		return exitUsage
	}
	cfg := firewall.Config{LANs: lans, WAN: *wan, Masquerade: *masq, GuardWAN: *guard}
	for _, p := range []struct {
		name string
		v    uint
		dst  *uint16
	}{{"proxy-port", *proxyPort, &cfg.ProxyPort}, {"proxy-port6", *proxyPort6, &cfg.ProxyPort6}, {"dns-port", *dnsPort, &cfg.DNSPort}} {
		if p.v > 65535 {
			fmt.Fprintf(stderr, "egressd firewall print: --%s %d is not a port\n", p.name, p.v)
			return exitUsage
		}
		*p.dst = uint16(p.v)
	}
	var ok bool
	if cfg.TCPPorts, ok = tcpPortsList("firewall print", tcpPorts, stderr); !ok {
		return exitUsage
	}
	if cfg.WANOpen, err = parsePortProtos(*wanOpen); err != nil {
		fmt.Fprintln(stderr, "egressd firewall print: --wan-open:", err)
		return exitUsage
	}
	if cfg.CTMarkBits, err = parseCTMarkBits(*markBits); err != nil {
		fmt.Fprintln(stderr, "egressd firewall print: --ct-mark-bits:", err)
		return exitUsage
	}
	if !fast && given(fs, "fast-path-ports") {
		fmt.Fprintln(stderr, "egressd firewall print:", errFastPortsAlone)
		return exitUsage
	}
	if fast {
		// egressd run --fast-path's chain, queue and marks, as it
		// installs them.
		if cfg.FastPathPorts, err = parseFastPorts(fastPorts); err != nil {
			fmt.Fprintln(stderr, "egressd firewall print: --fast-path-ports:", err)
			return exitUsage
		}
		cfg.FastPath = true
	}
	nat, ok := nat64Prefixes("firewall print", nat64, stderr)
	if !ok {
		return exitUsage
	}
	src := *file
	if src == "" {
		src = "profile:" + *profile
	}
	eng, err := loadEngine(src, stderr)
	if err != nil {
		printLoadErr(stderr, err)
		return exitFail
	}
	eng = eng.WithNAT64(nat)
	if *mode != "" {
		m, ok := policy.ParseMode(*mode)
		if !ok {
			fmt.Fprintf(stderr, "egressd firewall print: --mode %q: expected audit or enforce\n", *mode)
			return exitUsage
		}
		eng = eng.WithMode(m)
	}
	if eng.Mode() == policy.ModeEnforce && len(cfg.LANs) == 0 {
		// egressd run guesses a LAN interface; firewall print prints for
		// a host it may not run on, so it is told.
		fmt.Fprintln(stderr, "egressd firewall print: --mode enforce needs --lan IFACE: the enforce ruleset names the LAN interfaces")
		return exitUsage
	}
	if err := cfg.Validate(eng.Mode()); err != nil {
		// The flags, with the mode: --mode enforce without --lan, say.
		fmt.Fprintln(stderr, "egressd:", err)
		return exitUsage
	}
	if cfg.FastPath && eng.Mode() != policy.ModeEnforce {
		fmt.Fprintln(stderr, "egressd firewall print: warning: --fast-path: audit mode has no fast path (enforce only)")
	}
	if err := cfg.CheckTags(eng); err != nil {
		fmt.Fprintln(stderr, "egressd firewall print: warning: --ct-mark-bits:", err, "(rules will share conntrack mark tags)")
	}
	rs, err := firewall.Render(cfg, eng)
	if err != nil {
		fmt.Fprintln(stderr, "egressd:", err)
		return exitFail
	}
	fmt.Fprintf(stdout, "# egressd firewall, mode %s, policy %s\n", rs.Mode, src)
	if rs.Mode == policy.ModeAudit {
		if cfg.GuardWAN && cfg.WAN != "" {
			// The guard drops: "nothing is blocked" would not be true.
			fmt.Fprintln(stdout, "# audit: LAN traffic is not redirected or blocked (capture observes the LAN passively); new connections from the WAN side are dropped (--guard-wan)")
		} else {
			fmt.Fprintln(stdout, "# audit: nothing is redirected or blocked; capture observes the LAN passively")
		}
	}
	fmt.Fprint(stdout, rs.String())
	return exitOK
}

// defaultCTMarkBits is --ct-mark-bits' default: firewall.DefaultCTMarkBits.
const defaultCTMarkBits = "0x007ff000"

const ctMarkBitsUsage = "conntrack mark bits egressd owns, hex: one contiguous run; its highest bit marks the connections enforce lets out, the rest tag their rule (keep it clear of the bits the gateway's own rules use: multi-WAN, wg-quick)"

// parseCTMarkBits parses --ct-mark-bits: hexadecimal, with or without
// 0x, one run of at least two contiguous bits.
func parseCTMarkBits(s string) (uint32, error) {
	h := strings.TrimSpace(s)
	h = strings.TrimPrefix(strings.TrimPrefix(h, "0x"), "0X")
	v, err := strconv.ParseUint(h, 16, 32)
	if err != nil || v == 0 {
		return 0, fmt.Errorf("%q: expected a hexadecimal run of bits such as %s", s, defaultCTMarkBits)
	}
	if err := firewall.CheckCTMarkBits(uint32(v)); err != nil {
		return 0, err
	}
	return uint32(v), nil
}

// parseTCPPorts parses "all" (nil: every port) or a comma-separated list of
// ports and ranges.
func parseTCPPorts(s string) ([]policy.PortRange, error) {
	s = strings.TrimSpace(s)
	if s == "" || s == "all" {
		return nil, nil
	}
	var out []policy.PortRange
	for _, f := range strings.Split(s, ",") {
		pr, err := parsePortRange(strings.TrimSpace(f), policy.TCP)
		if err != nil {
			return nil, err
		}
		out = append(out, pr)
	}
	return out, nil
}

// parsePortProtos parses a comma-separated list of N/proto or N-M/proto.
func parsePortProtos(s string) ([]policy.PortRange, error) {
	var out []policy.PortRange
	for _, f := range strings.Split(s, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		num, proto, _ := strings.Cut(f, "/")
		p, ok := policy.ParseProto(proto)
		if !ok {
			return nil, fmt.Errorf("%q: expected N/tcp, N/udp or N-M/proto", f)
		}
		pr, err := parsePortRange(num, p)
		if err != nil {
			return nil, err
		}
		out = append(out, pr)
	}
	return out, nil
}

func parsePortRange(f string, proto policy.Proto) (policy.PortRange, error) {
	lo, hi, isRange := strings.Cut(f, "-")
	l, err := strconv.ParseUint(lo, 10, 16)
	if err != nil || l == 0 {
		return policy.PortRange{}, fmt.Errorf("%q is not a port or a range N-M", f)
	}
	h := l
	if isRange {
		if h, err = strconv.ParseUint(hi, 10, 16); err != nil || h < l {
			return policy.PortRange{}, fmt.Errorf("%q is not a port or a range N-M", f)
		}
	}
	return policy.PortRange{Lo: uint16(l), Hi: uint16(h), Proto: proto}, nil
}

func cmdFirewallRemove(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("firewall remove", stderr)
	netns := fs.String("netns", "", "network namespace file, such as /var/run/netns/NAME (default: this one)")
	pos, err := parseArgs(fs, args)
	if err != nil {
		return flagErr(err)
	}
	if len(pos) != 0 {
		fmt.Fprintln(stderr, "usage: egressd firewall remove [--netns PATH]")
		return exitUsage
	}
	fw, err := firewall.New(firewall.Config{NetNS: *netns}, firewall.Deps{Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err == nil {
		err = fw.Remove()
		fw.Close()
	}
	if err != nil {
		fmt.Fprintln(stderr, "egressd:", withCapHint(err, currentCapabilities().netAdmin, "CAP_NET_ADMIN to remove the table"))
		return exitFail
	}
	fmt.Fprintf(stdout, "removed table inet %s (if it was there)\n", firewall.TableName)
	return exitOK
}
