package proxy

import "egressd/internal/httpwire"

// httpMethods are the request methods that make the transparent proxy treat
// a connection as HTTP/1.x.
var httpMethods = []string{"GET ", "POST ", "HEAD ", "PUT ", "DELETE ", "OPTIONS ", "PATCH ", "TRACE ", "CONNECT "}

// looksHTTP reports whether b starts like an HTTP/1.x request, or could
// still (more reports whether more bytes are needed to know).
func looksHTTP(b []byte) (yes, more bool) {
	for _, m := range httpMethods {
		n := min(len(b), len(m))
		if string(b[:n]) == m[:n] {
			if n == len(m) {
				return true, false
			}
			more = true
		}
	}
	if y, m := httpwire.RequestLineStart(b); y {
		return true, false
	} else if m {
		more = true
	}
	return false, more
}
