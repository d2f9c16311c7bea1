//go:build egressd_e2e

package nfq

import "time"

// Break makes Serve's next read fail, as a read error of the socket
// would (a test's fault: the socket stays open, bound to its queue,
// until Close). Only in a build with the tag egressd_e2e (the e2e
// tests' binary), never in egressd's own.
func (c *Conn) Break() {
	c.file.SetReadDeadline(time.Unix(1, 0))
}
