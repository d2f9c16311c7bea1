package proxy

import (
	"egressd/policy"
)

// The special-range guard (THREATS.md F1, F2) is policy's
// (Engine.GuardRefuses: Engine.SpecialRange, Engine.CIDRNames), shared
// with capture, which reports in audit mode what the guard would refuse,
// audit --replay, policy explain, and the firewall's guarded sets.

// guardRefuses reports whether the special-range guard refuses in's TCP
// flow to in.Dest under eng's NAT64 prefixes (a NAT64 destination is
// guarded as the IPv4 address it embeds), the gateway's own addresses and
// the configured exceptions: it is in a guarded range no CIDR rule for
// the flow names from inside ("0.0.0.0/0" or "*" do not open loopback;
// "127.0.0.1/32" does).
func (p *Proxy) guardRefuses(eng *policy.Engine, in policy.Input) bool {
	in.Proto = policy.TCP
	_, refused := eng.GuardRefuses(in, p.ownAddrs(), p.cfg.AllowSpecial)
	return refused
}
