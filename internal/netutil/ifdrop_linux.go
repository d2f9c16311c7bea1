package netutil

import (
	"fmt"
	"syscall"

	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

// dropFromProgram is a classic BPF socket filter that drops every packet
// whose incoming interface has index ifindex and keeps every other one
// whole. A first loads "keep" (the ancillary load of the interface index
// ends the program with A's value when the packet has no device, as the
// kernel's translation of SKF_AD_IFINDEX does: such a packet came from no
// wire, and is kept); then the interface index, compared with ifindex.
func dropFromProgram(ifindex int) ([]bpf.RawInstruction, error) {
	return bpf.Assemble([]bpf.Instruction{
		bpf.LoadConstant{Dst: bpf.RegA, Val: 0xffffffff},
		bpf.LoadExtension{Num: bpf.ExtInterfaceIndex},
		bpf.JumpIf{Cond: bpf.JumpNotEqual, Val: uint32(ifindex), SkipTrue: 1},
		bpf.RetConstant{Val: 0},
		bpf.RetConstant{Val: 0xffffffff},
	})
}

// DropFromInterfaceFD attaches to the socket fd a filter that drops the
// packets arriving on the interface of index ifindex (SO_ATTACH_FILTER;
// it replaces the socket's filter, if it had one). On a listening TCP
// socket it drops the SYNs, so no handshake starts, and the connections
// accepted from it inherit it; on a UDP socket the datagrams, before they
// are queued (recvmsg and recvmmsg never see them). The kernel runs it
// for every packet the socket receives, before queueing: a few
// instructions, nothing in Go. An MPTCP socket (Go's default for TCP
// listeners where the kernel has MPTCP) refuses filters, EOPNOTSUPP:
// listen with ListenConfig.SetMultipathTCP(false). Zero ifindex detaches the socket's filter
// (none attached: no error).
func DropFromInterfaceFD(fd, ifindex int) error {
	if ifindex == 0 {
		err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_DETACH_FILTER, 0)
		if err != nil && err != unix.ENOENT {
			return fmt.Errorf("%w: %w", ErrSocketFilter, err)
		}
		return nil
	}
	if ifindex < 0 {
		return fmt.Errorf("netutil: interface index %d", ifindex)
	}
	prog, err := dropFromProgram(ifindex)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrSocketFilter, err)
	}
	f := make([]unix.SockFilter, len(prog))
	for i, in := range prog {
		f[i] = unix.SockFilter{Code: in.Op, Jt: in.Jt, Jf: in.Jf, K: in.K}
	}
	if err := unix.SetsockoptSockFprog(fd, unix.SOL_SOCKET, unix.SO_ATTACH_FILTER, &unix.SockFprog{Len: uint16(len(f)), Filter: &f[0]}); err != nil {
		if err == unix.EOPNOTSUPP {
			return fmt.Errorf("%w: %w (an MPTCP socket? listen with plain TCP: ListenConfig.SetMultipathTCP(false))", ErrSocketFilter, err)
		}
		return fmt.Errorf("%w: %w", ErrSocketFilter, err)
	}
	return nil
}

// DropFromInterface is DropFromInterfaceFD on a socket's RawConn (a
// net.ListenConfig's Control, or SyscallConn).
func DropFromInterface(rc syscall.RawConn, ifindex int) error {
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = DropFromInterfaceFD(int(fd), ifindex) }); err != nil {
		return err
	}
	return serr
}
