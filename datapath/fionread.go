package datapath

import (
	"errors"
	"fmt"
	"net"
	"strings"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// fionreadProbeBytes is what the probe sends over TCP to a socket with a
// psock.
const fionreadProbeBytes = 100

// ProbeFionread measures what ioctl(FIONREAD) answers, on this kernel, for
// a socket in a sockmap (it has a psock, as every spliced socket does)
// whose bytes came over TCP, as they do after a redirect fell back (a miss,
// a drain, backpressure). Linux 6.18's tcp_bpf_ioctl counts only the psock
// queue: it answers 0 while the bytes wait, and a reader that waits for
// FIONREAD > 0 (a loop on Java's available()) would wait for ever.
// meshsplice cannot change the answer, so app sockets, whose readers are
// anyone's code, are spliced by default only where it is right. It uses a
// loopback connection of the caller's network namespace for a few
// milliseconds.
func ProbeFionread() ProbeResult {
	r := ProbeResult{Name: "FIONREAD of a spliced socket after a fallback to TCP"}
	got, err := fionreadOf(true)
	switch {
	case err != nil:
		r.Name += ": not measured"
		r.Detail = err.Error()
	case got == fionreadProbeBytes:
		r.OK = true
		r.Name += ": right"
		r.Detail = fmt.Sprintf("%d bytes waiting over TCP read as %d", fionreadProbeBytes, got)
	default:
		r.Name += ": short"
		r.Detail = fmt.Sprintf("%d bytes waiting over TCP read as %d (the kernel counts only the BPF queue); app sockets are not spliced by default (docs/readers.md)", fionreadProbeBytes, got)
	}
	return r
}

// fionreadOf sends fionreadProbeBytes over a loopback connection whose
// accepting end is in a sockmap (psock) or not, waits until that end is
// readable and returns FIONREAD's answer there.
func fionreadOf(psock bool) (int, error) {
	m, err := ebpf.NewMap(&ebpf.MapSpec{Name: "ms_fionread", Type: ebpf.SockMap, KeySize: 4, ValueSize: 4, MaxEntries: 1})
	if err != nil {
		return 0, fmt.Errorf("create a sockmap: %w", err)
	}
	defer m.Close()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	c, err := net.DialTimeout("tcp4", ln.Addr().String(), time.Second)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	ln.(*net.TCPListener).SetDeadline(time.Now().Add(time.Second))
	s, err := ln.Accept()
	if err != nil {
		return 0, err
	}
	defer s.Close()
	rc, err := s.(*net.TCPConn).SyscallConn()
	if err != nil {
		return 0, err
	}
	var n int
	var opErr error
	if err := rc.Control(func(fd uintptr) {
		if psock {
			if opErr = m.Update(uint32(0), uint32(fd), ebpf.UpdateAny); opErr != nil {
				opErr = fmt.Errorf("add a socket to a sockmap: %w", opErr)
				return
			}
		}
		if _, opErr = c.Write(make([]byte, fionreadProbeBytes)); opErr != nil {
			return
		}
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		for deadline := time.Now().Add(time.Second); ; {
			k, err := unix.Poll(fds, int(time.Until(deadline)/time.Millisecond))
			if errors.Is(err, unix.EINTR) {
				continue
			}
			if err != nil || k == 0 {
				opErr = fmt.Errorf("the probe's bytes never became readable: %v", err)
				return
			}
			break
		}
		// Readable, but the bytes may still be on their way through the
		// stack's backlog: FIONREAD over plain TCP would count them once
		// poll says so.
		n, opErr = unix.IoctlGetInt(int(fd), unix.SIOCINQ)
	}); err != nil {
		return 0, err
	}
	return n, opErr
}

// AppSpliceDefault says whether app sockets may be spliced by default on a
// node whose datapath treats splice(2) readers as readers says
// (ReadersGuarded, ...) and whose FIONREAD probe gave fionread, and why
// not. Both traps reach into code meshsplice does not own (the app's),
// so both must be solved: splice(2) reads refused (not only detected: the
// first one would cost its connection) and FIONREAD right after a fallback.
func AppSpliceDefault(readers string, fionread ProbeResult) (bool, string) {
	var why []string
	if readers != ReadersGuarded {
		why = append(why, fmt.Sprintf("splice(2) readers of spliced sockets are %s, not refused", readers))
	}
	if !fionread.OK {
		why = append(why, fionread.Name)
	}
	if len(why) == 0 {
		return true, "splice(2) reads of spliced sockets are refused and FIONREAD is right after a fallback"
	}
	return false, strings.Join(why, "; ")
}

// AppSpliceDefault says whether this datapath splices app sockets of pods
// that do not say (meshsplice.io/app-splice), and why not: see the
// function of that name. FIONREAD is measured once, at Open.
func (d *Datapath) AppSpliceDefault() (bool, string) {
	return AppSpliceDefault(d.readersMode, d.fionread)
}

// ProbeAppSpliceDefault is AppSpliceDefault on this kernel, as `meshsplice
// check` shows it, with the reader protection ProbeReaders found.
func ProbeAppSpliceDefault(readers ProbeResult, fionread ProbeResult) ProbeResult {
	mode := ReadersUnprotected
	for _, m := range []string{ReadersGuarded, ReadersDetected} {
		if strings.HasSuffix(readers.Name, ": "+m) {
			mode = m
		}
	}
	ok, why := AppSpliceDefault(mode, fionread)
	r := ProbeResult{Name: "app <-> sidecar splicing by default", OK: ok, Detail: why}
	if !ok {
		r.Detail += "; pods opt in with meshsplice.io/app-splice: \"true\""
	}
	return r
}
