package main

import (
	"errors"
	"fmt"
	"io"
	"net"

	"golang.org/x/sys/unix"
)

// runSpliceServer is an echo server that reads each connection with a real
// splice(2) from the socket into a pipe, reads the pipe with read(2) and
// echoes the data with write(2).
func runSpliceServer(args []string) int {
	return serve("splice-server", "splice", args, nil, func(_ uint64, c *net.TCPConn) closeEvent {
		var ev closeEvent
		if err := spliceEcho(c, &ev); err != nil {
			ev.Error = err.Error()
		}
		return ev
	})
}

func spliceEcho(c *net.TCPConn, ev *closeEvent) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return fmt.Errorf("syscall conn: %w", err)
	}
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		return fmt.Errorf("pipe2: %w", err)
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])

	buf := make([]byte, 64<<10)
	for {
		var n int64
		var serr error
		// The socket is non-blocking (Go's netpoller owns it): splice
		// returns EAGAIN when no data is queued, and rc.Read then waits
		// for readability and calls us again.
		err := rc.Read(func(fd uintptr) bool {
			n, serr = unix.Splice(int(fd), nil, p[1], nil, len(buf), unix.SPLICE_F_MOVE|unix.SPLICE_F_NONBLOCK)
			return !errors.Is(serr, unix.EAGAIN)
		})
		if err != nil {
			return fmt.Errorf("wait for socket: %w", err)
		}
		ev.SpliceCalls++
		if errors.Is(serr, unix.EINVAL) && ev.Bytes == 0 {
			// "splice not supported here", as proxies read it:
			// read(2) from now on.
			ev.SpliceEINVAL = true
			return echoLoop(c, ev)
		}
		if serr != nil {
			return fmt.Errorf("splice: %w", serr)
		}
		if n == 0 {
			if err := c.CloseWrite(); err != nil {
				return fmt.Errorf("close write: %w", err)
			}
			return nil
		}
		for got := 0; got < int(n); {
			m, err := unix.Read(p[0], buf[got:n])
			if err != nil {
				return fmt.Errorf("read pipe: %w", err)
			}
			if m == 0 {
				return fmt.Errorf("pipe closed after %d of %d bytes", got, n)
			}
			got += m
		}
		ev.Bytes += n
		if _, err := c.Write(buf[:n]); err != nil {
			return fmt.Errorf("write: %w", err)
		}
	}
}

// echoLoop echoes with read(2)/write(2) until EOF.
func echoLoop(c *net.TCPConn, ev *closeEvent) error {
	buf := make([]byte, 64<<10)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			ev.Bytes += int64(n)
			if _, werr := c.Write(buf[:n]); werr != nil {
				return fmt.Errorf("write: %w", werr)
			}
		}
		if errors.Is(err, io.EOF) {
			return closeWrite(c)
		}
		if err != nil {
			return fmt.Errorf("read: %w", err)
		}
	}
}
