package main

import (
	"errors"
	"flag"
	"fmt"
	"hash/crc32"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"time"
)

// The respond-close server and the request client test a server that
// answers and closes while its client is still sending: with unread input
// (the kernel then sends RST instead of FIN) or with SO_LINGER 0 (always
// RST). Over TCP the client still reads the whole answer; so must it when
// spliced.

// seeded returns n pseudo-random bytes.
func seeded(n int, seed uint64) []byte {
	b := make([]byte, n)
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func runRespondClose(args []string) int {
	var read, respond int
	var abort bool
	extra := func(fs *flag.FlagSet) {
		fs.IntVar(&read, "read", 1000, "bytes to read before answering")
		fs.IntVar(&respond, "respond", 100000, "bytes of the answer (seeded with --seed 7)")
		fs.BoolVar(&abort, "abort", false, "close with SO_LINGER 0 (RST) instead of a plain close (RST only if input is unread)")
	}
	return serve("respond-close", "respond-close", args, extra, func(_ uint64, c *net.TCPConn) closeEvent {
		var ev closeEvent
		buf := make([]byte, read)
		n, err := io.ReadFull(c, buf)
		ev.Bytes = int64(n)
		if err != nil {
			ev.Error = fmt.Sprintf("read request: %v", err)
			return ev
		}
		if _, err := c.Write(seeded(respond, 7)); err != nil {
			ev.Error = fmt.Sprintf("write answer: %v", err)
			return ev
		}
		if abort {
			c.SetLinger(0)
		}
		return ev // serve closes c
	})
}

// requestResult is printed by request.
type requestResult struct {
	Event  string `json:"event"` // "result"
	OK     bool   `json:"ok"`
	Got    int    `json:"got"`
	Want   int    `json:"want"`
	CRCOK  bool   `json:"crc_ok"`
	EndErr string `json:"end_error,omitempty"` // how the answer ended
	Error  string `json:"error,omitempty"`
}

func runRequest(args []string) int {
	fs := flag.NewFlagSet("request", flag.ContinueOnError)
	target := fs.String("target", "", "server ip:port")
	send := fs.Int("send", 1<<20, "bytes to send (more than the server reads)")
	want := fs.Int("respond", 100000, "answer size")
	wait := fs.Duration("wait", 200*time.Millisecond, "wait this long after sending before reading, so that the RST arrives first")
	timeout := fs.Duration("timeout", 10*time.Second, "deadline")
	if code, ok := parseFlags(fs, args); !ok {
		return code
	}
	res := requestResult{Event: "result", Want: *want}
	c, err := net.DialTimeout("tcp", *target, *timeout)
	if err != nil {
		res.Error = err.Error()
		emit(res)
		return 1
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(*timeout))
	// Send in the background: the server stops reading, and a write may
	// block or fail with the reset.
	go c.Write(seeded(*send, 3))
	time.Sleep(*wait)
	got, err := io.ReadAll(c)
	res.Got = len(got)
	if err != nil {
		res.EndErr = err.Error()
		if errors.Is(err, os.ErrDeadlineExceeded) {
			res.Error = err.Error()
		}
	}
	res.CRCOK = len(got) == *want && crc32.ChecksumIEEE(got) == crc32.ChecksumIEEE(seeded(*want, 7))
	res.OK = res.CRCOK && res.Error == ""
	emit(res)
	emit(summaryEvent{Event: "summary", OK: res.OK, Conns: 1})
	if !res.OK {
		return 1
	}
	return 0
}
