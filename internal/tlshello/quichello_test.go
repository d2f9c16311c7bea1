package tlshello

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/sha256"
	"encoding/binary"
	"slices"
)

// The QUIC ClientHellos of the real captures, for the fuzz seeds: a QUIC
// client sends its hello in CRYPTO frames of Initial packets, which anyone
// can open with keys derived from the first Destination Connection ID
// (RFC 9001 §5, RFC 9369 §3.3 for v2). This is a test's own reading,
// independent of capture's (capture/quic.go): v1, v2 and drafts 29-32, the client
// Initials of one UDP flow, no bounds beyond the captures'.

var (
	quicSaltV1 = []byte{0x38, 0x76, 0x2c, 0xf7, 0xf5, 0x59, 0x34, 0xb3, 0x4d, 0x17, 0x9a, 0xe6, 0xa4, 0xc8, 0x0c, 0xad, 0xcc, 0xbb, 0x7f, 0x0a}
	quicSaltV2 = []byte{0x0d, 0xed, 0xe3, 0xde, 0xf7, 0x00, 0xa6, 0xdb, 0x81, 0x93, 0x81, 0xbe, 0x6e, 0x26, 0x9d, 0xcb, 0xf9, 0xbd, 0x2e, 0xd9}
	// Drafts 29 to 32 (ndpi/doq.pcapng is draft 32).
	quicSaltDraft29 = []byte{0xaf, 0xbf, 0xec, 0x28, 0x99, 0x93, 0xd2, 0x4c, 0x9e, 0x97, 0x86, 0xf1, 0x9c, 0x61, 0x11, 0xe0, 0x43, 0x90, 0xa8, 0x99}
)

const quicV2 = 0x6b3343cf

// quicClientKeys are a client's Initial keys for a version and DCID.
type quicClientKeys struct {
	aead cipher.AEAD
	iv   []byte
	hp   cipher.Block
}

func newQUICClientKeys(version uint32, dcid []byte) (*quicClientKeys, bool) {
	salt, prefix := quicSaltV1, "quic "
	switch {
	case version == 1:
	case version == quicV2:
		salt, prefix = quicSaltV2, "quicv2 "
	case version >= 0xff00001d && version <= 0xff000020:
		salt = quicSaltDraft29
	default:
		return nil, false
	}
	label := func(secret []byte, l string, n int) []byte {
		full := "tls13 " + l
		info := append([]byte{byte(n >> 8), byte(n), byte(len(full))}, full...)
		out, err := hkdf.Expand(sha256.New, secret, string(append(info, 0)), n)
		if err != nil {
			panic(err)
		}
		return out
	}
	initial, err := hkdf.Extract(sha256.New, dcid, salt)
	if err != nil {
		return nil, false
	}
	client := label(initial, "client in", 32)
	blk, _ := aes.NewCipher(label(client, prefix+"key", 16))
	aead, _ := cipher.NewGCM(blk)
	hp, _ := aes.NewCipher(label(client, prefix+"hp", 16))
	return &quicClientKeys{aead, label(client, prefix+"iv", 12), hp}, true
}

// quicVarint reads a QUIC variable-length integer.
func quicVarint(b []byte) (uint64, int, bool) {
	if len(b) == 0 {
		return 0, 0, false
	}
	n := 1 << (b[0] >> 6)
	if len(b) < n {
		return 0, 0, false
	}
	v := uint64(b[0] & 0x3f)
	for _, c := range b[1:n] {
		v = v<<8 | uint64(c)
	}
	return v, n, true
}

// quicFlow gathers the CRYPTO stream of one UDP flow's client Initials.
type quicFlow struct {
	keys   *quicClientKeys
	crypto map[uint64][]byte // offset -> data
}

// add reads the long-header packets of one datagram; packets that are not
// client Initials, or do not open with the flow's keys, are skipped.
func (f *quicFlow) add(dgram []byte) {
	for len(dgram) >= 7 && dgram[0]&0x80 != 0 {
		p := dgram
		v := binary.BigEndian.Uint32(p[1:5])
		i := 5
		dcid := p[i+1 : min(len(p), i+1+int(p[i]))]
		i += 1 + int(p[i])
		if i >= len(p) {
			return
		}
		i += 1 + int(p[i])                                  // SCID
		initial, retry := p[0]&0x30 == 0, p[0]&0x30 == 0x30 // v1 and the drafts
		if v == quicV2 {
			initial, retry = p[0]&0x30 == 0x10, p[0]&0x30 == 0
		}
		if retry || i > len(p) {
			return
		}
		if initial {
			tl, n, ok := quicVarint(p[i:])
			if !ok {
				return
			}
			i += n + int(tl)
		}
		if i > len(p) {
			return
		}
		length, n, ok := quicVarint(p[i:])
		if !ok || length > uint64(len(p)-i-n) || length < 20 {
			return
		}
		pnOff := i + n
		dgram = p[pnOff+int(length):]
		if !initial {
			continue
		}
		if f.keys == nil {
			if f.keys, ok = newQUICClientKeys(v, dcid); !ok {
				return
			}
		}
		f.open(slices.Clone(p[:pnOff+int(length)]), pnOff)
	}
}

// open removes header protection from one Initial packet, decrypts it and
// keeps its CRYPTO frames.
func (f *quicFlow) open(b []byte, pnOff int) {
	var mask [16]byte
	f.keys.hp.Encrypt(mask[:], b[pnOff+4:pnOff+20])
	b[0] ^= mask[0] & 0x0f
	pnLen := int(b[0]&3) + 1
	var pn uint64
	for j := range pnLen {
		b[pnOff+j] ^= mask[1+j]
		pn = pn<<8 | uint64(b[pnOff+j])
	}
	nonce := slices.Clone(f.keys.iv)
	for j := range 8 {
		nonce[11-j] ^= byte(pn >> (8 * j))
	}
	plain, err := f.keys.aead.Open(nil, nonce, b[pnOff+pnLen:], b[:pnOff+pnLen])
	if err != nil {
		return // a server's Initial, or not ours to open
	}
	for len(plain) > 0 {
		t := plain[0]
		plain = plain[1:]
		switch t {
		case 0x00, 0x01: // PADDING, PING
		case 0x02, 0x03: // ACK: largest, delay, range count, first range, ranges, ECN counts
			var vs [4]uint64
			for j := range vs {
				v, n, ok := quicVarint(plain)
				if !ok {
					return
				}
				vs[j], plain = v, plain[n:]
			}
			extra := 2 * int(vs[2])
			if t == 0x03 {
				extra += 3
			}
			for range extra {
				_, n, ok := quicVarint(plain)
				if !ok {
					return
				}
				plain = plain[n:]
			}
		case 0x06: // CRYPTO
			off, n, ok := quicVarint(plain)
			if !ok {
				return
			}
			l, m, ok := quicVarint(plain[n:])
			if !ok || l > uint64(len(plain)-n-m) {
				return
			}
			f.crypto[off] = slices.Clone(plain[n+m : n+m+int(l)])
			plain = plain[n+m+int(l):]
		default:
			return
		}
	}
}

// hello returns the flow's ClientHello in TLS records (at most 16384 bytes
// of handshake each), as the fuzz targets read a TCP stream, or nil when
// the CRYPTO stream does not start with a whole ClientHello.
func (f *quicFlow) hello() []byte {
	var msg []byte
	for {
		d, ok := f.crypto[uint64(len(msg))]
		if !ok {
			// A frame may start before the end and run past it.
			grown := false
			for off, d := range f.crypto {
				if off < uint64(len(msg)) && off+uint64(len(d)) > uint64(len(msg)) {
					msg = append(msg, d[uint64(len(msg))-off:]...)
					grown = true
				}
			}
			if !grown {
				break
			}
			continue
		}
		msg = append(msg, d...)
	}
	if len(msg) < 4 || msg[0] != typeClientHello {
		return nil
	}
	n := 4 + (int(msg[1])<<16 | int(msg[2])<<8 | int(msg[3]))
	if len(msg) < n {
		return nil
	}
	msg = msg[:n]
	var out []byte
	for len(msg) > 0 {
		k := min(len(msg), 16384)
		out = append(out, 0x16, 0x03, 0x01, byte(k>>8), byte(k))
		out = append(out, msg[:k]...)
		msg = msg[k:]
	}
	return out
}
