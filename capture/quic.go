package capture

// QUIC Initial packets are encrypted with keys anyone can derive from the
// client's first Destination Connection ID (RFC 9001 §5.2; RFC 9369 §3.3
// for QUIC v2). Capture derives them, removes header protection, opens the
// packet and reads the CRYPTO frames, whose stream carries the TLS
// ClientHello (without the TLS record layer). The hello may span several
// Initial packets and arrive out of order; the flow's stream reassembles it.

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"time"
)

// QUIC versions capture can open.
const (
	quicV1      = 0x00000001
	quicV2      = 0x6b3343cf
	quicDraft29 = 0xff00001d
	quicDraft32 = 0xff000020
)

var (
	saltV1      = []byte{0x38, 0x76, 0x2c, 0xf7, 0xf5, 0x59, 0x34, 0xb3, 0x4d, 0x17, 0x9a, 0xe6, 0xa4, 0xc8, 0x0c, 0xad, 0xcc, 0xbb, 0x7f, 0x0a}
	saltV2      = []byte{0x0d, 0xed, 0xe3, 0xde, 0xf7, 0x00, 0xa6, 0xdb, 0x81, 0x93, 0x81, 0xbe, 0x6e, 0x26, 0x9d, 0xcb, 0xf9, 0xbd, 0x2e, 0xd9}
	saltDraft29 = []byte{0xaf, 0xbf, 0xec, 0x28, 0x99, 0x93, 0xd2, 0x4c, 0x9e, 0x97, 0x86, 0xf1, 0x9c, 0x61, 0x11, 0xe0, 0x43, 0x90, 0xa8, 0x99}

	errQUICShort   = errors.New("capture: QUIC packet too short")
	errQUICVersion = errors.New("capture: QUIC version not supported")
	errQUICOpen    = errors.New("capture: QUIC Initial does not decrypt")
	errQUICFrame   = errors.New("capture: QUIC Initial frame malformed")
)

// quicKeys are the client's Initial packet protection keys.
type quicKeys struct {
	version uint32
	dcid    [20]byte
	dcidLen int
	aead    cipher.AEAD
	iv      [12]byte
	hp      cipher.Block
}

// quicSupported reports whether capture can derive Initial keys for v.
func quicSupported(v uint32) bool {
	return v == quicV1 || v == quicV2 || (v >= quicDraft29 && v <= quicDraft32)
}

// hkdfExpandLabel is TLS 1.3's HKDF-Expand-Label with an empty context.
func hkdfExpandLabel(secret []byte, label string, n int) []byte {
	full := "tls13 " + label
	info := make([]byte, 0, 4+len(full))
	info = append(info, byte(n>>8), byte(n), byte(len(full)))
	info = append(info, full...)
	info = append(info, 0)
	out, err := hkdf.Expand(sha256.New, secret, string(info), n)
	if err != nil {
		panic(err) // only for lengths beyond 255*32, which we never ask
	}
	return out
}

// initialKeys derives the client Initial keys for a version and DCID.
func initialKeys(version uint32, dcid []byte) (*quicKeys, error) {
	if len(dcid) > 20 {
		return nil, errQUICShort
	}
	salt, kl, il, hl := saltV1, "quic key", "quic iv", "quic hp"
	switch {
	case version == quicV2:
		salt, kl, il, hl = saltV2, "quicv2 key", "quicv2 iv", "quicv2 hp"
	case version >= quicDraft29 && version <= quicDraft32:
		salt = saltDraft29
	case version != quicV1:
		return nil, errQUICVersion
	}
	initial, err := hkdf.Extract(sha256.New, dcid, salt)
	if err != nil {
		return nil, err
	}
	client := hkdfExpandLabel(initial, "client in", 32)
	k := &quicKeys{version: version, dcidLen: len(dcid)}
	copy(k.dcid[:], dcid)
	blk, err := aes.NewCipher(hkdfExpandLabel(client, kl, 16))
	if err != nil {
		return nil, err
	}
	if k.aead, err = cipher.NewGCM(blk); err != nil {
		return nil, err
	}
	copy(k.iv[:], hkdfExpandLabel(client, il, 12))
	if k.hp, err = aes.NewCipher(hkdfExpandLabel(client, hl, 16)); err != nil {
		return nil, err
	}
	return k, nil
}

// varint reads a QUIC variable-length integer (RFC 9000 §16).
func varint(b []byte) (uint64, int, bool) {
	if len(b) == 0 {
		return 0, 0, false
	}
	n := 1 << (b[0] >> 6)
	if len(b) < n {
		return 0, 0, false
	}
	v := uint64(b[0] & 0x3f)
	for i := 1; i < n; i++ {
		v = v<<8 | uint64(b[i])
	}
	return v, n, true
}

// isQUICInitial reports whether a UDP payload starts with a long-header
// Initial packet of a version capture can open.
func isQUICInitial(p []byte) bool {
	if len(p) < 7 || p[0]&0xc0 != 0xc0 {
		return false
	}
	v := binary.BigEndian.Uint32(p[1:5])
	if !quicSupported(v) {
		return false
	}
	return quicType(p[0], v) == 0
}

// quicType returns the long-header packet type in v1 numbering
// (0 Initial, 1 0-RTT, 2 Handshake, 3 Retry).
func quicType(b0 byte, v uint32) int {
	t := int(b0>>4) & 3
	if v == quicV2 { // RFC 9369 §3.2: Initial 01, 0-RTT 10, Handshake 11, Retry 00
		return (t + 3) & 3
	}
	return t
}

// quicOpener opens client Initial packets of one flow. keys caches the keys
// of the flow's first Initial: later client Initials may carry another DCID
// (the server's choice) but keep the original keys. more caches the keys
// of each other DCID an Initial of the flow opened under, a few at most:
// after a Retry the client's Initials to the server's chosen DCID keep the
// keys of the Retry's DCID (RFC 9001 §5.2), and the server may choose its
// DCID before the client sent all of the hello again.
type quicOpener struct {
	keys *quicKeys
	more []*quicKeys
	buf  []byte // scratch for the decrypted packet
	// tooMany: an Initial opened under the keys of one more DCID than
	// keys and more hold. Its connection's later Initials, to the
	// server's chosen DCID under those keys, could not be opened: the
	// hello its server reads is not known (proc.quicPacket).
	tooMany bool

	established bool           // a client Initial opened: the flow's direction is known
	pending     []pendingDgram // Initials that did not open yet

	// noDerive: open only with keys, derive none from a packet's DCID
	// (openWith).
	noDerive bool

	// next reassembles the hello of a new attempt, opened with nextKeys
	// (its version, its DCID), after the flow was decided
	// (proc.quicAttempt).
	// nextMore: the keys of other DCIDs its Initials opened under (a
	// Retry's), maxQUICKeys at most.
	next     *stream
	nextKeys *quicKeys
	nextMore []*quicKeys
	nextAt   time.Time
}

// openWith is open with k alone: a packet that k does not open is not
// opened (it belongs to another connection on the flow's addresses).
func (o *quicOpener) openWith(k *quicKeys, dgram []byte, crypto func(off uint64, data []byte)) (int, error) {
	keep := o.keys
	o.keys, o.noDerive = k, true
	defer func() { o.keys, o.noDerive = keep, false }()
	return o.open(dgram, crypto)
}

// opens reports whether k opens a client Initial of dgram (openWith).
func (o *quicOpener) opens(k *quicKeys, dgram []byte) bool {
	n, _ := o.openWith(k, dgram, func(uint64, []byte) {})
	return n > 0
}

// firstDCID returns the DCID of the first packet of dgram, a long-header
// datagram, and false where the header is too short for one.
func firstDCID(dgram []byte) ([]byte, bool) {
	if len(dgram) < 6 || dgram[5] > 20 || len(dgram) < 6+int(dgram[5]) {
		return nil, false
	}
	return dgram[6 : 6+int(dgram[5])], true
}

// is reports whether k are the keys of version v and DCID dcid.
func (k *quicKeys) is(v uint32, dcid []byte) bool {
	return k.version == v && bytes.Equal(k.dcid[:k.dcidLen], dcid)
}

// maxQUICPending bounds the Initials kept while no Initial has opened.
const maxQUICPending = 4

// quicKeyCost is about the heap a quicKeys holds (two AES key schedules
// and a GCM: 1,292 bytes measured on amd64), counted in proc.streamBytes
// for each but a flow's first (proc.charge): a client that sends Initials
// to a few DCIDs on each of many flows holds keys that add up.
const quicKeyCost = 1300

// maxQUICKeys bounds quicOpener.more; an Initial of one DCID more is
// stream-conflict (quicOpener.tooMany).
const maxQUICKeys = 4

type pendingDgram struct {
	dir  int
	data []byte
}

// open walks the coalesced long-header packets of a UDP datagram and calls
// crypto for each CRYPTO frame of each client Initial packet that opens.
// It returns how many Initial packets were opened.
func (o *quicOpener) open(dgram []byte, crypto func(off uint64, data []byte)) (int, error) {
	opened := 0
	for len(dgram) > 0 {
		p := dgram
		if len(p) < 7 || p[0]&0x80 == 0 {
			return opened, nil // a short header packet ends the datagram
		}
		v := binary.BigEndian.Uint32(p[1:5])
		if v == 0 || !quicSupported(v) {
			return opened, errQUICVersion
		}
		i := 5
		dl := int(p[i])
		i++
		if dl > 20 || len(p) < i+dl+1 {
			return opened, errQUICShort
		}
		dcid := p[i : i+dl]
		i += dl
		sl := int(p[i])
		i++
		if sl > 20 || len(p) < i+sl {
			return opened, errQUICShort
		}
		i += sl
		typ := quicType(p[0], v)
		if typ == 3 {
			return opened, nil // Retry: nothing to open
		}
		if typ == 0 {
			tl, n, ok := varint(p[i:])
			if !ok || tl > uint64(len(p)) {
				return opened, errQUICShort
			}
			i += n + int(tl)
			if i > len(p) {
				return opened, errQUICShort
			}
		}
		length, n, ok := varint(p[i:])
		if !ok {
			return opened, errQUICShort
		}
		i += n
		pnOff := i
		if length > uint64(len(p)-pnOff) || length < 20 {
			return opened, errQUICShort
		}
		end := pnOff + int(length)
		dgram = p[end:]
		if typ != 0 {
			continue
		}
		if err := o.openOne(p[:end], pnOff, v, dcid, crypto); err != nil {
			return opened, err
		}
		opened++
	}
	return opened, nil
}

func (o *quicOpener) openOne(pkt []byte, pnOff int, v uint32, dcid []byte, crypto func(uint64, []byte)) error {
	try := func(k *quicKeys) ([]byte, bool) {
		o.buf = append(o.buf[:0], pkt...)
		b := o.buf
		var mask [16]byte
		k.hp.Encrypt(mask[:], b[pnOff+4:pnOff+20])
		b[0] ^= mask[0] & 0x0f
		pnLen := int(b[0]&3) + 1
		var pn uint64
		for j := 0; j < pnLen; j++ {
			b[pnOff+j] ^= mask[1+j]
			pn = pn<<8 | uint64(b[pnOff+j])
		}
		var nonce [12]byte
		nonce = k.iv
		for j := 0; j < 8; j++ {
			nonce[11-j] ^= byte(pn >> (8 * j))
		}
		hdr := b[:pnOff+pnLen]
		payload := b[pnOff+pnLen:]
		if len(payload) < k.aead.Overhead() {
			return nil, false
		}
		out, err := k.aead.Open(payload[:0], nonce[:], payload, hdr)
		return out, err == nil
	}
	var plain []byte
	ok := false
	if o.keys != nil && o.keys.version == v {
		plain, ok = try(o.keys)
	}
	if !ok && o.noDerive {
		return errQUICOpen
	}
	for i := 0; !ok && i < len(o.more); i++ {
		if o.more[i].version == v {
			plain, ok = try(o.more[i])
		}
	}
	if !ok {
		k, err := initialKeys(v, dcid)
		if err != nil {
			return err
		}
		if plain, ok = try(k); !ok {
			return errQUICOpen
		}
		switch {
		case o.keys == nil:
			o.keys = k
		case len(o.more) < maxQUICKeys:
			o.more = append(o.more, k)
		default:
			o.tooMany = true
		}
	}
	return quicFrames(plain, crypto)
}

// quicFrames walks the frames of a decrypted Initial packet (only PADDING,
// PING, ACK, CRYPTO and CONNECTION_CLOSE may appear there, RFC 9000 §17.2.2).
func quicFrames(b []byte, crypto func(uint64, []byte)) error {
	for len(b) > 0 {
		t := b[0]
		b = b[1:]
		switch {
		case t == 0x00 || t == 0x01: // PADDING, PING
		case t == 0x02 || t == 0x03: // ACK
			cnt := 4
			var rc uint64
			for j := 0; j < cnt; j++ {
				v, n, ok := varint(b)
				if !ok {
					return errQUICFrame
				}
				b = b[n:]
				if j == 2 {
					rc = v
				}
			}
			if rc > uint64(len(b)) {
				return errQUICFrame
			}
			extra := int(rc) * 2
			if t == 0x03 {
				extra += 3
			}
			for j := 0; j < extra; j++ {
				_, n, ok := varint(b)
				if !ok {
					return errQUICFrame
				}
				b = b[n:]
			}
		case t == 0x06: // CRYPTO
			off, n, ok := varint(b)
			if !ok {
				return errQUICFrame
			}
			b = b[n:]
			l, n, ok := varint(b)
			if !ok || l > uint64(len(b)-n) {
				return errQUICFrame
			}
			b = b[n:]
			crypto(off, b[:l])
			b = b[l:]
		case t == 0x1c || t == 0x1d: // CONNECTION_CLOSE
			return nil
		default:
			return errQUICFrame
		}
	}
	return nil
}
