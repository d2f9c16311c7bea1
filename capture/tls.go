package capture

// Parsing of the TLS ClientHello, the one message capture reads to name a
// TLS flow (RFC 8446 §4.1.2, RFC 6066 §3). Every length is checked; a
// malformed hello is an error, never a panic.

import "errors"

// Limits on what is buffered to find a ClientHello (THREATS C3): a record
// is at most 16 KiB (a hello is not encrypted, so crypto/tls takes no
// expansion), a hello at most 64 KiB.
const (
	maxRecord    = 16384
	maxHandshake = 64 << 10
)

var (
	errNotTLS    = errors.New("capture: not a TLS handshake")
	errMalformed = errors.New("capture: malformed ClientHello")
	errTooLarge  = errors.New("capture: ClientHello over 64 KiB")
)

// reader is a bounds-checked cursor over a byte slice.
type reader struct {
	b  []byte
	ok bool
}

func (r *reader) u8() int {
	if len(r.b) < 1 {
		r.ok = false
		return 0
	}
	v := int(r.b[0])
	r.b = r.b[1:]
	return v
}

func (r *reader) u16() int {
	if len(r.b) < 2 {
		r.ok = false
		return 0
	}
	v := int(r.b[0])<<8 | int(r.b[1])
	r.b = r.b[2:]
	return v
}

func (r *reader) bytes(n int) []byte {
	if n < 0 || len(r.b) < n {
		r.ok = false
		r.b = nil
		return nil
	}
	v := r.b[:n]
	r.b = r.b[n:]
	return v
}

// helloInfo is what capture takes from a ClientHello.
type helloInfo struct {
	SNI string // first host_name of the first server_name extension; "" none
	ECH bool   // an encrypted_client_hello (0xfe0d) or ESNI (0xffce) extension
	// DupSNI: more than one host name, in one server_name extension or
	// in two (the proxy refuses these).
	DupSNI bool
}

// parseClientHello parses one complete handshake message (type, 24-bit
// length, body) that must be a ClientHello. It is as strict as crypto/tls
// (Go 1.26 clientHelloMsg.unmarshal, and the ECH extension's parse in
// readClientHello), which the proxy uses and holds its fast path to
// (proxy/hello_fast.go parseHelloMessage): a hello crypto/tls refuses the
// proxy refuses, so capture must call it malformed too, or audit mode
// would report allowed a flow that enforce mode cuts. A hello whose framing
// holds but whose content crypto/tls refuses is still read to its end,
// since the proxy reports duplicate-sni before hello-malformed when it
// names two servers (readClientHelloTLS, countServerNames).
func parseClientHello(msg []byte) (helloInfo, error) {
	var h helloInfo
	if len(msg) < 4 || msg[0] != 1 {
		return h, errNotTLS
	}
	n := int(msg[1])<<16 | int(msg[2])<<8 | int(msg[3])
	if len(msg) < 4+n {
		return h, errMalformed
	}
	r := reader{b: msg[4 : 4+n], ok: true}
	r.bytes(2)                 // legacy_version
	r.bytes(32)                // random
	r.bytes(r.u8())            // legacy_session_id
	suites := r.bytes(r.u16()) // cipher_suites
	r.bytes(r.u8())            // legacy_compression_methods
	if !r.ok {
		return h, errMalformed
	}
	bad := len(suites)%2 != 0 // crypto/tls refuses it, the walk goes on
	if len(r.b) == 0 {
		if bad {
			return h, errMalformed
		}
		return h, nil // no extensions (SSL 3.0 style hello)
	}
	ext := reader{b: r.bytes(r.u16()), ok: true}
	if !r.ok {
		return h, errMalformed
	}
	bad = bad || len(r.b) != 0 // bytes after the extensions
	var seen extSet
	sawSNI, hostNames := false, 0
	for len(ext.b) > 0 {
		typ := ext.u16()
		data := ext.bytes(ext.u16())
		if !ext.ok {
			h.DupSNI = false // the proxy counts names only in a hello it can walk
			return h, errMalformed
		}
		if typ == 0 && sawSNI {
			h.DupSNI = true // the proxy counts names, not extensions
			continue
		}
		if seen.add(uint16(typ)) {
			bad = true // crypto/tls refuses a repeated extension of any type
		}
		switch typ {
		case 0: // server_name
			sawSNI = true
			sr := reader{b: data, ok: true}
			list := reader{b: sr.bytes(sr.u16()), ok: true}
			if !sr.ok || len(sr.b) != 0 || len(list.b) == 0 {
				bad = true
			}
			for len(list.b) > 0 {
				nt := list.u8()
				name := list.bytes(list.u16())
				if !list.ok {
					bad = true
					break
				}
				if len(name) == 0 {
					bad = true // crypto/tls refuses an empty name of any type
				}
				if nt != 0 {
					continue
				}
				if hostNames++; hostNames > 1 {
					h.DupSNI = true
					continue
				}
				h.SNI = string(name) // the first one is the one we report
				if len(name) > 0 && name[len(name)-1] == '.' {
					bad = true // crypto/tls refuses a trailing dot
				}
			}
		case 0xffce:
			h.ECH = true
		case 0xfe0d:
			h.ECH = true
			bad = bad || !extOK(typ, data, len(ext.b) == 0)
		default:
			bad = bad || !extOK(typ, data, len(ext.b) == 0)
		}
	}
	if bad {
		return h, errMalformed
	}
	return h, nil
}

// extOK reports whether the body of extension typ is what crypto/tls
// (Go 1.26 clientHelloMsg.unmarshal; proxy/hello_fast.go checks the same)
// takes; last says no extension follows it. Types crypto/tls does not
// know are not looked at, as it skips them.
func extOK(typ int, d []byte, last bool) bool {
	r := reader{b: d, ok: true}
	nonEmpty16 := func(even bool) {
		l := r.bytes(r.u16())
		if len(l) == 0 || even && len(l)%2 != 0 {
			r.ok = false
		}
	}
	switch typ {
	case 5: // status_request: type, responder ids, request extensions
		r.u8()
		r.bytes(r.u16())
		r.bytes(r.u16())
	case 10, 13, 50: // supported_groups, signature_algorithms(_cert)
		nonEmpty16(true)
	case 11: // ec_point_formats
		if len(r.bytes(r.u8())) == 0 {
			return false
		}
	case 43: // supported_versions
		if l := r.bytes(r.u8()); len(l) == 0 || len(l)%2 != 0 {
			return false
		}
	case 35, 57: // session_ticket, quic_transport_parameters: any body
		return true
	case 18, 23, 42: // signed_certificate_timestamp, extended_master_secret, early_data: empty
	case 45, 0xff01: // psk_key_exchange_modes, renegotiation_info
		r.bytes(r.u8())
	case 44: // cookie
		nonEmpty16(false)
	case 51: // key_share: (group, non-empty key_exchange)*
		l := reader{b: r.bytes(r.u16()), ok: true}
		for len(l.b) > 0 && l.ok {
			l.u16()
			if len(l.bytes(l.u16())) == 0 {
				return false
			}
		}
	case 16: // ALPN: a non-empty list of non-empty names
		l := reader{b: r.bytes(r.u16()), ok: true}
		if len(l.b) == 0 {
			return false
		}
		for len(l.b) > 0 {
			if len(l.bytes(l.u8())) == 0 {
				return false
			}
		}
	case 41: // pre_shared_key: the last extension; identities, binders
		if !last {
			return false
		}
		ids := reader{b: r.bytes(r.u16()), ok: true}
		if len(ids.b) == 0 {
			return false
		}
		for len(ids.b) > 0 {
			if len(ids.bytes(ids.u16())) == 0 || ids.bytes(4) == nil {
				return false
			}
		}
		bs := reader{b: r.bytes(r.u16()), ok: true}
		if len(bs.b) == 0 {
			return false
		}
		for len(bs.b) > 0 {
			if len(bs.bytes(bs.u8())) == 0 {
				return false
			}
		}
	case 0xfe0d: // encrypted_client_hello, as crypto/tls's parseECHExt reads it
		if len(d) == 0 {
			return true // crypto/tls does not look at an empty one
		}
		switch r.u8() {
		case 1: // inner: nothing more
		case 0: // outer: KDF, AEAD, config id, enc, payload; then anything
			r.bytes(5)
			r.bytes(r.u16())
			r.bytes(r.u16())
			return r.ok
		default:
			return false
		}
	default:
		return true
	}
	return r.ok && len(r.b) == 0
}

// extSet is a set of extension types: a few on the stack, a bitmap for a
// hello with many (a hostile one may carry 16,000).
type extSet struct {
	few  [24]uint16
	n    int
	many *[1024]uint64
}

// add adds typ and reports whether it was there already.
func (s *extSet) add(typ uint16) bool {
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

// helloFromRecords finds the first handshake message in a TLS byte stream
// (records of type 22, possibly many per message, RFC 8446 §5.1). It
// returns the message when complete, (nil, nil) when more bytes are needed,
// or an error when the stream is not a TLS handshake or breaks the limits.
// scratch is reused to join records.
func helloFromRecords(stream []byte, scratch *[]byte) ([]byte, error) {
	hs := (*scratch)[:0]
	defer func() { *scratch = hs[:0] }()
	for {
		// crypto/tls takes any record version below 16.0 before it has
		// negotiated one, and no record longer than 16384 bytes: so does
		// the proxy.
		if len(stream) < 5 {
			if len(stream) >= 1 && stream[0] != 22 {
				return nil, errNotTLS
			}
			if len(stream) >= 2 && stream[1] >= 0x10 {
				return nil, errNotTLS
			}
			return nil, nil
		}
		if stream[0] != 22 || stream[1] >= 0x10 {
			return nil, errNotTLS
		}
		n := int(stream[3])<<8 | int(stream[4])
		if n == 0 || n > maxRecord {
			return nil, errMalformed
		}
		if len(stream) < 5+n {
			// A partial record: its bytes still count toward the hello.
			hs = append(hs, stream[5:]...)
			if done, err := helloComplete(hs); done || err != nil {
				return hs, err
			}
			return nil, nil
		}
		hs = append(hs, stream[5:5+n]...)
		stream = stream[5+n:]
		if done, err := helloComplete(hs); err != nil {
			return nil, err
		} else if done {
			return hs, nil
		}
	}
}

// helloComplete says whether hs holds a whole handshake message, which
// must be a ClientHello within maxHandshake.
func helloComplete(hs []byte) (bool, error) {
	if len(hs) >= 1 && hs[0] != 1 {
		return false, errNotTLS
	}
	if len(hs) < 4 {
		return false, nil
	}
	n := int(hs[1])<<16 | int(hs[2])<<8 | int(hs[3])
	if n+4 > maxHandshake {
		return false, errTooLarge
	}
	return len(hs) >= 4+n, nil
}
