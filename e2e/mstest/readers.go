package main

import (
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"hash/crc32"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// The reader and send subcommands test every way an application reads and
// writes a socket: send writes a seeded stream with write(2), sendfile(2) or
// splice(2) from a pipe and half-closes; reader reads it to EOF with
// read(2), recv(2), recvmsg(2), splice(2) into a pipe, Go's io.Copy into a
// second TCP connection (which splices) or read(2) with ioctl(FIONREAD)
// before each read, and answers the byte count and CRC-32 of what it read.
// send verifies the answer: every byte, in order.

// readerEvent is printed by reader for each connection.
type readerEvent struct {
	Event string `json:"event"` // "read_done"
	ID    uint64 `json:"id"`
	Kind  string `json:"kind"`
	Bytes int64  `json:"bytes"`
	CRC   uint32 `json:"crc"`
	Error string `json:"error,omitempty"`
	// splice: the calls made, and whether the first one said EINVAL and
	// the reader fell back to read(2) as proxies do.
	SpliceCalls  int64 `json:"splice_calls,omitempty"`
	SpliceEINVAL bool  `json:"splice_einval,omitempty"`
	// fionread: reads made, and how often FIONREAD announced fewer bytes
	// than the read that followed returned (0 included), or 0.
	Reads         int64 `json:"reads,omitempty"`
	FionreadShort int64 `json:"fionread_short,omitempty"`
	FionreadZero  int64 `json:"fionread_zero,omitempty"`
	// --pause: the most FIONREAD reported while not reading.
	PeakUnread int `json:"peak_unread,omitempty"`
}

var readerKinds = []string{"read", "recv", "recvmsg", "splice", "iocopy", "fionread"}

func runReader(args []string) int {
	var kind string
	var pause time.Duration
	extra := func(fs *flag.FlagSet) {
		fs.StringVar(&kind, "read", "read", "how to read: read, recv, recvmsg, splice, iocopy, fionread")
		fs.DurationVar(&pause, "pause", 0, "do not read for this long after accepting (sampling FIONREAD), then read")
	}
	return serve("reader", "reader", args, extra, func(id uint64, c *net.TCPConn) closeEvent {
		ev := readerEvent{Event: "read_done", ID: id, Kind: kind}
		h := crc32.NewIEEE()
		if pause > 0 {
			ev.PeakUnread = sampleUnread(c, pause)
			emit(struct {
				Event      string `json:"event"`
				ID         uint64 `json:"id"`
				PeakUnread int    `json:"peak_unread"`
			}{"paused", id, ev.PeakUnread})
		}
		err := readAll(kind, c, h, &ev)
		ev.CRC = h.Sum32()
		var ce closeEvent
		if err != nil {
			ev.Error = err.Error()
			ce.Error = ev.Error
		} else {
			var reply [12]byte
			binary.BigEndian.PutUint64(reply[:8], uint64(ev.Bytes))
			binary.BigEndian.PutUint32(reply[8:], ev.CRC)
			if _, err := c.Write(reply[:]); err != nil {
				ce.Error = fmt.Sprintf("write reply: %v", err)
			}
			c.CloseWrite()
		}
		emit(ev)
		ce.Bytes = ev.Bytes
		return ce
	})
}

// countWriter counts and hashes what it is given.
type countWriter struct {
	h io.Writer
	n *int64
}

func (w countWriter) Write(b []byte) (int, error) {
	w.h.Write(b)
	*w.n += int64(len(b))
	return len(b), nil
}

func readAll(kind string, c *net.TCPConn, h io.Writer, ev *readerEvent) error {
	if kind == "iocopy" {
		return ioCopyRead(c, countWriter{h, &ev.Bytes})
	}
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var p [2]int
	if kind == "splice" {
		if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
			return err
		}
		defer unix.Close(p[0])
		defer unix.Close(p[1])
	}
	buf := make([]byte, 64<<10)
	spliceOK := false
	for {
		var n int
		var rerr error
		avail := -1
		useSplice := kind == "splice" && !ev.SpliceEINVAL
		err := rc.Read(func(fd uintptr) bool {
			switch {
			case useSplice:
				var m int64
				m, rerr = unix.Splice(int(fd), nil, p[1], nil, len(buf), unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
				n = int(m)
			case kind == "recv":
				n, _, rerr = unix.Recvfrom(int(fd), buf, 0)
			case kind == "recvmsg":
				n, _, _, _, rerr = unix.Recvmsg(int(fd), buf, nil, 0)
			default:
				if kind == "fionread" && avail < 0 {
					avail, _ = unix.IoctlGetInt(int(fd), unix.SIOCINQ)
				}
				n, rerr = unix.Read(int(fd), buf)
			}
			if errors.Is(rerr, unix.EAGAIN) {
				avail = -1
				return false
			}
			return true
		})
		if err != nil {
			return fmt.Errorf("wait: %w", err)
		}
		if useSplice {
			ev.SpliceCalls++
			if errors.Is(rerr, unix.EINVAL) && !spliceOK {
				// "splice not supported here": read(2) from now on.
				ev.SpliceEINVAL = true
				continue
			}
		}
		if rerr != nil {
			return fmt.Errorf("%s: %w", kind, rerr)
		}
		if n == 0 {
			return nil
		}
		if kind == "fionread" {
			ev.Reads++
			if avail < n {
				ev.FionreadShort++
			}
			if avail == 0 {
				ev.FionreadZero++
			}
		}
		if useSplice {
			spliceOK = true
			for got := 0; got < n; {
				m, err := unix.Read(p[0], buf[got:n])
				if err != nil || m == 0 {
					return fmt.Errorf("read pipe: %v", err)
				}
				got += m
			}
		}
		h.Write(buf[:n])
		ev.Bytes += int64(n)
	}
}

// ioCopyRead copies c into a second TCP connection with io.Copy (Go splices
// between two TCP connections) and hashes what arrives at the other end.
func ioCopyRead(c *net.TCPConn, w io.Writer) error {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	defer ln.Close()
	done := make(chan error, 1)
	go func() {
		s, err := ln.Accept()
		if err != nil {
			done <- err
			return
		}
		defer s.Close()
		_, err = io.Copy(w, s)
		done <- err
	}()
	d, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		return err
	}
	if _, err := io.Copy(d.(*net.TCPConn), c); err != nil {
		d.Close()
		return fmt.Errorf("io.Copy: %w", err)
	}
	d.(*net.TCPConn).CloseWrite()
	defer d.Close()
	select {
	case err := <-done:
		return err
	case <-time.After(30 * time.Second):
		return errors.New("local copy did not finish")
	}
}

// sendResult is printed by send.
type sendResult struct {
	Event string `json:"event"` // "result"
	OK    bool   `json:"ok"`
	Kind  string `json:"kind"`
	Bytes int64  `json:"bytes"`
	Got   int64  `json:"got"`
	CRC   uint32 `json:"crc"`
	GotCR uint32 `json:"got_crc"`
	Error string `json:"error,omitempty"`
}

func runSend(args []string) int {
	fs := flag.NewFlagSet("send", flag.ContinueOnError)
	target := fs.String("target", "", "server ip:port (required)")
	kind := fs.String("write", "write", "how to write: write, sendfile, splice")
	size := fs.Int64("bytes", 1<<20, "bytes to send")
	seed := fs.Uint64("seed", 1, "payload seed")
	timeout := fs.Duration("timeout", 20*time.Second, "deadline of the whole exchange")
	if code, ok := parseFlags(fs, args); !ok {
		return code
	}
	res := sendResult{Event: "result", Kind: *kind, Bytes: *size}
	err := send(*target, *kind, *size, *seed, *timeout, &res)
	if err != nil {
		res.Error = err.Error()
	}
	res.OK = err == nil && res.Got == res.Bytes && res.GotCR == res.CRC
	emit(res)
	emit(summaryEvent{Event: "summary", OK: res.OK, Conns: 1})
	if !res.OK {
		return 1
	}
	return 0
}

func send(target, kind string, size int64, seed uint64, timeout time.Duration, res *sendResult) error {
	payload := make([]byte, size)
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	for i := range payload {
		payload[i] = byte(r.Uint32())
	}
	res.CRC = crc32.ChecksumIEEE(payload)
	c, err := net.DialTimeout("tcp", target, timeout)
	if err != nil {
		return fmt.Errorf("dial: %w", err)
	}
	defer c.Close()
	tc := c.(*net.TCPConn)
	tc.SetDeadline(time.Now().Add(timeout))
	switch kind {
	case "write":
		_, err = tc.Write(payload)
	case "sendfile":
		err = sendFile(tc, payload)
	case "splice":
		err = spliceWrite(tc, payload)
	default:
		err = fmt.Errorf("unknown writer %q", kind)
	}
	if err != nil {
		return fmt.Errorf("%s: %w", kind, err)
	}
	if err := tc.CloseWrite(); err != nil {
		return err
	}
	var reply [12]byte
	if _, err := io.ReadFull(tc, reply[:]); err != nil {
		return fmt.Errorf("read reply: %w", err)
	}
	res.Got = int64(binary.BigEndian.Uint64(reply[:8]))
	res.GotCR = binary.BigEndian.Uint32(reply[8:])
	return nil
}

// sendFile writes payload with sendfile(2) from a temporary file: Go's
// TCPConn.ReadFrom(*os.File) uses it.
func sendFile(c *net.TCPConn, payload []byte) error {
	f, err := os.CreateTemp("", "mstest-sendfile-")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	defer f.Close()
	if _, err := f.Write(payload); err != nil {
		return err
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		return err
	}
	n, err := c.ReadFrom(f)
	if err == nil && n != int64(len(payload)) {
		err = fmt.Errorf("sent %d of %d bytes", n, len(payload))
	}
	return err
}

// spliceWrite writes payload into a pipe and splice(2)s the pipe into c.
func spliceWrite(c *net.TCPConn, payload []byte) error {
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		return err
	}
	defer unix.Close(p[0])
	wr := os.NewFile(uintptr(p[1]), "pipe")
	go func() {
		wr.Write(payload)
		wr.Close()
	}()
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var total int64
	for total < int64(len(payload)) {
		var n int64
		var serr error
		err := rc.Write(func(fd uintptr) bool {
			// The pipe side blocks (the writer goroutine fills it); the
			// socket is non-blocking: EAGAIN means it is full.
			n, serr = unix.Splice(p[0], nil, int(fd), nil, 1<<20, unix.SPLICE_F_MOVE)
			return !errors.Is(serr, unix.EAGAIN)
		})
		if err != nil {
			return err
		}
		if serr != nil {
			return fmt.Errorf("splice: %w", serr)
		}
		if n == 0 {
			break
		}
		total += n
	}
	if total != int64(len(payload)) {
		return fmt.Errorf("spliced %d of %d bytes", total, len(payload))
	}
	return nil
}

// sampleUnread sleeps for d, reading FIONREAD every 20 ms, and returns the
// most it reported.
func sampleUnread(c *net.TCPConn, d time.Duration) int {
	rc, err := c.SyscallConn()
	if err != nil {
		return -1
	}
	peak := 0
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		rc.Control(func(fd uintptr) {
			if n, err := unix.IoctlGetInt(int(fd), unix.SIOCINQ); err == nil {
				peak = max(peak, n)
			}
		})
	}
	return peak
}
