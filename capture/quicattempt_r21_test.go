package capture

import (
	"bytes"
	"testing"

	"egressd/policy"
)

// TestQUICAttemptRetry: a new connection from a flow's port after the
// decision (quic-go's Transport) whose server sends a Retry after the
// first of its hello's two Initials, as the first connection's may
// (TestQUICNewAttempt, "retry after the first of two Initials"): the
// client sends the whole hello again to the Retry's DCID, under its
// keys, and the rest perhaps to the server's chosen DCID under them too.
func TestQUICAttemptRetry(t *testing.T) {
	hello := handHello(sniExt(decoyName))[5:]
	again := bytes.Clone(hello)
	again[10] ^= 0xff // the second connection's hello: another random
	denied := handHello(sniExt(realName))[5:]
	dcid1, dcid2 := []byte{1, 2, 3, 4, 5, 6, 7, 8}, []byte{9, 9, 9, 9, 9, 9, 9, 9}
	retry, server := []byte{6, 6, 6, 6, 6, 6, 6, 6}, []byte{7, 7, 7, 7}
	token := []byte("a retry token")
	type dgram = quicDgram
	first := func(second []byte) []dgram {
		return []dgram{
			{true, clientInitialV(t, quicV1, dcid1, nil, 0, 0, hello)},
			{true, clientInitialV(t, quicV1, dcid2, nil, 0, 0, second[:20])},
			{false, retryPacket(retry, token)},
		}
	}
	cases := []quicCase{
		{"the whole hello again to the Retry's DCID", append(first(again),
			dgram{true, clientInitialV(t, quicV1, retry, token, 1, 0, again)}), policy.ReasonAllowed},
		{"part to the Retry's DCID, the rest to the server's under its keys", append(first(again),
			dgram{true, clientInitialV(t, quicV1, retry, token, 1, 0, again[:15])},
			dgram{true, clientInitialKeyed(t, quicV1, retry, server, token, 2, 15, again[15:])}), policy.ReasonAllowed},
		{"another hello to the Retry's DCID", append(first(again),
			dgram{true, clientInitialV(t, quicV1, retry, token, 1, 0, denied)}), ReasonStreamConflict},
		{"the hello again to the Retry's DCID, then another to the server's under its keys", append(first(again),
			dgram{true, clientInitialV(t, quicV1, retry, token, 1, 0, again)},
			dgram{true, clientInitialKeyed(t, quicV1, retry, server, token, 2, 0, denied)}), ReasonStreamConflict},
		{"the hello again to the Retry's DCID, then another under the first attempt's keys", append(first(again),
			dgram{true, clientInitialV(t, quicV1, retry, token, 1, 0, again)},
			dgram{true, clientInitialV(t, quicV1, dcid2, nil, 1, 0, denied)}), ReasonStreamConflict},
		{"Initials with no CRYPTO data to five more DCIDs, then the rest of the hello", append(append(first(again), func() []dgram {
			var ds []dgram
			for i := range 5 {
				ds = append(ds, dgram{true, clientInitial(t, []byte{byte(i + 1), 5, 5, 5}, 0, 0, nil)})
			}
			return ds
		}()...), dgram{true, clientInitialV(t, quicV1, dcid2, nil, 1, 20, again[20:])}), ReasonStreamConflict},
		{"Initials with no CRYPTO data to four more DCIDs, then the rest of the hello", append(append(first(again), func() []dgram {
			var ds []dgram
			for i := range 3 { // and the Retry's
				ds = append(ds, dgram{true, clientInitial(t, []byte{byte(i + 1), 5, 5, 5}, 0, 0, nil)})
			}
			return append(ds, dgram{true, clientInitialV(t, quicV1, retry, token, 1, 0, nil)})
		}()...), dgram{true, clientInitialV(t, quicV1, dcid2, nil, 1, 20, again[20:])}), policy.ReasonAllowed},
	}
	quicCases(t, cases)
}
