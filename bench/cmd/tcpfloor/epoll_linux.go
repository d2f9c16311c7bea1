package main

import (
	"bytes"
	"net"
	"net/netip"
	"runtime"
	"sync"

	"golang.org/x/sys/unix"

	"egressd/internal/netutil"
)

// The epoll way: every socket is registered once, edge-triggered, for
// input, output and the peer's half-close, as Go's netpoller registers
// them; each event moves what can move until a call would block.

// origDst reads the original destination of a redirected IPv4 socket.
func origDst(fd int) (netip.AddrPort, error) { return netutil.OriginalDstFD(fd, true) }

func deferAccept(fd int) error {
	return unix.SetsockoptInt(fd, unix.IPPROTO_TCP, unix.TCP_DEFER_ACCEPT, 1)
}

const pipeSize = 1 << 20

type pipe struct{ r, w int }

// one direction of a tunnel
type flow struct {
	src, dst int
	p        pipe
	hasPipe  bool
	pending  int // bytes in p not yet written to dst
	eof      bool
}

type conn struct {
	c, u     int   // client and upstream sockets; -1 when not open
	gen      int32 // tells a reused descriptor's events from its predecessor's
	state    int
	hello    []byte
	c2u, u2c flow
	dead     bool
}

const (
	stHello = iota
	stConnecting
	stTunnel
)

type loop struct {
	mu    sync.Mutex // held while a batch of events is served, and by adopt
	ep    int
	allow []byte
	byFD  []*conn
	gen   int32
	pipes []pipe
	buf   [4096]byte
}

func serveEpoll(port int, allow []byte) error {
	ln, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	unix.SetsockoptInt(ln, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1)
	deferAccept(ln)
	if err := unix.Bind(ln, &unix.SockaddrInet4{Port: port}); err != nil {
		return err
	}
	if err := unix.Listen(ln, 4096); err != nil {
		return err
	}
	l, err := newLoop(allow)
	if err != nil {
		return err
	}
	if err := l.register(ln, -1); err != nil {
		return err
	}
	return l.run(ln)
}

// serveHybrid accepts, reads the first bytes and dials as the goroutine
// way does, then hands both sockets (duplicated out of Go's netpoller,
// whose descriptors are closed) to an epoll loop for the splicing.
func serveHybrid(port int, allow []byte) error {
	l, err := newLoop(allow)
	if err != nil {
		return err
	}
	errc := make(chan error, 1)
	go func() { errc <- l.run(-1) }()
	go func() { errc <- serveGoroutines(port, allow, l.adopt) }()
	return <-errc
}

func newLoop(allow []byte) (*loop, error) {
	l := &loop{allow: allow}
	var err error
	l.ep, err = unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	return l, err
}

// run waits for events on its own thread; ln is the listener, or -1.
func (l *loop) run(ln int) error {
	runtime.LockOSThread()
	events := make([]unix.EpollEvent, 256)
	for {
		n, err := unix.EpollWait(l.ep, events, -1)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		l.mu.Lock()
		for i := range events[:n] {
			ev := &events[i]
			fd := int(ev.Fd)
			if fd == ln {
				l.accept(ln)
				continue
			}
			if fd >= len(l.byFD) || l.byFD[fd] == nil || l.byFD[fd].gen != ev.Pad {
				continue // closed earlier in this batch
			}
			l.event(l.byFD[fd], fd, ev.Events)
		}
		l.mu.Unlock()
	}
}

// adopt takes over the splicing of a forwarded connection (serveHybrid).
func (l *loop) adopt(c, u *net.TCPConn) {
	cfd, err := dupFD(c)
	if err != nil {
		return
	}
	ufd, err := dupFD(u)
	if err != nil {
		unix.Close(cfd)
		return
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	l.gen++
	t := &conn{c: cfd, u: ufd, gen: l.gen, state: stTunnel}
	t.c2u = flow{src: cfd, dst: ufd}
	t.u2c = flow{src: ufd, dst: cfd}
	l.set(cfd, t)
	l.set(ufd, t)
	if l.register(cfd, t.gen) != nil || l.register(ufd, t.gen) != nil {
		l.close(t)
		return
	}
	l.move(t, &t.c2u)
	l.move(t, &t.u2c)
}

// dupFD returns a duplicate of c's descriptor, which stays open (and out
// of Go's netpoller) when c is closed.
func dupFD(c *net.TCPConn) (int, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return -1, err
	}
	fd, derr := -1, error(nil)
	if err := rc.Control(func(f uintptr) { fd, derr = unix.FcntlInt(f, unix.F_DUPFD_CLOEXEC, 0) }); err != nil {
		return -1, err
	}
	return fd, derr
}

func (l *loop) register(fd int, gen int32) error {
	ev := unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLOUT | unix.EPOLLRDHUP | unix.EPOLLET, Fd: int32(fd), Pad: gen}
	return unix.EpollCtl(l.ep, unix.EPOLL_CTL_ADD, fd, &ev)
}

func (l *loop) set(fd int, c *conn) {
	for fd >= len(l.byFD) {
		l.byFD = append(l.byFD, nil)
	}
	l.byFD[fd] = c
}

func (l *loop) accept(ln int) {
	for {
		fd, _, err := unix.Accept4(ln, unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC)
		if err == unix.EINTR || err == unix.ECONNABORTED {
			continue
		}
		if err != nil {
			return // EAGAIN, or out of descriptors until the next event
		}
		l.gen++
		c := &conn{c: fd, u: -1, gen: l.gen}
		l.set(fd, c)
		if l.register(fd, c.gen) != nil {
			l.close(c)
			continue
		}
		l.readHello(c) // under TCP_DEFER_ACCEPT the bytes are usually there
	}
}

func (l *loop) event(c *conn, fd int, ev uint32) {
	switch c.state {
	case stHello:
		l.readHello(c)
	case stConnecting:
		if fd == c.u {
			l.connected(c)
		}
	case stTunnel:
		in, out := &c.c2u, &c.u2c // the flows fd reads and writes
		if fd == c.u {
			in, out = out, in
		}
		if ev&(unix.EPOLLIN|unix.EPOLLRDHUP|unix.EPOLLHUP|unix.EPOLLERR) != 0 {
			l.move(c, in)
		}
		// Output: only when bytes wait for fd (every input event also
		// reports the socket writable).
		if ev&(unix.EPOLLOUT|unix.EPOLLHUP|unix.EPOLLERR) != 0 && out.pending > 0 {
			l.move(c, out)
		}
	}
}

func (l *loop) readHello(c *conn) {
	n, err := unix.Read(c.c, l.buf[:])
	if err == unix.EAGAIN || err == unix.EINTR {
		return
	}
	if err != nil || n <= 0 || !bytes.Contains(l.buf[:n], l.allow) {
		l.close(c)
		return
	}
	c.hello = append([]byte(nil), l.buf[:n]...)
	dst, err := origDst(c.c)
	if err != nil || !dst.Addr().Is4() {
		l.close(c)
		return
	}
	u, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		l.close(c)
		return
	}
	c.u, c.state = u, stConnecting
	l.set(u, c)
	if l.register(u, c.gen) != nil {
		l.close(c)
		return
	}
	sa := &unix.SockaddrInet4{Port: int(dst.Port()), Addr: dst.Addr().As4()}
	if err := unix.Connect(u, sa); err != nil && err != unix.EINPROGRESS {
		l.close(c)
	}
	// the upstream's output event says the connect is done
}

func (l *loop) connected(c *conn) {
	e, err := unix.GetsockoptInt(c.u, unix.SOL_SOCKET, unix.SO_ERROR)
	if err == nil && e == int(unix.EINPROGRESS) {
		return
	}
	if err != nil || e != 0 {
		l.close(c)
		return
	}
	unix.SetsockoptInt(c.c, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
	unix.SetsockoptInt(c.u, unix.IPPROTO_TCP, unix.TCP_NODELAY, 1)
	if n, err := unix.Write(c.u, c.hello); err != nil || n != len(c.hello) {
		l.close(c) // a fresh socket takes a first segment whole
		return
	}
	c.hello, c.state = nil, stTunnel
	c.c2u = flow{src: c.c, dst: c.u}
	c.u2c = flow{src: c.u, dst: c.c}
	l.move(c, &c.c2u)
	l.move(c, &c.u2c)
}

// move splices f's bytes until its source is drained or its destination
// full; at the source's end it half-closes the destination.
func (l *loop) move(c *conn, f *flow) {
	for !c.dead {
		if f.pending > 0 {
			m, err := unix.Splice(f.p.r, nil, f.dst, nil, f.pending, unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
			switch {
			case err == unix.EINTR:
				continue
			case err == unix.EAGAIN:
				return // the destination's output event resumes
			case err != nil:
				l.close(c)
				return
			}
			f.pending -= int(m)
			continue
		}
		if f.eof {
			return
		}
		if !f.hasPipe {
			p, err := l.getPipe()
			if err != nil {
				l.close(c)
				return
			}
			f.p, f.hasPipe = p, true
		}
		n, err := unix.Splice(f.src, nil, f.p.w, nil, pipeSize, unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			l.pipes = append(l.pipes, f.p) // empty: back to the free list
			f.hasPipe = false
			return
		case err != nil:
			l.close(c)
			return
		case n == 0:
			f.eof = true
			unix.Shutdown(f.dst, unix.SHUT_WR)
			if c.c2u.eof && c.u2c.eof {
				l.close(c)
			}
			return
		}
		f.pending = int(n)
	}
}

func (l *loop) getPipe() (pipe, error) {
	if n := len(l.pipes); n > 0 {
		p := l.pipes[n-1]
		l.pipes = l.pipes[:n-1]
		return p, nil
	}
	var fds [2]int
	if err := unix.Pipe2(fds[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		return pipe{}, err
	}
	unix.FcntlInt(uintptr(fds[0]), unix.F_SETPIPE_SZ, pipeSize)
	return pipe{fds[0], fds[1]}, nil
}

func (l *loop) close(c *conn) {
	if c.dead {
		return
	}
	c.dead = true
	for _, f := range []*flow{&c.c2u, &c.u2c} {
		switch {
		case !f.hasPipe:
		case f.pending == 0:
			l.pipes = append(l.pipes, f.p)
		default:
			unix.Close(f.p.r)
			unix.Close(f.p.w)
		}
	}
	for _, fd := range []int{c.c, c.u} {
		if fd >= 0 {
			l.byFD[fd] = nil
			unix.Close(fd) // also leaves the epoll set
		}
	}
}
