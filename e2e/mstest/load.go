package main

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"math"
	"math/rand/v2"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// Load mode (client --duration D): a benchmark driver rather than a test.
// Connections exchange for --warmup, then for D (the measurement window),
// then stop; one "aggregate" event reports the window: exchanges per second,
// latency percentiles over every connection, and a histogram the caller can
// merge across runs. Three shapes:
//
//   - request/response (default): each connection writes a message and
//     reads its echo, at --rate exchanges per second in total (spread
//     evenly over the connections and over time) or as fast as it can;
//   - --stream: each connection writes --size-byte chunks to a sink server
//     (mstest sink) without waiting; at the end the sink's byte count must
//     match what was written;
//   - --reconnect: every exchange on a new connection (connect, one
//     request/response, graceful close): the connection rate.
//
// The window's edges are the moments the client prints its "window" events,
// not times planned in advance: a client the machine's load delays still
// counts exactly the exchanges between its two events, and with
// --cpu-stat each event carries the cgroups' CPU time read right before the
// start (after the end), so the CPU time and the exchanges cover the same
// span however late the caller handles the events.
//
// Payloads are random but fixed per connection and echoes are compared
// byte for byte (the per-message pseudo-random payload and CRC of the
// verifying mode cost more CPU than a small proxy hop, which would blur
// what is measured). Message index and length still travel in the header,
// so reordering, loss and corruption are caught.

// windowEvent marks the start and the end of the measurement window.
type windowEvent struct {
	Event string `json:"event"` // "window"
	Phase string `json:"phase"` // "start" or "end"
	// CPU is each --cpu-stat cgroup's CPU time, read at the mark; Error
	// says why it could not be read.
	CPU   map[string]cpuTimes `json:"cpu,omitempty"`
	Error string              `json:"error,omitempty"`
	// UnixNS is the wall clock right after the readings.
	UnixNS int64 `json:"unix_ns"`
}

// aggregateEvent is printed last but one (before "summary") in load mode.
type aggregateEvent struct {
	Event string `json:"event"` // "aggregate"
	OK    bool   `json:"ok"`
	// Shape is "rr", "stream" or "reconnect".
	Shape string  `json:"shape"`
	Conns int     `json:"conns"`
	Rate  float64 `json:"rate"` // requested exchanges/s in total, 0 = as fast as possible
	// WindowMS is the measurement window's length, as it happened (it
	// lasts longer than --duration when the end mark comes late).
	WindowMS float64 `json:"window_ms"`
	// Messages are the exchanges (stream: the chunks written; reconnect:
	// the connections) that started inside the window.
	Messages int64 `json:"messages"`
	// Bytes are the bytes written inside the window, headers included.
	Bytes     int64     `json:"bytes"`
	RPS       float64   `json:"rps"`
	BytesPerS float64   `json:"bytes_per_s"`
	P50US     float64   `json:"p50_us"`
	P90US     float64   `json:"p90_us"`
	P99US     float64   `json:"p99_us"`
	P999US    float64   `json:"p999_us"`
	MaxUS     float64   `json:"max_us"`
	MeanUS    float64   `json:"mean_us"`
	Errors    []string  `json:"errors"`
	Histogram histogram `json:"hist"`
}

// histogram is a log-scale latency histogram: bucket i holds the samples
// with floor(ln(ns)/ln(Base)) == i, so a bucket is 1% wide. Buckets are
// [index, count] pairs in increasing index order.
type histogram struct {
	Base    float64    `json:"base"`
	Buckets [][2]int64 `json:"buckets"`
}

const histBase = 1.01

func newHistogram(samples []time.Duration) histogram {
	counts := map[int64]int64{}
	for _, d := range samples {
		ns := max(float64(d.Nanoseconds()), 1)
		counts[int64(math.Floor(math.Log(ns)/math.Log(histBase)))]++
	}
	h := histogram{Base: histBase, Buckets: [][2]int64{}}
	for i, c := range counts {
		h.Buckets = append(h.Buckets, [2]int64{i, c})
	}
	slices.SortFunc(h.Buckets, func(a, b [2]int64) int { return int(a[0] - b[0]) })
	return h
}

// loadWindow is the shared clock of a load run: the window's edges are set
// when they are marked. Times are offsets from begin on the monotonic
// clock; an unset edge is notYet.
type loadWindow struct {
	begin      time.Time
	start, end atomic.Int64
}

const notYet = math.MaxInt64

func newLoadWindow(begin time.Time) *loadWindow {
	w := &loadWindow{begin: begin}
	w.start.Store(notYet)
	w.end.Store(notYet)
	return w
}

// in tells whether t is inside the window as marked so far.
func (w *loadWindow) in(t time.Time) bool {
	at := int64(t.Sub(w.begin))
	return at >= w.start.Load() && at < w.end.Load()
}

// over tells whether the window has ended by t.
func (w *loadWindow) over(t time.Time) bool { return int64(t.Sub(w.begin)) >= w.end.Load() }

// mark runs the window: at begin+warmup it reads the CPU times and opens
// the window, duration later it closes it and reads them again, printing
// a window event each time. It returns the window's length and the
// reading errors.
func (w *loadWindow) mark(warmup, duration time.Duration, stats cpuStats) (time.Duration, []string) {
	var errs []string
	time.Sleep(time.Until(w.begin.Add(warmup)))
	ev := stats.markEvent("start")
	opened := time.Now()
	w.start.Store(int64(opened.Sub(w.begin)))
	emit(ev)
	time.Sleep(time.Until(opened.Add(duration)))
	closed := time.Now()
	w.end.Store(int64(closed.Sub(w.begin)))
	ev2 := stats.markEvent("end")
	emit(ev2)
	for _, e := range []windowEvent{ev, ev2} {
		if e.Error != "" {
			errs = append(errs, "window "+e.Phase+": "+e.Error)
		}
	}
	return closed.Sub(opened), errs
}

// connStats is what one connection (or reconnecting worker) measured.
type connStats struct {
	rtts     []time.Duration
	messages int64
	bytes    int64
	err      error
}

// runLoad runs load mode and returns the exit code.
func runLoad(cfg clientConfig, src net.Addr) int {
	shape := "rr"
	switch {
	case cfg.stream && cfg.reconnect:
		logf("client: --stream and --reconnect exclude each other")
		return 2
	case cfg.stream:
		shape = "stream"
	case cfg.reconnect:
		shape = "reconnect"
	}
	if cfg.pipelined {
		logf("client: --pipelined does not apply with --duration")
		return 2
	}
	begin := time.Now()
	w := newLoadWindow(begin)
	marked := make(chan struct{})
	var window time.Duration
	var markErrs []string
	go func() {
		defer close(marked)
		window, markErrs = w.mark(cfg.warmup, cfg.duration, cfg.cpuStats)
	}()

	stats := make([]connStats, cfg.conns)
	var wg sync.WaitGroup
	for i := range cfg.conns {
		// Spread the connections' schedules evenly over one interval.
		var interval time.Duration
		if cfg.rate > 0 {
			interval = time.Duration(float64(time.Second) * float64(cfg.conns) / cfg.rate)
		}
		first := begin.Add(interval * time.Duration(i) / time.Duration(cfg.conns))
		wg.Go(func() {
			switch shape {
			case "stream":
				stats[i] = streamConn(i, cfg, src, w)
			case "reconnect":
				stats[i] = reconnectLoop(i, cfg, src, w, first, interval)
			default:
				stats[i] = rrConn(i, cfg, src, w, first, interval)
			}
		})
	}
	wg.Wait()
	<-marked // a run that failed early still ends its window

	agg := aggregateEvent{Event: "aggregate", Shape: shape, Conns: cfg.conns, Rate: cfg.rate, Errors: []string{}}
	agg.WindowMS = float64(window.Microseconds()) / 1000
	var all []time.Duration
	failed := 0
	for i, s := range stats {
		agg.Messages += s.messages
		agg.Bytes += s.bytes
		all = append(all, s.rtts...)
		if s.err != nil {
			failed++
			if len(agg.Errors) < maxErrors {
				agg.Errors = append(agg.Errors, fmt.Sprintf("conn %d: %v", i, s.err))
			}
		}
	}
	agg.OK = failed == 0 && agg.Messages > 0 && len(markErrs) == 0
	if agg.Messages == 0 && failed == 0 {
		agg.Errors = append(agg.Errors, "nothing was exchanged inside the window")
	}
	agg.Errors = append(agg.Errors, markErrs...)
	secs := window.Seconds()
	agg.RPS = float64(agg.Messages) / secs
	agg.BytesPerS = float64(agg.Bytes) / secs
	if len(all) > 0 {
		slices.Sort(all)
		at := func(q float64) float64 {
			return float64(all[int(q*float64(len(all)-1))].Nanoseconds()) / 1e3
		}
		agg.P50US, agg.P90US, agg.P99US, agg.P999US = at(0.50), at(0.90), at(0.99), at(0.999)
		agg.MaxUS = float64(all[len(all)-1].Nanoseconds()) / 1e3
		var sum time.Duration
		for _, d := range all {
			sum += d
		}
		agg.MeanUS = float64(sum.Nanoseconds()) / 1e3 / float64(len(all))
	}
	agg.Histogram = newHistogram(all)
	emit(agg)
	emit(summaryEvent{Event: "summary", OK: agg.OK, Conns: cfg.conns, Failed: failed})
	if !agg.OK {
		return 1
	}
	return 0
}

// fixedMessage is a connection's message: a header whose index changes per
// exchange and a payload fixed for the connection.
type fixedMessage struct {
	buf []byte
}

func newFixedMessage(seed uint64, conn, size int) *fixedMessage {
	m := &fixedMessage{buf: make([]byte, headerLen+size)}
	r := rand.New(rand.NewPCG(seed, uint64(conn)))
	payload := m.buf[headerLen:]
	for i := range payload {
		payload[i] = byte(r.Uint32())
	}
	binary.BigEndian.PutUint32(m.buf[4:8], uint32(size))
	binary.BigEndian.PutUint32(m.buf[8:12], crc32.ChecksumIEEE(payload))
	return m
}

// next returns message idx; the slice is reused.
func (m *fixedMessage) next(idx uint32) []byte {
	binary.BigEndian.PutUint32(m.buf[0:4], idx)
	return m.buf
}

// exchange writes msg and reads its echo into rbuf, comparing bytes.
func exchange(c net.Conn, msg, rbuf []byte, timeout time.Duration) error {
	_ = c.SetDeadline(time.Now().Add(timeout))
	if _, err := c.Write(msg); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	if _, err := io.ReadFull(c, rbuf); err != nil {
		return fmt.Errorf("read echo: %w", err)
	}
	if !bytes.Equal(rbuf, msg) {
		return fmt.Errorf("message %d: echo differs from what was sent", binary.BigEndian.Uint32(msg[0:4]))
	}
	return nil
}

func dialLoad(cfg clientConfig, src net.Addr) (net.Conn, error) {
	if cfg.v4mapped {
		return dialV4Mapped(cfg.target)
	}
	d := net.Dialer{Timeout: cfg.timeout, LocalAddr: src}
	return d.Dial("tcp", cfg.target)
}

// pace sleeps until the next scheduled time and returns the one after; a
// connection that fell behind does not catch up in a burst.
func pace(next time.Time, interval time.Duration) time.Time {
	if interval == 0 {
		return next
	}
	if d := time.Until(next); d > 0 {
		time.Sleep(d)
	}
	after := next.Add(interval)
	if now := time.Now(); after.Before(now) {
		after = now
	}
	return after
}

// rrConn is one request/response connection of load mode.
func rrConn(idx int, cfg clientConfig, src net.Addr, w *loadWindow, first time.Time, interval time.Duration) connStats {
	var s connStats
	c, err := dialLoad(cfg, src)
	if err != nil {
		s.err = fmt.Errorf("dial: %w", err)
		return s
	}
	defer c.Close()
	msg := newFixedMessage(cfg.seed, idx, cfg.size)
	rbuf := make([]byte, headerLen+cfg.size)
	next := first
	for i := uint32(0); ; i++ {
		next = pace(next, interval)
		start := time.Now()
		if w.over(start) {
			break
		}
		m := msg.next(i)
		if err := exchange(c, m, rbuf, cfg.timeout); err != nil {
			s.err = err
			return s
		}
		if w.in(start) {
			s.rtts = append(s.rtts, time.Since(start))
			s.messages++
			s.bytes += int64(len(m))
		}
	}
	if tc, ok := c.(*net.TCPConn); ok {
		if err := closeGracefully(tc, cfg.timeout); err != nil {
			s.err = err
		}
	}
	emit(resultEvent{Event: "result", Conn: idx, OK: s.err == nil, Messages: int(s.messages), Bytes: s.bytes, Errors: errList(s.err),
		Local: addrString(c.LocalAddr()), Remote: addrString(c.RemoteAddr())})
	return s
}

// reconnectLoop opens one connection per exchange.
func reconnectLoop(idx int, cfg clientConfig, src net.Addr, w *loadWindow, first time.Time, interval time.Duration) connStats {
	var s connStats
	msg := newFixedMessage(cfg.seed, idx, cfg.size)
	rbuf := make([]byte, headerLen+cfg.size)
	next := first
	for i := uint32(0); ; i++ {
		next = pace(next, interval)
		start := time.Now()
		if w.over(start) {
			break
		}
		if err := oneShot(cfg, src, msg.next(i), rbuf); err != nil {
			s.err = fmt.Errorf("connection %d: %w", i, err)
			return s
		}
		if w.in(start) {
			s.rtts = append(s.rtts, time.Since(start))
			s.messages++
			s.bytes += int64(len(rbuf))
		}
	}
	emit(resultEvent{Event: "result", Conn: idx, OK: s.err == nil, Messages: int(s.messages), Bytes: s.bytes, Errors: errList(s.err), Remote: cfg.target})
	return s
}

// oneShot connects, exchanges one message and closes gracefully.
func oneShot(cfg clientConfig, src net.Addr, msg, rbuf []byte) error {
	c, err := dialLoad(cfg, src)
	if err != nil {
		return fmt.Errorf("dial: %w", err)
	}
	defer c.Close()
	if err := exchange(c, msg, rbuf, cfg.timeout); err != nil {
		return err
	}
	if tc, ok := c.(*net.TCPConn); ok {
		return closeGracefully(tc, cfg.timeout)
	}
	return nil
}

// streamConn writes chunks to a sink until the window ends, then checks the
// sink's count of the bytes it received.
func streamConn(idx int, cfg clientConfig, src net.Addr, w *loadWindow) connStats {
	var s connStats
	c, err := dialLoad(cfg, src)
	if err != nil {
		s.err = fmt.Errorf("dial: %w", err)
		return s
	}
	defer c.Close()
	chunk := newFixedMessage(cfg.seed, idx, cfg.size).next(0)
	var total int64
	for {
		start := time.Now()
		if w.over(start) {
			break
		}
		_ = c.SetWriteDeadline(start.Add(cfg.timeout))
		n, err := c.Write(chunk)
		total += int64(n)
		if err != nil {
			s.err = fmt.Errorf("write: %w", err)
			return s
		}
		if w.in(start) {
			s.messages++
			s.bytes += int64(n)
		}
	}
	tc, ok := c.(*net.TCPConn)
	if !ok {
		s.err = errors.New("not a TCP connection")
		return s
	}
	if err := tc.CloseWrite(); err != nil {
		s.err = fmt.Errorf("close write: %w", err)
		return s
	}
	_ = c.SetReadDeadline(time.Now().Add(cfg.timeout))
	var cnt [8]byte
	if _, err := io.ReadFull(c, cnt[:]); err != nil {
		s.err = fmt.Errorf("read the sink's byte count: %w", err)
		return s
	}
	if got := int64(binary.BigEndian.Uint64(cnt[:])); got != total {
		s.err = fmt.Errorf("sink received %d bytes, %d were written", got, total)
	}
	emit(resultEvent{Event: "result", Conn: idx, OK: s.err == nil, Messages: int(s.messages), Bytes: total, Errors: errList(s.err),
		Local: addrString(c.LocalAddr()), Remote: addrString(c.RemoteAddr())})
	return s
}

func errList(err error) []string {
	if err == nil {
		return []string{}
	}
	return []string{err.Error()}
}
