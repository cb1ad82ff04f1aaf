package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"time"

	"golang.org/x/sys/unix"
)

// fionreadEvent is printed when FIONREAD disagrees with poll(2): the socket
// was readable (or hung up) for longer than the timeout while FIONREAD kept
// reporting 0 bytes.
type fionreadEvent struct {
	Event   string `json:"event"` // "fionread_timeout"
	ID      uint64 `json:"id"`
	Peer    string `json:"peer"`
	Waited  string `json:"waited"`
	Revents string `json:"revents"`
	// ReadBytes is what a plain read returned afterwards (with
	// --fallback-read), -1 if not attempted.
	ReadBytes int `json:"read_bytes"`
}

// maxRecordedValues caps the FIONREAD values listed in a close event.
const maxRecordedValues = 1000

// runFionreadServer is an echo server that, before every read, polls
// ioctl(FIONREAD) until it reports queued bytes, then reads exactly that
// many bytes and echoes them. Applications like this break when a kernel
// fast path queues data where FIONREAD does not look.
func runFionreadServer(args []string) int {
	var interval, timeout time.Duration
	var fallback bool
	extra := func(fs *flag.FlagSet) {
		fs.DurationVar(&interval, "poll-interval", time.Millisecond, "sleep between FIONREAD polls")
		fs.DurationVar(&timeout, "fionread-timeout", 2*time.Second, "give up when poll(2) reports the socket readable but FIONREAD stays 0 for this long")
		fs.BoolVar(&fallback, "fallback-read", false, "after a FIONREAD timeout, read(2) anyway and go on instead of closing the connection")
	}
	return serve("fionread-server", "fionread", args, extra, func(id uint64, c *net.TCPConn) closeEvent {
		var ev closeEvent
		if err := fionreadEcho(id, c, interval, timeout, fallback, &ev); err != nil {
			ev.Error = err.Error()
		}
		return ev
	})
}

func fionreadEcho(id uint64, c *net.TCPConn, interval, timeout time.Duration, fallback bool, ev *closeEvent) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return fmt.Errorf("syscall conn: %w", err)
	}
	// inq returns FIONREAD (SIOCINQ) and, with wait, the poll(2) revents
	// after waiting up to interval for POLLIN or POLLRDHUP.
	inq := func(wait time.Duration) (avail int, revents int16, err error) {
		cerr := rc.Control(func(fd uintptr) {
			avail, err = unix.IoctlGetInt(int(fd), unix.SIOCINQ)
			if err != nil {
				err = fmt.Errorf("ioctl FIONREAD: %w", err)
				return
			}
			if avail > 0 || wait < 0 {
				return
			}
			fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN | unix.POLLRDHUP}}
			if _, perr := unix.Poll(fds, max(1, int(wait.Milliseconds()))); perr != nil && !errors.Is(perr, unix.EINTR) {
				err = fmt.Errorf("poll: %w", perr)
				return
			}
			revents = fds[0].Revents
		})
		if cerr != nil {
			return 0, 0, fmt.Errorf("syscall conn control: %w", cerr)
		}
		return avail, revents, err
	}

	buf := make([]byte, 64<<10)
	var zeroSince time.Time // when poll first said readable with FIONREAD 0
	for {
		avail, revents, err := inq(interval)
		if err != nil {
			return err
		}
		if avail == 0 {
			ev.ZeroPolls++
			if revents == 0 {
				zeroSince = time.Time{}
				continue
			}
			// Readable or hung up, yet nothing queued according to
			// FIONREAD. Check again: data may have arrived between the
			// ioctl and poll.
			if avail, _, err = inq(-1); err != nil {
				return err
			}
		}
		if avail == 0 {
			if revents&(unix.POLLRDHUP|unix.POLLHUP|unix.POLLERR) != 0 {
				// Peer closed: a read must report EOF.
				return finishEOF(c, buf, ev)
			}
			ev.ReadableZero++
			if zeroSince.IsZero() {
				zeroSince = time.Now()
			}
			if waited := time.Since(zeroSince); waited > timeout {
				fe := fionreadEvent{Event: "fionread_timeout", ID: id, Peer: addrString(c.RemoteAddr()), Waited: waited.String(), Revents: fmt.Sprintf("%#x", revents), ReadBytes: -1}
				if !fallback {
					emit(fe)
					return fmt.Errorf("FIONREAD stayed 0 for %v while poll reported %#x", waited, revents)
				}
				_ = c.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
				n, rerr := c.Read(buf)
				_ = c.SetReadDeadline(time.Time{})
				fe.ReadBytes = n
				emit(fe)
				if n > 0 {
					ev.Bytes += int64(n)
					if _, err := c.Write(buf[:n]); err != nil {
						return fmt.Errorf("write: %w", err)
					}
				}
				if errors.Is(rerr, io.EOF) {
					return closeWrite(c)
				}
				zeroSince = time.Time{}
			}
			time.Sleep(interval)
			continue
		}
		zeroSince = time.Time{}
		ev.Reads++
		if len(ev.FionreadValues) < maxRecordedValues {
			ev.FionreadValues = append(ev.FionreadValues, avail)
		}
		ev.FionreadMax = max(ev.FionreadMax, avail)
		// Read exactly the announced amount, in buffer-sized pieces.
		for left := avail; left > 0; {
			chunk := buf[:min(left, len(buf))]
			n, err := io.ReadFull(c, chunk)
			if n > 0 {
				ev.Bytes += int64(n)
				left -= n
				if _, werr := c.Write(chunk[:n]); werr != nil {
					return fmt.Errorf("write: %w", werr)
				}
			}
			if err != nil {
				return fmt.Errorf("read %d bytes announced by FIONREAD: %w", avail, err)
			}
		}
	}
}

// finishEOF reads after the peer hung up while FIONREAD reported nothing
// queued: anything but an immediate EOF means FIONREAD missed data. Such data
// is still echoed up to EOF, and the mismatch reported as an error.
func finishEOF(c *net.TCPConn, buf []byte, ev *closeEvent) error {
	var missed int64
	for {
		_ = c.SetReadDeadline(time.Now().Add(time.Second))
		n, err := c.Read(buf)
		if n > 0 {
			missed += int64(n)
			ev.Bytes += int64(n)
			if _, werr := c.Write(buf[:n]); werr != nil {
				return fmt.Errorf("write: %w", werr)
			}
		}
		if errors.Is(err, io.EOF) {
			if missed > 0 {
				ev.ReadableZero++
				_ = closeWrite(c)
				return fmt.Errorf("peer hung up with %d bytes queued that FIONREAD did not report", missed)
			}
			return closeWrite(c)
		}
		if err != nil {
			return fmt.Errorf("read after hang-up: %w", err)
		}
	}
}

func closeWrite(c *net.TCPConn) error {
	if err := c.CloseWrite(); err != nil {
		return fmt.Errorf("close write: %w", err)
	}
	return nil
}
