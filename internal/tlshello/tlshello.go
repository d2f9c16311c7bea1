// Package tlshello reads the TLS ClientHello, the one message egressd reads
// to name a TLS flow (RFC 8446 §4.1.2, RFC 6066 §3). It is the only
// ClientHello parser in egressd: the transparent proxy reads the hello of
// every TLS connection with it before deciding (enforce mode), and capture
// reads the hellos of reassembled TCP streams and QUIC Initials with it
// (audit mode), so the two cannot disagree on what a hello says: its server
// name, a second server name (duplicate-sni), a malformation
// (hello-malformed) or its size (hello-too-large).
//
// It is as strict as crypto/tls (Go 1.26: conn.go readRecordOrCCS and
// readHandshake, handshake_messages.go clientHelloMsg.unmarshal,
// handshake_server.go readClientHello, ech.go parseECHExt) up to the point
// where a GetConfigForClient hook runs, and stricter in two places: a
// record of another type among the hello's records (crypto/tls skips
// warning alerts) is malformed, and a hello whose records need more than
// MaxBytes is too large (crypto/tls takes a message of up to 65536 bytes
// however many records carry it). FuzzReadAgreesWithCryptoTLS holds it to
// that; rerun it when the Go version changes. Hello.Plain marks the hellos whose
// every field is of a kind checked one by one against crypto/tls (what real
// clients send): the proxy takes those without crypto/tls and has crypto/tls
// confirm the others. Every length is checked; nothing panics.
package tlshello

import (
	"errors"
	"net/netip"
)

// Limits on what is read to find a ClientHello (THREATS C3).
const (
	// MaxRecord is the longest record: a hello is not encrypted, so
	// crypto/tls takes no expansion (its maxPlaintext).
	MaxRecord = 16384
	// MaxBytes is the most bytes of records, headers included, up to the
	// end of the hello (the proxy's default HelloMaxBytes); a hello that
	// needs more is ErrTooLarge. crypto/tls's own limit on the message
	// (maxHandshake, 65536 bytes after the 4-byte header) lies beyond it.
	MaxBytes = 64 << 10
)

var (
	// ErrShort: the bytes are the start of a hello; more can complete it.
	ErrShort = errors.New("tlshello: ClientHello incomplete")
	// ErrMalformed: the bytes are not a ClientHello crypto/tls takes (or
	// records it would take only after skipping an alert).
	ErrMalformed = errors.New("tlshello: malformed ClientHello")
	// ErrTooLarge: the hello needs more than MaxBytes.
	ErrTooLarge = errors.New("tlshello: ClientHello over 64 KiB")
)

// Hello is what egressd takes from a ClientHello.
type Hello struct {
	// SNI is the first host_name of the first server_name extension
	// ("" none): with ECH, the outer hello's public name. It is set even
	// when the hello turns out malformed after it.
	SNI string
	// DupSNI: more than one host name, in one server_name extension or in
	// two (the hello is then malformed too; egressd reports duplicate-sni
	// first). Names are counted only in a hello whose extensions can be
	// walked.
	DupSNI bool
	// ECH: an encrypted_client_hello (0xfe0d, real or GREASE) or ESNI
	// (0xffce) extension is present.
	ECH bool
	// Plain: the hello was taken and everything in it is of a kind real
	// clients send and this parser checks field by field as crypto/tls does
	// (see Parse, skippedExt and plainHostName): records of version 3.x
	// with the message ending at a record's end, at most maxPlainExts
	// extensions, one server name of letters, digits, '-', '_' and dots,
	// only the extensions Parse checks or skippedExt lists, an outer ECH
	// extension only.
	Plain bool
	// Size is the length of the handshake message, header included.
	Size int
}

const (
	recordHandshake = 22
	typeClientHello = 1
	// maxPlainExts bounds a Plain hello's extensions (real ones carry
	// fewer than 25).
	maxPlainExts = 64
	// maxPlainSNI is the longest Plain server name (a DNS name in dotted
	// form has at most 253 characters).
	maxPlainSNI = 253
)

// Read reads the ClientHello at the start of stream, the bytes of a TCP
// connection from the client: TLS records of type 22, as many per message
// as the client likes (RFC 8446 §5.1). It returns ErrShort while more bytes
// can complete the hello, ErrTooLarge or ErrMalformed (with what Parse
// found when the records hold a whole message), or nil with the hello,
// which must end inside a complete record (crypto/tls reads whole
// records). Records after the hello are not looked at. scratch, if not
// nil, is reused to join records; a hello in one record is read in place.
func Read(stream []byte, scratch *[]byte) (Hello, error) {
	var buf []byte // the records joined, once there are two
	if scratch != nil {
		buf = (*scratch)[:0]
		defer func() { *scratch = buf[:0] }()
	}
	var (
		hs      []byte // the handshake bytes of the complete records
		joined  bool   // hs is buf
		plain   = true
		headers int // bytes of the record headers read
		hdr     [4]byte
		nhdr    int // bytes of hdr known
		recBody int // handshake bytes the records read announce
	)
	for {
		if len(stream) < 5 {
			// crypto/tls takes any record version below 16.0 before it has
			// negotiated one.
			if len(stream) >= 1 && stream[0] != recordHandshake ||
				len(stream) >= 2 && stream[1] >= 0x10 {
				return Hello{}, ErrMalformed
			}
			if headers+recBody+5+1 > MaxBytes {
				return Hello{}, ErrTooLarge
			}
			return Hello{}, ErrShort
		}
		if stream[0] != recordHandshake || stream[1] >= 0x10 {
			return Hello{}, ErrMalformed
		}
		plain = plain && stream[1] == 3
		n := int(stream[3])<<8 | int(stream[4])
		if n == 0 || n > MaxRecord {
			return Hello{}, ErrMalformed
		}
		headers += 5
		recBody += n
		frag := stream[5:min(len(stream), 5+n)]
		for i := 0; nhdr < len(hdr) && i < len(frag); i++ {
			hdr[nhdr] = frag[i]
			nhdr++
		}
		if nhdr >= 1 && hdr[0] != typeClientHello {
			return Hello{}, ErrMalformed
		}
		if nhdr == len(hdr) {
			m := 4 + (int(hdr[1])<<16 | int(hdr[2])<<8 | int(hdr[3]))
			if more := m - recBody; more > 0 && headers+5*((more+MaxRecord-1)/MaxRecord)+m > MaxBytes {
				return Hello{}, ErrTooLarge // the records it needs cannot fit
			}
		}
		if headers+recBody > MaxBytes {
			return Hello{}, ErrTooLarge // the record it is in cannot fit
		}
		if len(frag) < n {
			return Hello{}, ErrShort // a partial record
		}
		stream = stream[5+n:]
		switch {
		case hs == nil:
			hs = frag[:n:n] // in place
		case !joined:
			buf = append(append(buf, hs...), frag...)
			hs, joined = buf, true
		default:
			buf = append(buf, frag...)
			hs = buf
		}
		if nhdr < len(hdr) {
			continue
		}
		m := 4 + (int(hdr[1])<<16 | int(hdr[2])<<8 | int(hdr[3]))
		if len(hs) < m {
			continue
		}
		h, err := Parse(hs[:m])
		h.Plain = h.Plain && plain && len(hs) == m
		return h, err
	}
}

// Named reports whether sni, a Hello's SNI, names a server: it is not
// empty and not an IP literal (RFC 6066 §3 allows none; with or without
// brackets, an IPv6 zone making it a name again). The proxy and capture
// decide a hello whose SNI names no server as one without SNI: by address,
// then by the names egressd's DNS gave out for the address.
func Named(sni string) bool {
	if sni == "" {
		return false
	}
	s := sni
	if len(s) > 1 && s[0] == '[' && s[len(s)-1] == ']' {
		s = s[1 : len(s)-1]
	}
	a, err := netip.ParseAddr(s)
	return err != nil || a.Zone() != ""
}

// Complete says whether hs, a handshake byte stream without records (the
// CRYPTO frames of a QUIC Initial), holds a whole first message, which must
// be a ClientHello within MaxBytes; it returns the message's length, header
// included.
func Complete(hs []byte) (int, error) {
	if len(hs) >= 1 && hs[0] != typeClientHello {
		return 0, ErrMalformed
	}
	if len(hs) < 4 {
		return 0, ErrShort
	}
	m := 4 + (int(hs[1])<<16 | int(hs[2])<<8 | int(hs[3]))
	if m > MaxBytes {
		return 0, ErrTooLarge
	}
	if len(hs) < m {
		return 0, ErrShort
	}
	return m, nil
}

// Parse parses one complete handshake message (type, 24-bit length, body)
// that must be a ClientHello, and exactly that: msg ends with the message.
// A hello whose framing holds but whose content crypto/tls refuses is still
// read to its end, to find a second server name: egressd reports
// duplicate-sni before hello-malformed.
func Parse(msg []byte) (Hello, error) {
	h := Hello{Size: len(msg)}
	if len(msg) < 4 || msg[0] != typeClientHello ||
		len(msg) != 4+(int(msg[1])<<16|int(msg[2])<<8|int(msg[3])) {
		return h, ErrMalformed
	}
	r := reader(msg[4:])
	ok0 := r.skip(2 + 32)         // legacy_version (crypto/tls negotiates after the hook), random
	_, ok1 := r.prefixed8()       // legacy_session_id
	suites, ok2 := r.prefixed16() // cipher_suites
	_, ok3 := r.prefixed8()       // legacy_compression_methods
	if !ok0 || !ok1 || !ok2 || !ok3 {
		return h, ErrMalformed
	}
	bad := len(suites)%2 != 0 // crypto/tls refuses it; the walk goes on
	if len(r) == 0 {
		if bad {
			return h, ErrMalformed
		}
		h.Plain = true
		return h, nil // no extensions (SSL 3.0 style hello)
	}
	exts, ok := r.prefixed16()
	if !ok {
		return h, ErrMalformed
	}
	bad = bad || len(r) != 0 // bytes after the extensions
	var (
		seen      extSet
		nexts     int
		sawSNI    bool
		hostNames int
		name      []byte
	)
	plain := true
	for len(exts) > 0 {
		typ, ok1 := exts.u16()
		d, ok2 := exts.prefixed16()
		if !ok1 || !ok2 {
			h.DupSNI = false // names count only in a hello that can be walked
			return h, ErrMalformed
		}
		if nexts++; nexts > maxPlainExts {
			plain = false
		}
		if typ == extServerName && sawSNI {
			h.DupSNI, bad = true, true // names are counted, not extensions
			continue
		}
		if seen.add(typ) {
			bad = true // crypto/tls refuses a repeated extension of any type
		}
		switch typ {
		case extServerName:
			sawSNI = true
			list, ok := d.prefixed16()
			if !ok || len(d) != 0 || len(list) == 0 {
				bad = true
			}
			entries := 0
			for len(list) > 0 {
				nt, ok1 := list.u8()
				n, ok2 := list.prefixed16()
				if !ok1 || !ok2 {
					bad = true
					break
				}
				entries++
				if len(n) == 0 {
					bad = true // crypto/tls refuses an empty name of any type
				}
				if nt != 0 {
					continue
				}
				if hostNames++; hostNames > 1 {
					h.DupSNI, bad = true, true
					continue
				}
				name = n
				h.SNI = string(n) // the first one is the one we report
				if len(n) > 0 && n[len(n)-1] == '.' {
					bad = true // crypto/tls refuses a trailing dot
				}
			}
			plain = plain && entries == 1 && hostNames == 1 && plainHostName(name)
		case extESNI:
			h.ECH = true
			plain = false
		case extECH:
			h.ECH = true
			if !echOK(d) {
				bad = true
			}
			plain = plain && echOuter(d)
		// The others as crypto/tls's clientHelloMsg.unmarshal checks them
		// (written out here, not in a function: this loop is most of the
		// proxy's cost per hello).
		case extStatusRequest: // status_type, responder_id_list, request_extensions
			_, ok1 := d.u8()
			_, ok2 := d.prefixed16()
			_, ok3 := d.prefixed16()
			if !ok1 || !ok2 || !ok3 || len(d) != 0 {
				bad = true
			}
		case extSupportedGroups, extSignatureAlgs, extSignatureAlgsCert: // a non-empty list of uint16
			if l, ok := d.prefixed16(); !ok || len(l) == 0 || len(l)%2 != 0 || len(d) != 0 {
				bad = true
			}
		case extECPointFormats:
			if l, ok := d.prefixed8(); !ok || len(l) == 0 || len(d) != 0 {
				bad = true
			}
		case extSupportedVersions:
			if l, ok := d.prefixed8(); !ok || len(l) == 0 || len(l)%2 != 0 || len(d) != 0 {
				bad = true
			}
		case extSessionTicket, extQUICTransportParam: // any body: crypto/tls keeps it whole
		case extExtendedMaster, extSCT, extEarlyData: // empty
			if len(d) != 0 {
				bad = true
			}
		case extRenegotiationInfo, extPSKModes: // a uint8-prefixed string, possibly empty
			if _, ok := d.prefixed8(); !ok || len(d) != 0 {
				bad = true
			}
		case extCookie:
			if c, ok := d.prefixed16(); !ok || len(c) == 0 || len(d) != 0 {
				bad = true
			}
		case extKeyShare: // a list, possibly empty, of (group, non-empty key_exchange)
			l, ok := d.prefixed16()
			if !ok || len(d) != 0 {
				bad = true
			}
			for len(l) > 0 {
				_, ok1 := l.u16()
				k, ok2 := l.prefixed16()
				if !ok1 || !ok2 || len(k) == 0 {
					bad = true
					break
				}
			}
		case extALPN: // a non-empty list of non-empty names
			l, ok := d.prefixed16()
			if !ok || len(l) == 0 || len(d) != 0 {
				bad = true
			}
			for len(l) > 0 {
				if p, ok := l.prefixed8(); !ok || len(p) == 0 {
					bad = true
					break
				}
			}
		case extPreSharedKey: // the last extension; identities, binders
			if len(exts) != 0 || !pskOK(d) {
				bad = true
			}
		default: // crypto/tls does not read it
			plain = plain && skippedExt(typ)
		}
	}
	if bad {
		return h, ErrMalformed
	}
	h.Plain = plain
	return h, nil
}

// Extension types.
const (
	extServerName         = 0
	extStatusRequest      = 5
	extSupportedGroups    = 10
	extECPointFormats     = 11
	extSignatureAlgs      = 13
	extALPN               = 16
	extSCT                = 18
	extExtendedMaster     = 23
	extSessionTicket      = 35
	extPreSharedKey       = 41
	extEarlyData          = 42
	extSupportedVersions  = 43
	extCookie             = 44
	extPSKModes           = 45
	extSignatureAlgsCert  = 50
	extKeyShare           = 51
	extQUICTransportParam = 57
	extECH                = 0xfe0d
	extESNI               = 0xffce
	extRenegotiationInfo  = 0xff01
)

// pskOK checks a pre_shared_key body: non-empty identities with
// non-empty labels, then non-empty binders, each non-empty.
func pskOK(d reader) bool {
	ids, ok := d.prefixed16()
	if !ok || len(ids) == 0 {
		return false
	}
	for len(ids) > 0 {
		label, ok1 := ids.prefixed16()
		ok2 := ids.skip(4) // obfuscated_ticket_age
		if !ok1 || !ok2 || len(label) == 0 {
			return false
		}
	}
	bs, ok := d.prefixed16()
	if !ok || len(bs) == 0 || len(d) != 0 {
		return false
	}
	for len(bs) > 0 {
		if b, ok := bs.prefixed8(); !ok || len(b) == 0 {
			return false
		}
	}
	return true
}

// echOK checks an encrypted_client_hello body as crypto/tls's
// readClientHello (parseECHExt) does before GetConfigForClient: an empty
// one is not looked at, an inner one has nothing more, an outer one has
// KDF, AEAD, config id, enc and payload, then anything.
func echOK(d reader) bool {
	if len(d) == 0 {
		return true
	}
	t, _ := d.u8()
	switch t {
	case 1:
		return len(d) == 0
	case 0:
		ok1 := d.skip(5)
		_, ok2 := d.prefixed16()
		_, ok3 := d.prefixed16()
		return ok1 && ok2 && ok3
	}
	return false
}

// echOuter reports whether d is exactly an outer ECH body, with nothing
// after its payload: the one form a Plain hello carries.
func echOuter(d reader) bool {
	t, ok := d.u8()
	if !ok || t != 0 || !d.skip(5) {
		return false
	}
	_, ok1 := d.prefixed16() // enc
	_, ok2 := d.prefixed16() // payload
	return ok1 && ok2 && len(d) == 0
}

// plainHostName reports whether n is a Plain server name: 1 to 253 bytes
// of letters, digits, '-' and '_' in non-empty labels separated by single
// dots. crypto/tls takes any non-empty name without a trailing dot; a name
// outside this set (NUL, non-ASCII, a port, an IPv6 literal) makes a hello
// that is not Plain, which the proxy has crypto/tls confirm.
func plainHostName(n []byte) bool {
	if len(n) == 0 || len(n) > maxPlainSNI || n[0] == '.' || n[len(n)-1] == '.' {
		return false
	}
	prev := byte(0)
	for _, c := range n {
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9', c == '-', c == '_':
		case c == '.' && prev != '.':
		default:
			return false
		}
		prev = c
	}
	return true
}

// skippedExt reports whether typ is an extension crypto/tls (Go 1.26)
// does not read that real clients send: a Plain hello may carry it
// (TestSkippedExtensions checks crypto/tls still ignores each).
func skippedExt(typ uint16) bool {
	switch typ {
	case 1, // max_fragment_length
		15,    // heartbeat
		21,    // padding
		22,    // encrypt_then_mac
		27,    // compress_certificate
		28,    // record_size_limit
		34,    // delegated_credentials
		47,    // certificate_authorities
		49,    // post_handshake_auth
		13172, // next_protocol_negotiation
		17513, // application_settings (old codepoint)
		17613: // application_settings
		return true
	}
	// GREASE (RFC 8701): 0x0a0a, 0x1a1a, ... 0xfafa.
	return typ&0x0f0f == 0x0a0a && typ>>8 == typ&0xff
}

// extSet is a set of extension types: those below 64 (most of what real
// clients send) in a bitmap, a few others on the stack, then a bitmap of
// all for a hello with many (a hostile one may carry 16,000).
type extSet struct {
	low  uint64
	few  [32]uint16
	n    int
	many *[1024]uint64
}

// add adds typ and reports whether it was there already.
func (s *extSet) add(typ uint16) bool {
	if typ < 64 {
		had := s.low&(1<<typ) != 0
		s.low |= 1 << typ
		return had
	}
	return s.addHigh(typ)
}

func (s *extSet) addHigh(typ uint16) bool {
	if s.many == nil {
		for _, t := range s.few[:s.n] {
			if t == typ {
				return true
			}
		}
		if s.n < len(s.few) {
			s.few[s.n] = typ
			s.n++
			return false
		}
		s.many = new([1024]uint64)
		for _, t := range s.few {
			s.many[t/64] |= 1 << (t % 64)
		}
	}
	had := s.many[typ/64]&(1<<(typ%64)) != 0
	s.many[typ/64] |= 1 << (typ % 64)
	return had
}

// reader reads big-endian fields from the front of a byte slice, like
// cryptobyte.String; a read that does not fit reports false (skip then
// empties the reader, the others consume nothing).
type reader []byte

func (r *reader) skip(n int) bool {
	if len(*r) < n {
		*r = nil
		return false
	}
	*r = (*r)[n:]
	return true
}

func (r *reader) u8() (byte, bool) {
	if len(*r) < 1 {
		return 0, false
	}
	v := (*r)[0]
	*r = (*r)[1:]
	return v, true
}

func (r *reader) u16() (uint16, bool) {
	if len(*r) < 2 {
		return 0, false
	}
	v := uint16((*r)[0])<<8 | uint16((*r)[1])
	*r = (*r)[2:]
	return v, true
}

// prefixed8 reads a uint8 length and that many bytes.
func (r *reader) prefixed8() (reader, bool) {
	if len(*r) < 1 || len(*r) < 1+int((*r)[0]) {
		return nil, false
	}
	n := int((*r)[0])
	v := (*r)[1 : 1+n : 1+n]
	*r = (*r)[1+n:]
	return v, true
}

// prefixed16 reads a uint16 length and that many bytes.
func (r *reader) prefixed16() (reader, bool) {
	if len(*r) < 2 {
		return nil, false
	}
	n := int((*r)[0])<<8 | int((*r)[1])
	if len(*r) < 2+n {
		return nil, false
	}
	v := (*r)[2 : 2+n : 2+n]
	*r = (*r)[2+n:]
	return v, true
}
