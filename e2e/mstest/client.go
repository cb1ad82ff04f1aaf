package main

import (
	"encoding/binary"
	"os"
	"slices"

	"errors"
	"flag"
	"fmt"
	"golang.org/x/sys/unix"
	"hash/crc32"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"sync"
	"time"
)

// headerLen is the size of a message header: message index, payload
// length and CRC-32 (IEEE) of the payload, each a big-endian uint32.
const headerLen = 12

// maxErrors caps the errors listed in a result event.
const maxErrors = 20

// resultEvent is printed by the client for each connection once its
// message exchange is over.
type resultEvent struct {
	Event     string   `json:"event"` // "result"
	Conn      int      `json:"conn"`
	OK        bool     `json:"ok"`
	Messages  int      `json:"messages"` // messages echoed and verified
	Bytes     int64    `json:"bytes"`    // bytes sent (headers included) and verified back
	Errors    []string `json:"errors"`
	Local     string   `json:"local"`
	Remote    string   `json:"remote"`
	ElapsedMS float64  `json:"elapsed_ms"`
	// Round-trip latency percentiles of request/response exchanges (not
	// with --pipelined), in microseconds.
	P50US  float64 `json:"p50_us,omitempty"`
	P90US  float64 `json:"p90_us,omitempty"`
	P99US  float64 `json:"p99_us,omitempty"`
	P999US float64 `json:"p999_us,omitempty"`

	rtts []time.Duration
	// allSent: until-signal mode verified every message sent.
	allSent bool
}

// percentiles fills the latency fields from the recorded round trips.
func (r *resultEvent) percentiles() {
	if len(r.rtts) == 0 {
		return
	}
	slices.Sort(r.rtts)
	at := func(q float64) float64 {
		i := int(q * float64(len(r.rtts)-1))
		return float64(r.rtts[i].Nanoseconds()) / 1e3
	}
	r.P50US, r.P90US, r.P99US, r.P999US = at(0.50), at(0.90), at(0.99), at(0.999)
}

// closedEvent is printed after a successful exchange (and --hold) when the
// client has closed the connection: it half-closes, waits for the server's
// EOF, then closes.
type closedEvent struct {
	Event string `json:"event"` // "closed"
	Conn  int    `json:"conn"`
	OK    bool   `json:"ok"`
	Error string `json:"error,omitempty"`
}

// summaryEvent is printed last.
type summaryEvent struct {
	Event  string `json:"event"` // "summary"
	OK     bool   `json:"ok"`
	Conns  int    `json:"conns"`
	Failed int    `json:"failed"`
}

type clientConfig struct {
	target    string
	messages  int
	size      int
	pipelined bool
	conns     int
	source    string
	hold      time.Duration
	interval  time.Duration
	timeout   time.Duration
	seed      uint64
	v4mapped  bool
	// untilSignal: --pipelined until SIGUSR1 (untilstop.go).
	untilSignal bool

	// Load mode (load.go).
	duration  time.Duration
	warmup    time.Duration
	rate      float64
	stream    bool
	reconnect bool
	cpuStats  cpuStats
}

// runClient connects to an echo server, sends framed messages of
// pseudo-random payload and verifies that each comes back in order and
// intact.
func runClient(args []string) int {
	fs := flag.NewFlagSet("client", flag.ContinueOnError)
	var cfg clientConfig
	fs.StringVar(&cfg.target, "target", "", "server address ip:port ([v6]:port for IPv6) (required)")
	fs.IntVar(&cfg.messages, "messages", 10, "messages per connection")
	fs.IntVar(&cfg.size, "size", 1024, "payload bytes per message (a 12-byte header is added)")
	fs.BoolVar(&cfg.pipelined, "pipelined", false, "write all messages on one goroutine while reading echoes on another, instead of request/response")
	fs.IntVar(&cfg.conns, "conns", 1, "parallel connections")
	fs.StringVar(&cfg.source, "source", "", "local source IP (or IP:port) to bind")
	fs.DurationVar(&cfg.hold, "hold", 0, "keep each connection open this long after the exchange (after printing its result)")
	fs.DurationVar(&cfg.interval, "interval", 0, "pause between messages")
	fs.DurationVar(&cfg.timeout, "timeout", 10*time.Second, "timeout of dialing and of each read or write")
	fs.Uint64Var(&cfg.seed, "seed", 1, "payload seed")
	fs.BoolVar(&cfg.v4mapped, "v4mapped", false, "connect to an IPv4 target from an AF_INET6 socket, to ::ffff:a.b.c.d (Go would use AF_INET)")
	fs.BoolVar(&cfg.untilSignal, "until-signal", false, "with --pipelined: send until SIGUSR1 (--messages is then an upper bound); SIGUSR2 prints a progress event")
	fs.DurationVar(&cfg.duration, "duration", 0, "load mode: measure for this long (after --warmup) instead of sending --messages, and print an aggregate event")
	fs.DurationVar(&cfg.warmup, "warmup", 0, "load mode: exchange this long before the measurement window starts")
	fs.Float64Var(&cfg.rate, "rate", 0, "load mode: exchanges per second over all connections (0: as fast as possible)")
	fs.BoolVar(&cfg.stream, "stream", false, "load mode: write --size-byte chunks without waiting, to an mstest sink server")
	fs.BoolVar(&cfg.reconnect, "reconnect", false, "load mode: a new connection for every exchange (connection rate)")
	fs.Var(&cfg.cpuStats, "cpu-stat", "load mode: "+cpuStatUsage)
	if code, ok := parseFlags(fs, args); !ok {
		return code
	}
	if cfg.target == "" {
		logf("client: --target is required")
		return 2
	}
	if cfg.messages < 0 || cfg.size < 0 || cfg.conns < 1 {
		logf("client: --messages and --size must be >= 0 and --conns >= 1")
		return 2
	}
	if cfg.duration <= 0 && (cfg.warmup != 0 || cfg.rate != 0 || cfg.stream || cfg.reconnect || len(cfg.cpuStats) > 0) {
		logf("client: --warmup, --rate, --stream, --reconnect and --cpu-stat need --duration")
		return 2
	}
	if cfg.warmup < 0 || cfg.rate < 0 {
		logf("client: --warmup and --rate must be >= 0")
		return 2
	}
	var src net.Addr
	if cfg.source != "" {
		if ap, err := netip.ParseAddrPort(cfg.source); err == nil {
			src = &net.TCPAddr{IP: ap.Addr().AsSlice(), Port: int(ap.Port())}
		} else {
			ip, err := netip.ParseAddr(cfg.source)
			if err != nil {
				logf("client: bad --source: %v", err)
				return 2
			}
			src = &net.TCPAddr{IP: ip.AsSlice()}
		}
	}

	if cfg.duration > 0 {
		return runLoad(cfg, src)
	}
	if cfg.untilSignal {
		if !cfg.pipelined {
			logf("client: --until-signal needs --pipelined")
			return 2
		}
		watchStopSignals()
	}

	var mu sync.Mutex
	failed := 0
	var wg sync.WaitGroup
	for i := range cfg.conns {
		wg.Go(func() {
			if !runConn(i, cfg, src) {
				mu.Lock()
				failed++
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	emit(summaryEvent{Event: "summary", OK: failed == 0, Conns: cfg.conns, Failed: failed})
	if failed > 0 {
		return 1
	}
	return 0
}

// runConn runs one connection and reports whether it went well.
func runConn(idx int, cfg clientConfig, src net.Addr) bool {
	start := time.Now()
	res := resultEvent{Event: "result", Conn: idx, Remote: cfg.target, Errors: []string{}}
	addErr := func(err error) {
		if len(res.Errors) < maxErrors {
			res.Errors = append(res.Errors, err.Error())
		}
	}
	var nc net.Conn
	var err error
	if cfg.v4mapped {
		nc, err = dialV4Mapped(cfg.target)
	} else {
		d := net.Dialer{Timeout: cfg.timeout, LocalAddr: src}
		nc, err = d.Dial("tcp", cfg.target)
	}
	if err != nil {
		addErr(fmt.Errorf("dial: %w", err))
		res.ElapsedMS = msSince(start)
		emit(res)
		return false
	}
	c := nc.(*net.TCPConn)
	defer c.Close()
	res.Local, res.Remote = addrString(c.LocalAddr()), addrString(c.RemoteAddr())

	gen := newPayloadGen(cfg.seed, idx, cfg.size)
	if cfg.untilSignal {
		exchangeUntilStopped(c, cfg, gen, &res, addErr)
	} else if cfg.pipelined {
		exchangePipelined(c, cfg, gen, &res, addErr)
	} else {
		exchangeSerial(c, cfg, gen, &res, addErr)
	}
	res.OK = len(res.Errors) == 0 && (res.Messages == cfg.messages || res.allSent)
	if !res.OK && len(res.Errors) == 0 {
		addErr(fmt.Errorf("only %d of %d messages verified", res.Messages, cfg.messages))
	}
	res.ElapsedMS = msSince(start)
	res.percentiles()
	emit(res)
	if !res.OK {
		return false
	}

	if cfg.hold > 0 {
		time.Sleep(cfg.hold)
	}
	closed := closedEvent{Event: "closed", Conn: idx, OK: true}
	if err := closeGracefully(c, cfg.timeout); err != nil {
		closed.OK, closed.Error = false, err.Error()
	}
	emit(closed)
	return closed.OK
}

// exchangeSerial writes one message and reads its echo before the next.
func exchangeSerial(c *net.TCPConn, cfg clientConfig, gen *payloadGen, res *resultEvent, addErr func(error)) {
	rbuf := make([]byte, headerLen+cfg.size)
	for i := range cfg.messages {
		if i > 0 && cfg.interval > 0 {
			time.Sleep(cfg.interval)
		}
		msg := gen.message(uint32(i))
		_ = c.SetWriteDeadline(time.Now().Add(cfg.timeout))
		start := time.Now()
		if _, err := c.Write(msg); err != nil {
			addErr(fmt.Errorf("write message %d: %w", i, err))
			return
		}
		if err := readMessage(c, cfg, gen, uint32(i), rbuf); err != nil {
			addErr(err)
			return
		}
		res.rtts = append(res.rtts, time.Since(start))
		res.Messages++
		res.Bytes += int64(len(msg))
	}
}

// exchangePipelined writes all messages from one goroutine while another
// reads and verifies the echoes, so data flows both ways at once.
func exchangePipelined(c *net.TCPConn, cfg clientConfig, gen *payloadGen, res *resultEvent, addErr func(error)) {
	werr := make(chan error, 1)
	wgen := newPayloadGen(cfg.seed, gen.conn, cfg.size)
	go func() {
		for i := range cfg.messages {
			if i > 0 && cfg.interval > 0 {
				time.Sleep(cfg.interval)
			}
			_ = c.SetWriteDeadline(time.Now().Add(cfg.timeout))
			if _, err := c.Write(wgen.message(uint32(i))); err != nil {
				werr <- fmt.Errorf("write message %d: %w", i, err)
				return
			}
		}
		werr <- nil
	}()
	rbuf := make([]byte, headerLen+cfg.size)
	for i := range cfg.messages {
		if err := readMessage(c, cfg, gen, uint32(i), rbuf); err != nil {
			addErr(err)
			// Unblock the writer if it is stuck on a full window.
			_ = c.SetWriteDeadline(time.Now())
			break
		}
		res.Messages++
		res.Bytes += int64(headerLen + cfg.size)
	}
	if err := <-werr; err != nil && res.Messages == cfg.messages {
		addErr(err)
	}
}

// readMessage reads the echo of message idx and verifies header, checksum
// and content.
func readMessage(c *net.TCPConn, cfg clientConfig, gen *payloadGen, idx uint32, buf []byte) error {
	_ = c.SetReadDeadline(time.Now().Add(cfg.timeout + cfg.interval))
	if _, err := io.ReadFull(c, buf[:headerLen]); err != nil {
		return fmt.Errorf("read header of message %d: %w", idx, err)
	}
	gotIdx := binary.BigEndian.Uint32(buf[0:4])
	gotLen := binary.BigEndian.Uint32(buf[4:8])
	gotCRC := binary.BigEndian.Uint32(buf[8:12])
	if gotIdx != idx {
		return fmt.Errorf("message %d: echoed header has index %d (out of order or corrupt)", idx, gotIdx)
	}
	if gotLen != uint32(cfg.size) {
		return fmt.Errorf("message %d: echoed header has length %d, want %d", idx, gotLen, cfg.size)
	}
	payload := buf[headerLen : headerLen+cfg.size]
	if _, err := io.ReadFull(c, payload); err != nil {
		return fmt.Errorf("read payload of message %d: %w", idx, err)
	}
	if crc := crc32.ChecksumIEEE(payload); crc != gotCRC {
		return fmt.Errorf("message %d: payload checksum %08x, header says %08x", idx, crc, gotCRC)
	}
	want := gen.message(idx)
	if string(want) != string(buf[:headerLen+cfg.size]) {
		return fmt.Errorf("message %d: echoed payload differs from the one sent", idx)
	}
	return nil
}

// closeGracefully half-closes c, expects the server's EOF with no further
// data, and closes it.
func closeGracefully(c *net.TCPConn, timeout time.Duration) error {
	if err := c.CloseWrite(); err != nil {
		return fmt.Errorf("close write: %w", err)
	}
	_ = c.SetReadDeadline(time.Now().Add(timeout))
	var b [512]byte
	n, err := c.Read(b[:])
	switch {
	case n > 0:
		return fmt.Errorf("%d unexpected bytes after the exchange", n)
	case errors.Is(err, io.EOF):
		return nil
	case err != nil:
		return fmt.Errorf("wait for server EOF: %w", err)
	}
	return errors.New("wait for server EOF: empty read")
}

// payloadGen produces the deterministic messages of one connection.
type payloadGen struct {
	seed uint64
	conn int
	size int
	buf  []byte
}

func newPayloadGen(seed uint64, conn, size int) *payloadGen {
	return &payloadGen{seed: seed, conn: conn, size: size, buf: make([]byte, headerLen+size)}
}

// message returns message idx (header and payload). The slice is reused by
// the next call.
func (g *payloadGen) message(idx uint32) []byte {
	r := rand.New(rand.NewPCG(g.seed, uint64(g.conn)<<32|uint64(idx)))
	payload := g.buf[headerLen:]
	for i := 0; i < len(payload); i += 8 {
		var w [8]byte
		binary.LittleEndian.PutUint64(w[:], r.Uint64())
		copy(payload[i:], w[:])
	}
	binary.BigEndian.PutUint32(g.buf[0:4], idx)
	binary.BigEndian.PutUint32(g.buf[4:8], uint32(g.size))
	binary.BigEndian.PutUint32(g.buf[8:12], crc32.ChecksumIEEE(payload))
	return g.buf
}

func msSince(t time.Time) float64 {
	return float64(time.Since(t).Microseconds()) / 1000
}

// dialV4Mapped connects an AF_INET6 socket to the v4-mapped form of an IPv4
// target, as dual-stack applications written in C do. The kernel then runs
// only cgroup/connect6, never connect4.
func dialV4Mapped(target string) (net.Conn, error) {
	ap, err := netip.ParseAddrPort(target)
	if err != nil || !ap.Addr().Unmap().Is4() {
		return nil, fmt.Errorf("--v4mapped needs an IPv4 target, got %q", target)
	}
	fd, err := unix.Socket(unix.AF_INET6, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("socket: %w", err)
	}
	sa := &unix.SockaddrInet6{Port: int(ap.Port()), Addr: netip.AddrFrom16(ap.Addr().As16()).As16()}
	if err := unix.Connect(fd, sa); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("connect [::ffff:%s]:%d: %w", ap.Addr(), ap.Port(), err)
	}
	f := os.NewFile(uintptr(fd), "v4mapped")
	defer f.Close()
	return net.FileConn(f)
}
