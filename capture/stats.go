package capture

import "sync/atomic"

// counters are the pipeline's counters: written by the one goroutine that
// runs the pipeline, read by Stats and the metrics collector.
type counters struct {
	packets, bytes, malformed, notIP            atomic.Uint64
	captured                                    atomic.Uint64
	fragments, reassembled, fragDropped         atomic.Uint64
	flows, denied, evicted, updates             atomic.Uint64
	hellos, quicOpened, dnsQueries, dnsAnswers  atomic.Uint64
	panics, badHellos, snapped, own             atomic.Uint64
	streamLimited, requests, unfollowed         atomic.Uint64
	copies, socketErrors, otherVLAN, inbound    atomic.Uint64
	guarded, rpfUnchecked, martian, unforwarded atomic.Uint64
	active                                      atomic.Int64
}

func (c *counters) snapshot() Stats {
	return Stats{
		Packets: c.packets.Load(), Bytes: c.bytes.Load(), CapturedBytes: c.captured.Load(), Malformed: c.malformed.Load(), NotIP: c.notIP.Load(),
		Fragments: c.fragments.Load(), Reassembled: c.reassembled.Load(), FragDropped: c.fragDropped.Load(),
		Flows: c.flows.Load(), Denied: c.denied.Load(), Evicted: c.evicted.Load(), Updates: c.updates.Load(),
		Hellos: c.hellos.Load(), QUICOpened: c.quicOpened.Load(), DNSQueries: c.dnsQueries.Load(), DNSAnswers: c.dnsAnswers.Load(),
		Panics: c.panics.Load(), BadHellos: c.badHellos.Load(), Snapped: c.snapped.Load(), Own: c.own.Load(), Copies: c.copies.Load(),
		StreamLimited: c.streamLimited.Load(), Requests: c.requests.Load(), Unfollowed: c.unfollowed.Load(),
		SocketErrors: c.socketErrors.Load(), OtherVLAN: c.otherVLAN.Load(), Inbound: c.inbound.Load(),
		Guarded: c.guarded.Load(), RPFUnchecked: c.rpfUnchecked.Load(), Martian: c.martian.Load(),
		Unforwarded: c.unforwarded.Load(),
	}
}
