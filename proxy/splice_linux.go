package proxy

import (
	"io"
	"net"

	"golang.org/x/sys/unix"
)

// spliceCopy copies src to dst through a pipe with splice(2), so the bytes
// stay in the kernel, like io.Copy between two *net.TCPConn. Unlike the
// standard library's splice, it holds a pipe only while bytes move: when
// src has nothing to read, the (empty) pipe goes back to the free list
// before the wait, so an idle tunnel costs its two sockets and no pipe (4
// file descriptors and two pipe buffers fewer per idle tunnel). A chunk
// costs three system calls: the splice in, the splice out, and the splice
// in that finds src drained (an earlier version also peeked before taking
// a pipe and after giving it back: five).
// It returns at EOF (nil) or on the first error.
//
// moved, when not nil, is called after each chunk is written (the tunnel's
// idle deadline once it is half-closed).
func spliceCopy(dst, src *net.TCPConn, moved func()) (int64, error) {
	srcRC, err := src.SyscallConn()
	if err != nil {
		return 0, err
	}
	dstRC, err := dst.SyscallConn()
	if err != nil {
		return 0, err
	}
	var (
		written int64
		pp      *pipe
	)
	defer func() {
		if pp != nil {
			pp.release() // a failed write may have left bytes in it
		}
	}()
	for {
		// Fill the pipe with what src has now; when it has nothing, give
		// the pipe back and wait (the poller calls this again once src is
		// readable).
		var n int
		var serr error
		err := srcRC.Read(func(fd uintptr) bool {
			if pp == nil {
				if pp, serr = getPipe(); serr != nil {
					return true
				}
			}
			for {
				n64, e := unix.Splice(int(fd), nil, pp.w, nil, pipeSize, unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
				switch e {
				case unix.EINTR:
					continue
				case unix.EAGAIN:
					putPipe(pp) // empty: nothing was moved into it
					pp = nil
					return false
				}
				n, serr = int(n64), e
				return true
			}
		})
		if err == nil {
			err = serr
		}
		if err != nil || n == 0 {
			// EOF or a failed read (a reset, say): nothing was moved
			// into the pipe, which goes back to the free list. Closing
			// it cost every tunnel's successor a pipe(2) and an fcntl.
			if pp != nil {
				putPipe(pp)
				pp = nil
			}
			return written, err
		}
		// Drain the pipe into dst.
		left := n
		var werr error
		err = dstRC.Write(func(fd uintptr) bool {
			for left > 0 {
				m, e := unix.Splice(pp.r, nil, int(fd), nil, left, unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
				switch {
				case e == unix.EINTR:
					continue
				case e == unix.EAGAIN:
					return false
				case e != nil:
					werr = e
					return true
				}
				left -= int(m)
				written += m
			}
			return true
		})
		if err == nil {
			err = werr
		}
		if err != nil {
			return written, err
		}
		if moved != nil {
			moved()
		}
	}
}

// pipeSize is the pipe capacity asked for, and how much one splice moves
// at most.
const pipeSize = 1 << 20

// pipe is a pipe for splice. Pipes in the free list are empty.
type pipe struct {
	r, w int
}

// freePipes keeps empty pipes for reuse. A bounded list rather than a
// sync.Pool: the pool drops its contents at every garbage collection,
// which would make busy proxies create and close pipes all the time.
var freePipes = make(chan *pipe, 512)

func getPipe() (*pipe, error) {
	select {
	case p := <-freePipes:
		return p, nil
	default:
	}
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		return nil, err
	}
	// A larger pipe moves more per splice on bulk transfers, as the
	// standard library does; its pages are only allocated while bytes sit
	// in it. A failure leaves the default 64 KiB.
	unix.FcntlInt(uintptr(fds[0]), unix.F_SETPIPE_SZ, pipeSize)
	return &pipe{r: fds[0], w: fds[1]}, nil
}

// putPipe returns an empty pipe to the free list, or closes it when the
// list is full.
func putPipe(p *pipe) {
	select {
	case freePipes <- p:
	default:
		p.release()
	}
}

// release closes a pipe (one that may still hold bytes after an error, or
// one the free list has no room for).
func (p *pipe) release() {
	unix.Close(p.r)
	unix.Close(p.w)
}

// copyConn copies src to dst: spliceCopy between two TCP connections,
// io.Copy otherwise. moved, when not nil, is called after each chunk.
func copyConn(dst, src net.Conn, moved func()) (int64, error) {
	d, ok1 := dst.(*net.TCPConn)
	s, ok2 := src.(*net.TCPConn)
	if ok1 && ok2 {
		return spliceCopy(d, s, moved)
	}
	if moved == nil {
		return io.Copy(dst, src)
	}
	return io.Copy(dst, notifyReader{src, moved})
}

// notifyReader calls moved after each read that returned bytes.
type notifyReader struct {
	r     io.Reader
	moved func()
}

func (n notifyReader) Read(p []byte) (int, error) {
	k, err := n.r.Read(p)
	if k > 0 {
		n.moved()
	}
	return k, err
}
