package main

import (
	"fmt"
	"net/netip"
	"unsafe"

	"golang.org/x/sys/unix"
)

// rawState is the raw reader's memory, on the heap: the system calls get
// pointers into it.
type rawState struct {
	in, out   [batch]unix.Mmsghdr
	iov, oiov [batch]unix.Iovec
	names     [batch]unix.RawSockaddrInet4
	qbuf      [batch][1500]byte
	abuf      [batch][1500]byte
}

// runRaw serves listen (IPv4) from a socket Go's netpoller never sees: a
// blocking socket made with socket(2), read with recvmmsg (MSG_WAITFORONE)
// and answered with sendmmsg, both called directly. It shows what waiting
// in the kernel, rather than in the runtime's epoll, does to the tail.
func runRaw(listen string) error {
	ap, err := netip.ParseAddrPort(listen)
	if err != nil || !ap.Addr().Is4() {
		return fmt.Errorf("raw mode wants an IPv4 address and port, not %q", listen)
	}
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if err := unix.Bind(fd, &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ap.Addr().As4()}); err != nil {
		return err
	}
	st := new(rawState)
	for i := range st.in {
		st.iov[i].Base = &st.qbuf[i][0]
		st.iov[i].SetLen(len(st.qbuf[i]))
		st.in[i].Hdr.Iov = &st.iov[i]
		st.in[i].Hdr.SetIovlen(1)
		st.in[i].Hdr.Name = (*byte)(unsafe.Pointer(&st.names[i]))
	}
	for {
		for i := range st.in {
			st.in[i].Hdr.Namelen = unix.SizeofSockaddrInet4
		}
		n, _, errno := unix.Syscall6(unix.SYS_RECVMMSG, uintptr(fd), uintptr(unsafe.Pointer(&st.in[0])), batch, unix.MSG_WAITFORONE, 0, 0)
		if errno == unix.EINTR {
			continue
		}
		if errno != 0 {
			return errno
		}
		k := 0
		for i := range int(n) {
			a := answer(st.abuf[i][:0], st.qbuf[i][:st.in[i].Len])
			if a == nil {
				continue
			}
			st.oiov[k].Base = &a[0]
			st.oiov[k].SetLen(len(a))
			st.out[k].Hdr = unix.Msghdr{Name: st.in[i].Hdr.Name, Namelen: st.in[i].Hdr.Namelen, Iov: &st.oiov[k]}
			st.out[k].Hdr.SetIovlen(1)
			k++
		}
		for sent := 0; sent < k; {
			m, _, errno := unix.Syscall6(unix.SYS_SENDMMSG, uintptr(fd), uintptr(unsafe.Pointer(&st.out[sent])), uintptr(k-sent), 0, 0, 0)
			if errno == unix.EINTR {
				continue
			}
			if errno != 0 {
				break
			}
			sent += int(m)
		}
	}
}
