package main

import (
	"fmt"
	"net"
	"os"
	"os/signal"
	"sync/atomic"
	"syscall"
	"time"
)

// Until-stopped mode (client --pipelined --until-signal): long-lived
// streams for fault tests (agent killed, upgraded, uninstalled while they
// run). Each connection sends checksummed, numbered messages (at most
// --messages) until the process gets SIGUSR1; then every writer stops after
// its current message, every reader verifies the echoes of exactly what was
// sent, in order, and the client ends as usual (result, closed, summary).
// SIGUSR2 prints a "progress" event: what all connections have verified so
// far, so a test can tell how many bytes moved while something was down.

// progressEvent is printed on SIGUSR2 in until-signal mode.
type progressEvent struct {
	Event    string `json:"event"` // "progress"
	Seq      int64  `json:"seq"`   // 1 for the first progress event, 2 for the next...
	Messages int64  `json:"messages"`
	Bytes    int64  `json:"bytes"`
	// Failed is the number of connections that have failed so far.
	Failed int64 `json:"failed"`
}

var untilStop = struct {
	stop                    chan struct{}
	messages, bytes, failed atomic.Int64
	progressSeq             atomic.Int64
}{stop: make(chan struct{})}

// watchStopSignals handles SIGUSR1 (stop) and SIGUSR2 (progress).
func watchStopSignals() {
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGUSR1, syscall.SIGUSR2)
	go func() {
		stopped := false
		for sig := range sigs {
			switch {
			case sig == syscall.SIGUSR1 && !stopped:
				stopped = true
				close(untilStop.stop)
			case sig == syscall.SIGUSR2:
				emit(progressEvent{Event: "progress", Seq: untilStop.progressSeq.Add(1),
					Messages: untilStop.messages.Load(), Bytes: untilStop.bytes.Load(), Failed: untilStop.failed.Load()})
			}
		}
	}()
}

// exchangeUntilStopped is exchangePipelined for until-signal mode: the
// reader verifies the echo of each message the writer sent, and only those.
func exchangeUntilStopped(c *net.TCPConn, cfg clientConfig, gen *payloadGen, res *resultEvent, addErr func(error)) {
	sent := make(chan uint32, 1<<16)
	werr := make(chan error, 1)
	wgen := newPayloadGen(cfg.seed, gen.conn, cfg.size)
	abort := make(chan struct{})
	go func() {
		defer close(sent)
		for i := range cfg.messages {
			if i > 0 && cfg.interval > 0 {
				select {
				case <-time.After(cfg.interval):
				case <-untilStop.stop:
				case <-abort:
				}
			}
			select {
			case <-untilStop.stop:
				werr <- nil
				return
			case <-abort:
				werr <- nil
				return
			default:
			}
			_ = c.SetWriteDeadline(time.Now().Add(cfg.timeout))
			if _, err := c.Write(wgen.message(uint32(i))); err != nil {
				werr <- fmt.Errorf("write message %d: %w", i, err)
				return
			}
			sent <- uint32(i)
		}
		werr <- nil
	}()
	rbuf := make([]byte, headerLen+cfg.size)
	var want int
	for idx := range sent {
		want++
		if err := readMessage(c, cfg, gen, idx, rbuf); err != nil {
			addErr(err)
			close(abort)
			_ = c.SetWriteDeadline(time.Now())
			for range sent {
			}
			break
		}
		res.Messages++
		res.Bytes += int64(headerLen + cfg.size)
		untilStop.messages.Add(1)
		untilStop.bytes.Add(int64(headerLen + cfg.size))
	}
	if err := <-werr; err != nil {
		addErr(err)
	}
	if len(res.Errors) > 0 {
		untilStop.failed.Add(1)
	}
	// Every message sent was verified: the caller's check compares with
	// --messages, which here is only an upper bound.
	res.allSent = len(res.Errors) == 0 && res.Messages == want
}
