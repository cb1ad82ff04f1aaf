package main

import (
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"sync"
	"sync/atomic"
	"syscall"
)

// readyEvent is printed once a server listens.
type readyEvent struct {
	Event string `json:"event"` // "ready"
	Port  int    `json:"port"`
	Addr  string `json:"addr"`
	Mode  string `json:"mode"` // "echo", "splice", "fionread", "sink"
}

// acceptEvent is printed by the echo servers for each accepted connection.
type acceptEvent struct {
	Event    string `json:"event"` // "accept"
	ID       uint64 `json:"id"`
	Peer     string `json:"peer"`
	Local    string `json:"local"`
	V4Mapped bool   `json:"v4mapped,omitempty"`
}

// closeEvent is printed by the echo servers when a connection ends.
type closeEvent struct {
	Event string `json:"event"` // "close"
	ID    uint64 `json:"id"`
	Peer  string `json:"peer"`
	Local string `json:"local"`
	// Bytes is the number of bytes received (and echoed).
	Bytes int64  `json:"bytes"`
	Error string `json:"error,omitempty"`

	// splice-server only.
	SpliceCalls int64 `json:"splice_calls,omitempty"`
	// SpliceEINVAL: the first splice(2) said EINVAL ("not supported
	// here") and the server echoed with read(2) instead, as proxies do.
	SpliceEINVAL bool `json:"splice_einval,omitempty"`
	// fionread-server only.
	Reads          int64 `json:"reads,omitempty"`
	FionreadValues []int `json:"fionread_values,omitempty"`
	FionreadMax    int   `json:"fionread_max,omitempty"`
	ZeroPolls      int64 `json:"zero_polls,omitempty"`
	ReadableZero   int64 `json:"readable_but_zero,omitempty"`
}

// serverFlags are the flags shared by the echo servers.
type serverFlags struct {
	port   int
	v4only bool
	quiet  bool
	rcvbuf int
}

func (f *serverFlags) register(fs *flag.FlagSet) {
	fs.IntVar(&f.port, "port", 0, "TCP port to listen on (required; dual-stack [::]:PORT)")
	fs.BoolVar(&f.v4only, "listen-v4only", false, "listen on 0.0.0.0 instead of dual-stack [::]")
	fs.IntVar(&f.rcvbuf, "rcvbuf", 0, "SO_RCVBUF of the listener, inherited by every accepted connection from its first byte (the kernel doubles it, capped by net.core.rmem_max; 0: the default, autotuned)")
	fs.BoolVar(&f.quiet, "quiet", false, "print no accept events, and close events only for failed connections (benchmarks: thousands of connections)")
}

// serve listens according to sf, prints the ready event and runs handle for
// every accepted connection until SIGINT or SIGTERM.
func serve(name, mode string, args []string, extra func(fs *flag.FlagSet), handle func(id uint64, c *net.TCPConn) closeEvent) int {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	var sf serverFlags
	sf.register(fs)
	if extra != nil {
		extra(fs)
	}
	if code, ok := parseFlags(fs, args); !ok {
		return code
	}
	if sf.port <= 0 || sf.port > 65535 {
		logf("%s: --port is required", name)
		return 2
	}
	network, addr := listenAddr(sf.port, sf.v4only)
	var lc net.ListenConfig
	if sf.rcvbuf > 0 {
		lc.Control = func(_, _ string, c syscall.RawConn) error {
			var serr error
			if err := c.Control(func(fd uintptr) {
				serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_RCVBUF, sf.rcvbuf)
			}); err != nil {
				return err
			}
			return serr
		}
	}
	ln, err := lc.Listen(context.Background(), network, addr)
	if err != nil {
		emit(errorEvent{Event: "error", Stage: "listen", Error: err.Error(), Errno: errnoName(err)})
		return 1
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	go func() {
		<-ctx.Done()
		ln.Close()
	}()
	emit(readyEvent{Event: "ready", Port: sf.port, Addr: addrString(ln.Addr()), Mode: mode})

	var wg sync.WaitGroup
	var ids atomic.Uint64
	for {
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				break
			}
			emit(errorEvent{Event: "error", Stage: "accept", Error: err.Error(), Errno: errnoName(err)})
			continue
		}
		id := ids.Add(1)
		tc := c.(*net.TCPConn)
		wg.Go(func() {
			defer tc.Close()
			if !sf.quiet {
				emit(acceptEvent{Event: "accept", ID: id, Peer: addrString(tc.RemoteAddr()), Local: addrString(tc.LocalAddr()), V4Mapped: isV4Mapped(tc.RemoteAddr())})
			}
			ev := handle(id, tc)
			if sf.quiet && ev.Error == "" {
				return
			}
			ev.Event, ev.ID = "close", id
			ev.Peer, ev.Local = addrString(tc.RemoteAddr()), addrString(tc.LocalAddr())
			emit(ev)
		})
	}
	wg.Wait()
	return 0
}

func runEcho(args []string) int {
	return serve("echo", "echo", args, nil, func(_ uint64, c *net.TCPConn) closeEvent {
		var ev closeEvent
		if err := echoLoop(c, &ev); err != nil {
			ev.Error = err.Error()
		}
		return ev
	})
}

// runSink reads and discards until EOF, then writes the number of bytes it
// received (8 bytes, big-endian) and closes: the other end of the client's
// --stream load mode.
func runSink(args []string) int {
	return serve("sink", "sink", args, nil, func(_ uint64, c *net.TCPConn) closeEvent {
		var ev closeEvent
		buf := make([]byte, 256<<10)
		for {
			n, err := c.Read(buf)
			ev.Bytes += int64(n)
			if errors.Is(err, io.EOF) {
				var cnt [8]byte
				binary.BigEndian.PutUint64(cnt[:], uint64(ev.Bytes))
				if _, err := c.Write(cnt[:]); err != nil {
					ev.Error = fmt.Sprintf("write count: %v", err)
				} else if err := c.CloseWrite(); err != nil {
					ev.Error = fmt.Sprintf("close write: %v", err)
				}
				return ev
			}
			if err != nil {
				ev.Error = fmt.Sprintf("read: %v", err)
				return ev
			}
		}
	})
}
