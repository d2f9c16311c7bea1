package capture

// Parsing of the TLS ClientHello, the one message capture reads to name a
// TLS flow (RFC 8446 §4.1.2, RFC 6066 §3). Every length is checked; a
// malformed hello is an error, never a panic.

import "errors"

// Limits on what is buffered to find a ClientHello (THREATS C3): a record
// is at most 16 KiB plus expansion, a hello at most 64 KiB.
const (
	maxRecord    = 16384 + 2048
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
// length, body) that must be a ClientHello.
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
	r.bytes(2)       // legacy_version
	r.bytes(32)      // random
	r.bytes(r.u8())  // legacy_session_id
	r.bytes(r.u16()) // cipher_suites
	r.bytes(r.u8())  // legacy_compression_methods
	if !r.ok {
		return h, errMalformed
	}
	if len(r.b) == 0 {
		return h, nil // no extensions (SSL 3.0 style hello)
	}
	ext := reader{b: r.bytes(r.u16()), ok: true}
	if !r.ok {
		return h, errMalformed
	}
	sawSNI := false
	for len(ext.b) > 0 {
		typ := ext.u16()
		data := ext.bytes(ext.u16())
		if !ext.ok {
			return h, errMalformed
		}
		switch typ {
		case 0: // server_name
			if sawSNI {
				h.DupSNI = true
				continue // the first one is the one we report
			}
			sawSNI = true
			sr := reader{b: data, ok: true}
			list := reader{b: sr.bytes(sr.u16()), ok: true}
			if !sr.ok {
				return h, errMalformed
			}
			for len(list.b) > 0 {
				nt := list.u8()
				name := list.bytes(list.u16())
				if !list.ok {
					return h, errMalformed
				}
				switch {
				case nt != 0:
				case len(name) == 0 || name[len(name)-1] == '.':
					// crypto/tls, and so the proxy, refuses an empty
					// host_name and one ending in a dot.
					if h.SNI == "" {
						h.SNI = string(name)
					}
					return h, errMalformed
				case h.SNI == "":
					h.SNI = string(name) // the first one is the one we report
				default:
					h.DupSNI = true // the proxy counts host names, not extensions
				}
			}
		case 0xfe0d, 0xffce:
			h.ECH = true
		}
	}
	return h, nil
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
		if len(stream) < 5 {
			if len(stream) >= 1 && stream[0] != 22 {
				return nil, errNotTLS
			}
			if len(stream) >= 2 && stream[1] != 3 {
				return nil, errNotTLS
			}
			return nil, nil
		}
		if stream[0] != 22 || stream[1] != 3 {
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
