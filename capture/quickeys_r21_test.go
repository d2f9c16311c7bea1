package capture

import (
	"net/netip"
	"testing"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"

	"egressd/policy"
)

// TestQUICKeysBounded: a client that opens Initials of one flow to more
// DCIDs before its hello completes than capture keeps the keys of
// (maxQUICKeys more than the first) must not hide its hello. Each DCID
// may be a connection of a server (an Initial with no CRYPTO data is
// enough to start one, RFC 9000 §7), and the client's later Initials of
// it go to the server's chosen DCID under that DCID's keys (RFC 9001
// §5.2), which capture cannot derive from the packet. Before session 30
// (R21) the keys of a sixth DCID were not kept: the hello sent under them
// was never read, and the flow was decided by address, with the name DNS
// gave the address (an allowed one), whatever name the server read.
func TestQUICKeysBounded(t *testing.T) {
	denied := handHello(sniExt(realName))[5:]
	hello := handHello(sniExt(decoyName))[5:]
	server := []byte{7, 7, 7, 7} // the server's chosen connection ID
	type dgram = quicDgram
	// decoys: Initials with no CRYPTO data to n DCIDs, then one to
	// last, then the hello to the server's DCID under last's keys.
	decoys := func(n int, h []byte) []dgram {
		var ds []dgram
		for i := range n {
			ds = append(ds, dgram{true, clientInitial(t, []byte{byte(i + 1), 1, 1, 1, 1, 1, 1, 1}, 0, 0, nil)})
		}
		last := []byte{9, 9, 9, 9, 9, 9, 9, 9}
		return append(ds,
			dgram{true, clientInitial(t, last, 0, 0, nil)},
			dgram{false, clientInitial(t, server, 0, 0, nil)}, // the server's Initial (not opened: server keys)
			dgram{true, clientInitialKeyed(t, quicV1, last, server, nil, 1, 0, h)})
	}
	cases := []quicCase{
		// A Retry, a Version Negotiation: a few DCIDs, each kept.
		{"three DCIDs, the hello under the third's keys to the server's", decoys(2, hello), policy.ReasonAllowed},
		{"five DCIDs, the hello under the fifth's keys to the server's", decoys(4, hello), policy.ReasonAllowed},
		{"six DCIDs, a denied name under the sixth's keys to the server's", decoys(5, denied), ReasonStreamConflict},
		{"six DCIDs, an allowed name under the sixth's keys to the server's", decoys(5, hello), ReasonStreamConflict},
	}
	quicCases(t, cases)
}

// TestQUICKeysCharged: the Initial keys a QUIC flow keeps beyond its
// first DCID's (quicOpener.more) are counted in the capture buffers'
// bound (MaxStreamBytes, proc.streamBytes), and freed with the flow.
// Before session 30 (R21) they were not: a client that sent Initials with
// no CRYPTO data to five DCIDs on each of 65,536 flows made capture hold
// about 400 MiB of keys outside the 64 MiB bound.
func TestQUICKeysCharged(t *testing.T) {
	r := newGuardRig(t, policy.ModeAudit)
	srv := netip.MustParseAddr("203.0.113.10")
	const n = 100
	for i := range n {
		cli := netip.AddrFrom4([4]byte{198, 18, 5, byte(10 + i)})
		for d := range 1 + maxQUICKeys {
			r.liveIP(false, ipLayer(cli, srv, layers.IPProtocolUDP),
				&layers.UDP{SrcPort: 40000, DstPort: 443}, gopacket.Payload(clientInitial(t, []byte{byte(d), 2, 3, 4}, 0, 0, nil)))
		}
	}
	if held, want := r.c.proc.streamBytes, n*maxQUICKeys*quicKeyCost; held < want {
		t.Errorf("%d bytes held, want at least %d (%d flows, %d keys more each)", held, want, n, maxQUICKeys)
	}
	r.c.proc.flush("shutdown")
	if held := r.c.proc.streamBytes; held != 0 {
		t.Errorf("%d bytes held after the flows ended, want 0", held)
	}
}
