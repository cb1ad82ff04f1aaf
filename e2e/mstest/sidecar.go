package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// soOriginalDst is SO_ORIGINAL_DST (level SOL_IP) and IP6T_SO_ORIGINAL_DST
// (level SOL_IPV6); both are 80.
const soOriginalDst = 80

// sidecarReadyEvent is printed once both listeners are up.
type sidecarReadyEvent struct {
	Event    string `json:"event"` // "ready"
	Outbound string `json:"outbound"`
	Inbound  string `json:"inbound"`
}

// sidecarAcceptEvent is printed for each intercepted connection whose
// original destination is known.
type sidecarAcceptEvent struct {
	Event    string `json:"event"` // "accept"
	ID       uint64 `json:"id"`
	Listener string `json:"listener"` // "outbound" or "inbound"
	OrigDst  string `json:"orig_dst"`
	Peer     string `json:"peer"`
	Local    string `json:"local"`
	V4Mapped bool   `json:"v4mapped,omitempty"`
}

// upstreamEvent is printed once the sidecar is connected to the original
// destination.
type upstreamEvent struct {
	Event    string `json:"event"` // "upstream"
	ID       uint64 `json:"id"`
	Listener string `json:"listener"`
	OrigDst  string `json:"orig_dst"`
	Local    string `json:"local"`
	Remote   string `json:"remote"`
}

// gateEvent is printed when an accepted connection waits for
// --orig-dst-gate.
type gateEvent struct {
	Event    string `json:"event"` // "gate"
	ID       uint64 `json:"id"`
	Listener string `json:"listener"`
}

// warningEvent reports a degraded but working situation.
type warningEvent struct {
	Event    string `json:"event"` // "warning"
	ID       uint64 `json:"id,omitempty"`
	Listener string `json:"listener,omitempty"`
	Message  string `json:"message"`
}

// sidecarCloseEvent is printed when a proxied connection is finished.
type sidecarCloseEvent struct {
	Event     string `json:"event"` // "close"
	ID        uint64 `json:"id"`
	Listener  string `json:"listener"`
	OrigDst   string `json:"orig_dst"`
	BytesUp   int64  `json:"bytes_up"`   // downstream to upstream
	BytesDown int64  `json:"bytes_down"` // upstream to downstream
	Error     string `json:"error,omitempty"`
}

type sidecar struct {
	quiet                     bool
	origDstGate               string
	outboundPort, inboundPort int
	dialTimeout               time.Duration
	inboundV4                 netip.Addr
	inboundV6                 netip.Addr
	ids                       atomic.Uint64
}

// runSidecar runs a minimal sidecar following Envoy's interception contract:
// connections redirected to the outbound listener are forwarded to their
// original destination (read with SO_ORIGINAL_DST), connections redirected
// to the inbound listener likewise but from source 127.0.0.6 (::6 for
// IPv6), like Envoy's inbound passthrough cluster. Run it as uid 1337 so
// that its own connections are not intercepted again.
func runSidecar(args []string) int {
	fs := flag.NewFlagSet("sidecar", flag.ContinueOnError)
	outPort := fs.Int("outbound-port", 15001, "outbound listener port")
	inPort := fs.Int("inbound-port", 15006, "inbound listener port")
	v4only := fs.Bool("listen-v4only", false, "listen on 0.0.0.0 instead of dual-stack [::], like Envoy's IPv4 listeners")
	dialTimeout := fs.Duration("dial-timeout", 5*time.Second, "timeout for connecting to the original destination")
	inV4 := fs.String("inbound-source-v4", "127.0.0.6", "source address of inbound upstream connections over IPv4")
	inV6 := fs.String("inbound-source-v6", "::6", "source address of inbound upstream connections over IPv6 (falls back to none, with a warning event, when it cannot be bound)")
	fs.BoolVar(&sidecarResets, "propagate-resets", false, "when one side resets the connection, reset the other (SO_LINGER 0), as Envoy does")
	fs.BoolVar(&sidecarIOCopy, "iocopy", false, "copy with io.Copy (Go splices between two TCP connections), as some proxies do, instead of read/write loops")
	origDstGate := fs.String("orig-dst-gate", "", "after accept, wait until this file exists before asking SO_ORIGINAL_DST (tests: a destination evicted in between)")
	quiet := fs.Bool("quiet", false, "print no accept, upstream and close events, only errors and warnings (benchmarks: thousands of connections)")
	if code, ok := parseFlags(fs, args); !ok {
		return code
	}
	sc := &sidecar{dialTimeout: *dialTimeout, outboundPort: *outPort, inboundPort: *inPort, quiet: *quiet, origDstGate: *origDstGate}
	var err error
	if sc.inboundV4, err = netip.ParseAddr(*inV4); err != nil || !sc.inboundV4.Is4() {
		logf("sidecar: bad --inbound-source-v4 %q", *inV4)
		return 2
	}
	if sc.inboundV6, err = netip.ParseAddr(*inV6); err != nil || !sc.inboundV6.Is6() {
		logf("sidecar: bad --inbound-source-v6 %q", *inV6)
		return 2
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	listeners := map[string]net.Listener{}
	for name, port := range map[string]int{"outbound": *outPort, "inbound": *inPort} {
		network, addr := listenAddr(port, *v4only)
		ln, err := net.Listen(network, addr)
		if err != nil {
			emit(errorEvent{Event: "error", Listener: name, Stage: "listen", Error: err.Error(), Errno: errnoName(err)})
			return 1
		}
		listeners[name] = ln
	}
	emit(sidecarReadyEvent{Event: "ready", Outbound: addrString(listeners["outbound"].Addr()), Inbound: addrString(listeners["inbound"].Addr())})

	var wg sync.WaitGroup
	for name, ln := range listeners {
		go func() {
			<-ctx.Done()
			ln.Close()
		}()
		wg.Go(func() {
			var conns sync.WaitGroup
			defer conns.Wait()
			for {
				c, err := ln.Accept()
				if err != nil {
					if ctx.Err() != nil {
						return
					}
					emit(errorEvent{Event: "error", Listener: name, Stage: "accept", Error: err.Error(), Errno: errnoName(err)})
					continue
				}
				conns.Go(func() { sc.handle(name, c.(*net.TCPConn)) })
			}
		})
	}
	wg.Wait()
	return 0
}

func (sc *sidecar) handle(listener string, down *net.TCPConn) {
	defer down.Close()
	id := sc.ids.Add(1)
	peer, local := addrString(down.RemoteAddr()), addrString(down.LocalAddr())
	v4 := false
	if ap, ok := addrPort(down.RemoteAddr()); ok {
		v4 = ap.Addr().Unmap().Is4()
	}
	fail := func(stage string, od string, err error) {
		emit(errorEvent{Event: "error", Listener: listener, ID: id, Stage: stage, Error: err.Error(), Errno: errnoName(err), Peer: peer, Local: local, OrigDst: od})
	}

	if sc.origDstGate != "" {
		emit(gateEvent{Event: "gate", ID: id, Listener: listener})
		for {
			if _, err := os.Stat(sc.origDstGate); err == nil {
				break
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	od, err := originalDst(down, v4)
	if err != nil {
		fail("orig_dst", "", err)
		return
	}
	// A loop guard like Envoy's: forwarding to our own listener port would
	// come straight back. The local address alone proves nothing: with
	// TPROXY or sk_lookup capture it IS the original destination.
	if od.Port() == uint16(sc.outboundPort) || od.Port() == uint16(sc.inboundPort) {
		fail("orig_dst", od.String(), errors.New("original destination is a sidecar listener port (connection was not redirected)"))
		return
	}
	if !sc.quiet {
		emit(sidecarAcceptEvent{Event: "accept", ID: id, Listener: listener, OrigDst: od.String(), Peer: peer, Local: local, V4Mapped: isV4Mapped(down.RemoteAddr())})
	}

	d := net.Dialer{Timeout: sc.dialTimeout}
	if listener == "inbound" {
		src := sc.inboundV4
		if od.Addr().Is6() {
			src = sc.inboundV6
		}
		d.LocalAddr = &net.TCPAddr{IP: src.AsSlice()}
	}
	c, err := d.Dial("tcp", od.String())
	if err != nil && d.LocalAddr != nil && od.Addr().Is6() && errors.Is(err, unix.EADDRNOTAVAIL) {
		emit(warningEvent{Event: "warning", ID: id, Listener: listener, Message: fmt.Sprintf("cannot bind inbound source %s (%v); dialing %s without a source address", sc.inboundV6, err, od)})
		d.LocalAddr = nil
		c, err = d.Dial("tcp", od.String())
	}
	if err != nil {
		fail("dial", od.String(), err)
		return
	}
	up := c.(*net.TCPConn)
	defer up.Close()
	if !sc.quiet {
		emit(upstreamEvent{Event: "upstream", ID: id, Listener: listener, OrigDst: od.String(), Local: addrString(up.LocalAddr()), Remote: addrString(up.RemoteAddr())})
	}

	ev := sidecarCloseEvent{Event: "close", ID: id, Listener: listener, OrigDst: od.String()}
	var err1 error
	ev.BytesUp, ev.BytesDown, err1 = proxy(down, up)
	if err1 != nil {
		ev.Error = err1.Error()
	}
	if !sc.quiet || ev.Error != "" {
		emit(ev)
	}
}

// proxy copies bytes both ways between down and up with explicit read/write
// loops (never io.Copy, which would splice), half-closing each direction at
// EOF. On an error in either direction both connections are closed.
func proxy(down, up *net.TCPConn) (bytesUp, bytesDown int64, err error) {
	var once sync.Once
	var first error
	abort := func(err error) {
		once.Do(func() {
			first = err
			if sidecarResets && errors.Is(err, unix.ECONNRESET) {
				down.SetLinger(0)
				up.SetLinger(0)
			}
			down.Close()
			up.Close()
		})
	}
	// With --propagate-resets, like Envoy, a side that resets is read to
	// the end first: a write to it failing stops that direction only, and
	// the other direction passes on what the side sent before its reset,
	// then the reset.
	fail := func(err error) {
		var we writeError
		if sidecarResets && errors.As(err, &we) {
			return
		}
		abort(err)
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		var err error
		if bytesUp, err = copyLoop(up, down); err != nil {
			fail(fmt.Errorf("downstream to upstream: %w", err))
		}
	})
	wg.Go(func() {
		var err error
		if bytesDown, err = copyLoop(down, up); err != nil {
			fail(fmt.Errorf("upstream to downstream: %w", err))
		}
	})
	wg.Wait()
	return bytesUp, bytesDown, first
}

// writeError is a copyLoop write failure.
type writeError struct{ error }

func (e writeError) Unwrap() error { return e.error }

// sidecarIOCopy makes copyLoop use io.Copy (--iocopy); sidecarResets
// propagates resets (--propagate-resets).
var sidecarIOCopy, sidecarResets bool

// copyLoop moves bytes from src to dst until EOF, then half-closes dst.
func copyLoop(dst, src *net.TCPConn) (int64, error) {
	if sidecarIOCopy {
		n, err := io.Copy(dst, src)
		if err != nil {
			return n, fmt.Errorf("io.Copy: %w", err)
		}
		if cerr := dst.CloseWrite(); cerr != nil {
			return n, fmt.Errorf("close write: %w", cerr)
		}
		return n, nil
	}
	buf := make([]byte, 64<<10)
	var total int64
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return total, writeError{fmt.Errorf("write: %w", werr)}
			}
			total += int64(n)
		}
		if errors.Is(err, io.EOF) {
			if cerr := dst.CloseWrite(); cerr != nil {
				return total, fmt.Errorf("close write: %w", cerr)
			}
			return total, nil
		}
		if err != nil {
			return total, fmt.Errorf("read: %w", err)
		}
	}
}

// originalDst reads the original destination of a redirected connection
// with getsockopt: SOL_IP/SO_ORIGINAL_DST (struct sockaddr_in) when the
// peer is IPv4 or IPv4-mapped, SOL_IPV6/IP6T_SO_ORIGINAL_DST (struct
// sockaddr_in6) for native IPv6, exactly like Envoy. The raw getsockopt(2)
// is made on the connection's own descriptor so that cgroup/getsockopt BPF
// programs see it.
func originalDst(c *net.TCPConn, v4 bool) (netip.AddrPort, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("syscall conn: %w", err)
	}
	var ap netip.AddrPort
	var gerr error
	if err := rc.Control(func(fd uintptr) { ap, gerr = getOriginalDst(int(fd), v4) }); err != nil {
		return netip.AddrPort{}, fmt.Errorf("syscall conn control: %w", err)
	}
	return ap, gerr
}

func getOriginalDst(fd int, v4 bool) (netip.AddrPort, error) {
	if v4 {
		var sa unix.RawSockaddrInet4
		n := uint32(unsafe.Sizeof(sa))
		if err := getsockopt(fd, unix.SOL_IP, soOriginalDst, unsafe.Pointer(&sa), &n); err != nil {
			return netip.AddrPort{}, fmt.Errorf("getsockopt SOL_IP SO_ORIGINAL_DST: %w", err)
		}
		if sa.Family != unix.AF_INET {
			return netip.AddrPort{}, fmt.Errorf("getsockopt SOL_IP SO_ORIGINAL_DST: address family %d, want AF_INET", sa.Family)
		}
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), ntohs(sa.Port)), nil
	}
	var sa unix.RawSockaddrInet6
	n := uint32(unsafe.Sizeof(sa))
	if err := getsockopt(fd, unix.SOL_IPV6, soOriginalDst, unsafe.Pointer(&sa), &n); err != nil {
		return netip.AddrPort{}, fmt.Errorf("getsockopt SOL_IPV6 IP6T_SO_ORIGINAL_DST: %w", err)
	}
	if sa.Family != unix.AF_INET6 {
		return netip.AddrPort{}, fmt.Errorf("getsockopt SOL_IPV6 IP6T_SO_ORIGINAL_DST: address family %d, want AF_INET6", sa.Family)
	}
	return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), ntohs(sa.Port)), nil
}

// getsockopt is the raw getsockopt(2) system call.
func getsockopt(fd, level, opt int, val unsafe.Pointer, n *uint32) error {
	_, _, errno := syscall.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt), uintptr(val), uintptr(unsafe.Pointer(n)), 0)
	if errno != 0 {
		return errno
	}
	return nil
}

// ntohs converts a port in network byte order, as stored in a sockaddr.
func ntohs(p uint16) uint16 {
	b := (*[2]byte)(unsafe.Pointer(&p))
	return uint16(b[0])<<8 | uint16(b[1])
}
