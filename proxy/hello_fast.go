package proxy

// The fast path of the ClientHello peek: a parser for the hellos real
// clients send, used before crypto/tls when the recorded bytes hold the whole
// hello. It must never accept what crypto/tls rejects, nor read anything
// differently (THREATS.md A5: a parser differential on the SNI lets a client
// reach a name the proxy did not check). So it checks everything crypto/tls
// checks up to the point where the GetConfigForClient hook in
// readClientHelloTLS runs (Go 1.26: conn.go readRecordOrCCS and
// readHandshake, handshake_messages.go clientHelloMsg.unmarshal,
// handshake_server.go readClientHello, ech.go parseECHExt), usually more,
// and answers "not mine" for anything else; readClientHelloTLS then decides.
// FuzzHelloFastAgreesWithCryptoTLS holds it to that.

// Limits crypto/tls applies to a ClientHello.
const (
	recordTypeHandshake = 0x16
	recordHeaderLen     = 5
	maxRecordPlaintext  = 16384 // crypto/tls maxPlaintext: a longer unprotected record is an error
	maxHelloMessage     = 65536 // crypto/tls maxHandshake: the longest handshake message it reads
	typeClientHello     = 1

	// maxFastExts is the most extensions the fast path takes; it keeps the
	// duplicate check (crypto/tls rejects any repeated type) cheap and on the
	// stack. Real hellos carry fewer than 25.
	maxFastExts = 64
	// maxFastSNI is the longest server name the fast path takes (a DNS name
	// in dotted form has at most 253 characters).
	maxFastSNI = 253
)

// Extension types the fast path validates, with crypto/tls's checks.
const (
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
	extRenegotiationInfo  = 0xff01
)

// parseHelloFast parses the ClientHello that starts b, a recording of the
// first bytes of a connection, without crypto/tls and without copying when
// the hello is in one record. It reports false when b does not hold a
// complete ClientHello or holds anything it does not validate exactly as
// crypto/tls would; the caller then lets crypto/tls decide. When it reports
// true, crypto/tls accepts the same bytes and reads the same ServerName,
// ALPN list and ECH presence. It never modifies b and never panics.
func parseHelloFast(b []byte) (clientHello, bool) {
	msg, ok := helloMessage(b)
	if !ok {
		return clientHello{}, false
	}
	ch, ok := parseHelloMessage(msg)
	if !ok {
		return clientHello{}, false
	}
	return ch, true
}

// helloMessage reassembles the first handshake message from the TLS
// records at the start of b, checking each record the way crypto/tls checks
// records before the version is negotiated, and more strictly: only
// handshake records (crypto/tls also skips warning alerts), a 3.x record
// version (crypto/tls takes anything below 0x1000), a non-empty body of at
// most 16384 bytes. The message must be a ClientHello of at most 65536 bytes
// and must end with its record (crypto/tls leaves a following message in the
// record for later; we do not take that case). The result aliases b when the
// message is in one record, else it is a copy.
func helloMessage(b []byte) ([]byte, bool) {
	var hs []byte
	for {
		if len(b) < recordHeaderLen || b[0] != recordTypeHandshake || b[1] != 0x03 {
			return nil, false
		}
		n := int(b[3])<<8 | int(b[4])
		if n == 0 || n > maxRecordPlaintext || len(b) < recordHeaderLen+n {
			return nil, false
		}
		frag := b[recordHeaderLen : recordHeaderLen+n]
		b = b[recordHeaderLen+n:]
		if hs == nil {
			hs = frag[:len(frag):len(frag)] // a later append copies, never writes into b
		} else {
			hs = append(hs, frag...)
		}
		if len(hs) < 4 {
			continue
		}
		if hs[0] != typeClientHello {
			return nil, false
		}
		mlen := int(hs[1])<<16 | int(hs[2])<<8 | int(hs[3])
		switch {
		case mlen > maxHelloMessage || len(hs) > 4+mlen:
			return nil, false
		case len(hs) == 4+mlen:
			return hs, true
		}
	}
}

// helloShort reports whether b is the start of records helloMessage would
// take, cut short: more bytes can complete the first handshake message (a
// record header, a record body or a following record is missing). It
// reports false when the message is complete in b and when nothing
// appended to b can make helloMessage take it (a record or handshake
// header it rejects, a record ending past the message). It reads only
// headers, never allocates and never panics.
func helloShort(b []byte) bool {
	var (
		hdr  [4]byte // the handshake header, its first known bytes
		seen int     // handshake bytes in b
		end  int     // handshake bytes once the current record is complete
	)
	// fits reports whether a ClientHello that starts with the known header
	// bytes can be long enough for its records to end at end.
	fits := func() bool {
		k := min(seen, len(hdr))
		if k >= 1 && hdr[0] != typeClientHello {
			return false
		}
		lo, hi := 0, 0 // the message length, unknown bytes 0 or 0xff
		for i := 1; i < len(hdr); i++ {
			lo, hi = lo<<8, hi<<8|0xff
			if i < k {
				lo, hi = lo|int(hdr[i]), hi&^0xff|int(hdr[i])
			}
		}
		return lo <= maxHelloMessage && min(hi, maxHelloMessage) >= end-len(hdr)
	}
	for {
		if len(b) < recordHeaderLen {
			// The next record's header, part of it or none yet.
			if len(b) >= 1 && b[0] != recordTypeHandshake || len(b) >= 2 && b[1] != 0x03 {
				return false
			}
			n := 1
			if len(b) >= 4 {
				n = max(n, int(b[3])<<8)
			}
			end = seen + n
			return n <= maxRecordPlaintext && fits()
		}
		if b[0] != recordTypeHandshake || b[1] != 0x03 {
			return false
		}
		n := int(b[3])<<8 | int(b[4])
		if n == 0 || n > maxRecordPlaintext {
			return false
		}
		frag := b[recordHeaderLen:]
		if len(frag) > n {
			frag = frag[:n]
		}
		for i := 0; i < len(frag) && seen+i < len(hdr); i++ {
			hdr[seen+i] = frag[i]
		}
		seen += len(frag)
		end += n
		if !fits() {
			return false
		}
		if len(frag) < n {
			return true // the record's body is cut
		}
		if seen >= len(hdr) && seen == len(hdr)+(int(hdr[1])<<16|int(hdr[2])<<8|int(hdr[3])) {
			return false // complete
		}
		b = b[recordHeaderLen+n:]
	}
}

// parseHelloMessage parses a ClientHello handshake message (with its 4-byte
// header) like crypto/tls's clientHelloMsg.unmarshal, then applies the ECH
// check crypto/tls's readClientHello makes before GetConfigForClient.
func parseHelloMessage(msg []byte) (clientHello, bool) {
	var ch clientHello
	s := helloBytes(msg[4:])
	if _, ok := s.read(2); !ok { // legacy_version: crypto/tls negotiates after the hook
		return ch, false
	}
	if _, ok := s.read(32); !ok { // random
		return ch, false
	}
	if _, ok := s.prefixed8(); !ok { // legacy_session_id
		return ch, false
	}
	suites, ok := s.prefixed16()
	if !ok || len(suites)%2 != 0 {
		return ch, false
	}
	if _, ok := s.prefixed8(); !ok { // legacy_compression_methods
		return ch, false
	}
	if len(s) == 0 {
		return ch, true // no extensions
	}
	exts, ok := s.prefixed16()
	if !ok || len(s) != 0 {
		return ch, false
	}

	var (
		seen      [maxFastExts]uint16
		nseen     int
		name      []byte
		alpn      helloBytes
		nalpn     int
		sawServer bool
	)
	for len(exts) > 0 {
		typ, ok1 := exts.u16()
		d, ok2 := exts.prefixed16()
		if !ok1 || !ok2 || nseen == len(seen) {
			return ch, false
		}
		for _, t := range seen[:nseen] {
			if t == typ {
				return ch, false // crypto/tls rejects a repeated extension of any type
			}
		}
		seen[nseen] = typ
		nseen++

		switch typ {
		case extServerName:
			// One host_name entry. crypto/tls rejects a second host_name,
			// an empty name and a trailing dot, and skips other name types;
			// we take only a plain host name (letters, digits, '-', '_',
			// dots between non-empty labels), so no NUL, non-ASCII, port or
			// IPv6 literal gets past without crypto/tls.
			list, ok := d.prefixed16()
			if !ok || len(d) != 0 {
				return ch, false
			}
			nt, ok1 := list.u8()
			n, ok2 := list.prefixed16()
			if !ok1 || !ok2 || nt != 0 || len(list) != 0 || !fastHostName(n) {
				return ch, false
			}
			name, sawServer = n, true
		case extStatusRequest:
			// status_type, responder_id_list, request_extensions.
			_, ok1 := d.u8()
			_, ok2 := d.prefixed16()
			_, ok3 := d.prefixed16()
			if !ok1 || !ok2 || !ok3 || len(d) != 0 {
				return ch, false
			}
		case extSupportedGroups, extSignatureAlgs, extSignatureAlgsCert:
			// A non-empty list of uint16.
			l, ok := d.prefixed16()
			if !ok || len(l) == 0 || len(l)%2 != 0 || len(d) != 0 {
				return ch, false
			}
		case extECPointFormats:
			l, ok := d.prefixed8()
			if !ok || len(l) == 0 || len(d) != 0 {
				return ch, false
			}
		case extSupportedVersions:
			l, ok := d.prefixed8()
			if !ok || len(l) == 0 || len(l)%2 != 0 || len(d) != 0 {
				return ch, false
			}
		case extSessionTicket, extQUICTransportParam:
			// Any body: crypto/tls keeps it whole.
		case extExtendedMaster, extSCT, extEarlyData:
			if len(d) != 0 {
				return ch, false
			}
		case extRenegotiationInfo, extPSKModes:
			// A uint8-prefixed byte string, possibly empty.
			if _, ok := d.prefixed8(); !ok || len(d) != 0 {
				return ch, false
			}
		case extCookie:
			c, ok := d.prefixed16()
			if !ok || len(c) == 0 || len(d) != 0 {
				return ch, false
			}
		case extKeyShare:
			// A list, possibly empty, of (group, non-empty key_exchange).
			l, ok := d.prefixed16()
			if !ok || len(d) != 0 {
				return ch, false
			}
			for len(l) > 0 {
				_, ok1 := l.u16()
				k, ok2 := l.prefixed16()
				if !ok1 || !ok2 || len(k) == 0 {
					return ch, false
				}
			}
		case extALPN:
			// A non-empty list of non-empty uint8-prefixed names.
			l, ok := d.prefixed16()
			if !ok || len(l) == 0 || len(d) != 0 {
				return ch, false
			}
			alpn, nalpn = l, 0
			for len(l) > 0 {
				p, ok := l.prefixed8()
				if !ok || len(p) == 0 {
					return ch, false
				}
				nalpn++
			}
		case extPreSharedKey:
			// The last extension; non-empty identities with non-empty
			// labels, then non-empty binders, each non-empty.
			if len(exts) != 0 {
				return ch, false
			}
			ids, ok1 := d.prefixed16()
			if !ok1 || len(ids) == 0 {
				return ch, false
			}
			for len(ids) > 0 {
				label, ok1 := ids.prefixed16()
				_, ok2 := ids.read(4) // obfuscated_ticket_age
				if !ok1 || !ok2 || len(label) == 0 {
					return ch, false
				}
			}
			binders, ok2 := d.prefixed16()
			if !ok2 || len(binders) == 0 || len(d) != 0 {
				return ch, false
			}
			for len(binders) > 0 {
				bd, ok := binders.prefixed8()
				if !ok || len(bd) == 0 {
					return ch, false
				}
			}
		case extECH:
			// Only an outer ECH extension (real or GREASE), exactly as
			// parseECHExt reads it and with nothing after it. crypto/tls
			// parses a non-empty ECH extension before GetConfigForClient
			// and, having no ECH keys here, goes on with the outer hello.
			// An empty one, an inner one or trailing bytes: not ours.
			if !fastECHOuter(d) {
				return ch, false
			}
			ch.ECH = true
		default:
			// crypto/tls ignores extensions it does not know. We skip only
			// the ones real clients send (TestHelloFastSkippedExtensions checks
			// crypto/tls still ignores each); anything else is not ours.
			if !skippedExt(typ) {
				return ch, false
			}
		}
	}

	if sawServer {
		ch.ServerName = string(name)
	}
	if nalpn > 0 {
		ch.ALPN = make([]string, 0, nalpn)
		for len(alpn) > 0 {
			p, _ := alpn.prefixed8() // validated above
			ch.ALPN = append(ch.ALPN, alpnString(p))
		}
	}
	return ch, true
}

// fastHostName reports whether n is a host name the fast path takes:
// 1 to 253 bytes of letters, digits, '-' and '_' in non-empty labels
// separated by single dots (so no leading or trailing dot). crypto/tls
// takes any non-empty name without a trailing dot; names outside this set
// go through it and are judged there.
func fastHostName(n []byte) bool {
	if len(n) == 0 || len(n) > maxFastSNI || n[0] == '.' || n[len(n)-1] == '.' {
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

// fastECHOuter reports whether d is an outer encrypted_client_hello
// extension body: type 0, cipher suite (KDF, AEAD), config id, enc and
// payload, each as parseECHExt reads them, and nothing more.
func fastECHOuter(d helloBytes) bool {
	t, ok := d.u8()
	if !ok || t != 0 {
		return false
	}
	if _, ok := d.read(5); !ok { // KDF id, AEAD id, config id
		return false
	}
	_, ok1 := d.prefixed16() // enc
	_, ok2 := d.prefixed16() // payload
	return ok1 && ok2 && len(d) == 0
}

// skippedExt reports whether typ is an extension crypto/tls (Go 1.26)
// ignores in a ClientHello that real clients send, so the fast path may
// skip it too.
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

// alpnString converts an ALPN protocol name, without allocating for the
// common ones.
func alpnString(p []byte) string {
	switch string(p) {
	case "h2":
		return "h2"
	case "http/1.1":
		return "http/1.1"
	case "http/1.0":
		return "http/1.0"
	}
	return string(p)
}

// helloBytes reads big-endian fields from the front of a byte slice, like
// cryptobyte.String; each read reports false, and consumes nothing, when
// the slice is too short.
type helloBytes []byte

func (s *helloBytes) read(n int) ([]byte, bool) {
	if n < 0 || len(*s) < n {
		return nil, false
	}
	v := (*s)[:n:n]
	*s = (*s)[n:]
	return v, true
}

func (s *helloBytes) u8() (byte, bool) {
	v, ok := s.read(1)
	if !ok {
		return 0, false
	}
	return v[0], true
}

func (s *helloBytes) u16() (uint16, bool) {
	v, ok := s.read(2)
	if !ok {
		return 0, false
	}
	return uint16(v[0])<<8 | uint16(v[1]), true
}

// prefixed8 reads a uint8 length and that many bytes.
func (s *helloBytes) prefixed8() (helloBytes, bool) {
	if len(*s) < 1 || len(*s) < 1+int((*s)[0]) {
		return nil, false
	}
	n := int((*s)[0])
	v := (*s)[1 : 1+n : 1+n]
	*s = (*s)[1+n:]
	return v, true
}

// prefixed16 reads a uint16 length and that many bytes.
func (s *helloBytes) prefixed16() (helloBytes, bool) {
	if len(*s) < 2 {
		return nil, false
	}
	n := int((*s)[0])<<8 | int((*s)[1])
	if len(*s) < 2+n {
		return nil, false
	}
	v := (*s)[2 : 2+n : 2+n]
	*s = (*s)[2+n:]
	return v, true
}
