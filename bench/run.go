package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/meshsplice/meshsplice/internal/lab"
)

// Evidence is what the kernel and the pods showed during a run: proof of
// the path the traffic took.
type Evidence struct {
	// IptablesRules counts the nat rules in Istio's chains found with
	// iptables-save in the meshed pods right after the run; PodsWithRules
	// how many of those pods had any.
	IptablesRules int `json:"iptables_rules"`
	PodsWithRules int `json:"pods_with_rules"`
	// ConnectCaptured and InboundCaptured are connections meshsplice sent
	// to a sidecar (connect4/6, sk_lookup).
	ConnectCaptured uint64 `json:"connect_captured"`
	InboundCaptured uint64 `json:"inbound_captured"`
	// OrigDstConntrack are SO_ORIGINAL_DST answers that came from
	// conntrack (iptables REDIRECT); OrigDstBPF those meshsplice gave.
	OrigDstConntrack uint64 `json:"orig_dst_conntrack"`
	OrigDstBPF       uint64 `json:"orig_dst_bpf"`
	// SocketsSpliced joined the splice map; MsgsRedirected are sends
	// handed socket to socket; RedirectMisses fell back to TCP.
	SocketsSpliced uint64 `json:"sockets_spliced"`
	MsgsRedirected uint64 `json:"msgs_redirected"`
	RedirectMisses uint64 `json:"redirect_misses"`
}

func (ev *Evidence) add(o Evidence) {
	ev.IptablesRules += o.IptablesRules
	ev.PodsWithRules = max(ev.PodsWithRules, o.PodsWithRules)
	ev.ConnectCaptured += o.ConnectCaptured
	ev.InboundCaptured += o.InboundCaptured
	ev.OrigDstConntrack += o.OrigDstConntrack
	ev.OrigDstBPF += o.OrigDstBPF
	ev.SocketsSpliced += o.SocketsSpliced
	ev.MsgsRedirected += o.MsgsRedirected
	ev.RedirectMisses += o.RedirectMisses
}

// sample is one run of a cell in a mode.
type sample struct {
	// Latency percentiles of this run, in microseconds.
	p50, p90, p99, p999 float64
	hasLatency          bool
	// hist is the run's latency histogram (mstest runs), pooled across
	// repetitions.
	hist *logHist
	// rps are requests (stream: writes, connect: connections) per second;
	// units how many of them fell in the measurement window.
	rps       float64
	bytesPerS float64
	units     int64
	// cpu is the CPU time of each role over the measurement window, nil
	// when unknown; cpuUnknown says why.
	cpu        map[string]lab.CPU
	cpuUnknown string
	evidence   Evidence
	// foreign is the CPU time processes not of the benchmark used during
	// the window (on any CPU: unpinned, they compete for the pods' CPU
	// too); foreignPct relative to the window.
	foreign    time.Duration
	foreignPct float64
	window     time.Duration
}

// disturbed tells whether other processes used more than 5% of a CPU
// during the window, and more than the 10 ms tick resolution allows to be
// noise.
func (s *sample) disturbed() bool {
	return s.foreign > max(30*time.Millisecond, s.window/20)
}

// cpuPerUnit is the CPU time of all roles per request, in microseconds;
// not known when the readings did not cover the window (s.cpu is nil) or
// nothing was counted in it. A known 0 is a measurement error, reported as
// such.
func (s *sample) cpuPerUnit() (float64, bool) {
	if s.cpu == nil || s.units == 0 {
		return 0, false
	}
	var sum time.Duration
	for _, d := range s.cpu {
		sum += d.Total
	}
	return float64(sum.Microseconds()) / float64(s.units), true
}

// markDelay delays the handling of every window mark line by the
// benchmark (tests: a benchmark process the machine's load keeps from
// running).
var markDelay time.Duration

// windowMarks collects a run's window marks. The role cgroups' CPU times
// come in the marks themselves: the client (mstest client --cpu-stat, or
// mstest window around fortio) reads them at the edges of its window, on
// the pods' CPU. The benchmark handles a mark when it gets to it, on a
// loaded machine long after the window may be over: a reading taken then
// would miss the window's work. Only the other processes' CPU times and
// the clock, for the disturbance check, are read on handling.
type windowMarks struct {
	root       string
	mu         sync.Mutex
	start, end map[string]lab.CPU
	// others are the other processes' CPU times, t the wall clock, when
	// each mark was handled.
	othersStart, othersEnd lab.ProcTimes
	tStart, tEnd           time.Time
	// read are the wall clock times of the client's readings.
	readStart, readEnd time.Time
	err                error
	// unknown says why the readings do not cover the window.
	unknown string
}

// windowEvent is the window event of mstest (e2e/mstest/load.go).
type windowEvent struct {
	Phase string `json:"phase"`
	CPU   map[string]struct {
		TotalUS  int64 `json:"total_us"`
		UserUS   int64 `json:"user_us"`
		SystemUS int64 `json:"system_us"`
	} `json:"cpu"`
	Error  string `json:"error"`
	UnixNS int64  `json:"unix_ns"`
}

// cpuStatArgs are the --cpu-stat flags of mstest client and mstest window
// for the topology's role cgroups.
func (e *env) cpuStatArgs() []string {
	var args []string
	for _, role := range slices.Sorted(maps.Keys(e.roles)) {
		args = append(args, "--cpu-stat", role+"="+e.roles[role].Path)
	}
	return args
}

// line handles a line of the client's output; window events are marks.
func (w *windowMarks) line(line string) {
	if !strings.HasPrefix(line, `{"event":"window"`) {
		return
	}
	time.Sleep(markDelay)
	now := time.Now()
	others, oerr := lab.OtherProcs(w.root)
	var ev windowEvent
	err := json.Unmarshal([]byte(line), &ev)
	switch {
	case err != nil:
		err = fmt.Errorf("client window event %s: %w", line, err)
	case ev.Error != "":
		err = fmt.Errorf("client window %s: %s", ev.Phase, ev.Error)
	case len(ev.CPU) == 0:
		err = fmt.Errorf("client window event without CPU readings: %s", line)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	if err = errors.Join(err, oerr); err != nil {
		w.err = errors.Join(w.err, err)
		return
	}
	cpu := map[string]lab.CPU{}
	for role, c := range ev.CPU {
		us := func(v int64) time.Duration { return time.Duration(v) * time.Microsecond }
		cpu[role] = lab.CPU{Total: us(c.TotalUS), User: us(c.UserUS), System: us(c.SystemUS)}
	}
	if ev.Phase == "start" {
		w.start, w.othersStart, w.tStart, w.readStart = cpu, others, now, time.Unix(0, ev.UnixNS)
	} else if w.start != nil {
		w.end, w.othersEnd, w.tEnd, w.readEnd = cpu, others, now, time.Unix(0, ev.UnixNS)
	}
}

// foreign returns the CPU time other processes used during the window,
// and the window's length.
func (w *windowMarks) foreign() (time.Duration, time.Duration) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return lab.Foreign(w.othersStart, w.othersEnd), w.tEnd.Sub(w.tStart)
}

// covers checks that the readings were taken within tolerance of the start
// and the end of a window the load generator reports itself (fortio: mstest
// window takes them when it gets to fortio's lines, on the pods' busy CPU).
// Otherwise the window's CPU time is unknown.
func (w *windowMarks) covers(start time.Time, length time.Duration, tolerance time.Duration) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.start == nil || w.end == nil {
		return // delta says so
	}
	late := max(w.readStart.Sub(start), w.readEnd.Sub(start.Add(length)))
	if late > tolerance {
		w.unknown = fmt.Sprintf("the CPU readings came up to %v after the edges of the %v window", late.Round(time.Microsecond), length.Round(time.Microsecond))
	}
}

// delta returns each role's CPU time over the window, nil and why when
// unknown.
func (w *windowMarks) delta() (map[string]lab.CPU, string, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.err != nil {
		return nil, "", w.err
	}
	if w.start == nil || w.end == nil {
		return nil, "", fmt.Errorf("the client did not mark its measurement window")
	}
	if w.unknown != "" {
		return nil, w.unknown, nil
	}
	d := map[string]lab.CPU{}
	for role, v := range w.end {
		s, ok := w.start[role]
		if !ok {
			return nil, "", fmt.Errorf("the client read the CPU time of %s at the end of its window only", role)
		}
		d[role] = v.Sub(s)
	}
	return d, "", nil
}

// run measures cell c once in the current mode.
func (e *env) run(ctx context.Context, c Cell, warmup, window time.Duration) (*sample, error) {
	before, err := e.counters()
	if err != nil {
		return nil, err
	}
	marks := &windowMarks{root: e.root.Path}
	var s *sample
	if c.Workload == HTTP {
		s, err = e.runFortio(ctx, c, window, marks)
	} else {
		s, err = e.runMstest(ctx, c, warmup, window, marks)
	}
	if err != nil {
		return nil, err
	}
	if s.cpu, s.cpuUnknown, err = marks.delta(); err != nil {
		return nil, err
	}
	s.foreign, s.window = marks.foreign()
	if s.window > 0 {
		s.foreignPct = 100 * float64(s.foreign) / float64(s.window)
	}
	after, err := e.counters()
	if err != nil {
		return nil, err
	}
	d := after.Sub(before)
	s.evidence = Evidence{
		ConnectCaptured:  d["connect.captured"],
		InboundCaptured:  d["sk_lookup.captured"],
		OrigDstConntrack: d["getsockopt.orig_dst_kernel"],
		OrigDstBPF:       d["getsockopt.orig_dst_outbound"] + d["getsockopt.orig_dst_inbound"],
		SocketsSpliced:   d["sockops.sock_inserted"],
		MsgsRedirected:   d["sk_msg.redirected"],
		RedirectMisses:   d["sk_msg.miss_first_send"] + d["sk_msg.miss_later_send"],
	}
	for _, p := range e.meshed {
		n, err := istioRules(p)
		if err != nil {
			return nil, err
		}
		s.evidence.IptablesRules += n
		if n > 0 {
			s.evidence.PodsWithRules++
		}
	}
	if err := e.check(s.evidence); err != nil {
		return nil, fmt.Errorf("%s %s mode=%s: %w", e.topo, c.Label(), e.mode, err)
	}
	return s, nil
}

// check fails when the evidence does not match the mode: a mis-set mode
// must not produce a number.
func (e *env) check(ev Evidence) error {
	var problems []string
	want := func(ok bool, format string, args ...any) {
		if !ok {
			problems = append(problems, fmt.Sprintf(format, args...))
		}
	}
	m := e.mode
	captured := m == Capture || m == Meshsplice || m == MeshspliceFull
	if m == Iptables {
		want(ev.PodsWithRules == len(e.meshed), "Istio's rules found in %d of %d meshed pods", ev.PodsWithRules, len(e.meshed))
		want(ev.OrigDstConntrack > 0, "no SO_ORIGINAL_DST answered by conntrack: the sidecars were not in the path")
	} else {
		want(ev.IptablesRules == 0, "%d Istio iptables rules present", ev.IptablesRules)
		want(ev.OrigDstConntrack == 0, "%d SO_ORIGINAL_DST answers from conntrack", ev.OrigDstConntrack)
	}
	if captured {
		want(ev.ConnectCaptured > 0 && ev.OrigDstBPF > 0, "nothing captured (connect %d, orig_dst %d)", ev.ConnectCaptured, ev.OrigDstBPF)
		want(!e.server.meshed || ev.InboundCaptured > 0, "no inbound capture into the server's sidecar")
	} else {
		want(ev.ConnectCaptured == 0 && ev.InboundCaptured == 0 && ev.OrigDstBPF == 0,
			"meshsplice captured (connect %d, inbound %d, orig_dst %d)", ev.ConnectCaptured, ev.InboundCaptured, ev.OrigDstBPF)
	}
	spliced := m == MeshspliceFull || (m == Meshsplice && e.topo == SameNode)
	if spliced {
		want(ev.MsgsRedirected > 0, "nothing spliced")
	} else {
		want(ev.MsgsRedirected == 0 && ev.SocketsSpliced == 0, "spliced %d sockets, %d sends", ev.SocketsSpliced, ev.MsgsRedirected)
	}
	if len(problems) > 0 {
		return fmt.Errorf("traffic did not take the mode's path: %s", strings.Join(problems, "; "))
	}
	return nil
}

func (e *env) target(port int) string {
	return netip.AddrPortFrom(e.server.IP, uint16(port)).String()
}

// runMstest runs the mstest client in load mode in the client pod.
func (e *env) runMstest(ctx context.Context, c Cell, warmup, window time.Duration, marks *windowMarks) (*sample, error) {
	port := echoPort
	args := []string{e.opts.bin("mstest"), "client", "--duration", window.String(), "--warmup", warmup.String(),
		"--conns", fmt.Sprint(c.Conns), "--size", fmt.Sprint(c.Size), "--timeout", "10s"}
	switch c.Workload {
	case Stream:
		port = sinkPort
		args = append(args, "--stream")
	case Connect:
		args = append(args, "--reconnect")
	}
	if c.Rate > 0 {
		args = append(args, "--rate", fmt.Sprint(c.Rate))
	}
	args = append(append(args, e.cpuStatArgs()...), "--target", e.target(port))
	p, err := e.start(e.client, roleClientApp, e.client.app, appUID, args, func(stream, line string) {
		if stream == "stdout" {
			marks.line(line)
		}
	}, true)
	if err != nil {
		return nil, err
	}
	if err := p.Wait(ctx, warmup+window+60*time.Second); err != nil {
		return nil, err
	}
	ev, err := p.WaitEvent(ctx, "aggregate", time.Second)
	if err != nil {
		return nil, err
	}
	var agg aggregate
	if err := ev.Decode(&agg); err != nil {
		return nil, fmt.Errorf("client aggregate event: %w", err)
	}
	if !agg.OK {
		return nil, fmt.Errorf("client failed: %v", agg.Errors)
	}
	s := &sample{rps: agg.RPS, bytesPerS: agg.BytesPerS, units: agg.Messages}
	if c.Workload != Stream {
		s.hasLatency = true
		s.p50, s.p90, s.p99, s.p999 = agg.P50US, agg.P90US, agg.P99US, agg.P999US
		s.hist = newLogHist(agg.Hist)
	}
	return s, nil
}

// histogram is mstest's aggregate histogram (see e2e/mstest/load.go).
type histogram struct {
	Base    float64    `json:"base"`
	Buckets [][2]int64 `json:"buckets"`
}

// aggregate is mstest client's aggregate event (e2e/mstest/load.go).
type aggregate struct {
	OK        bool      `json:"ok"`
	Messages  int64     `json:"messages"`
	RPS       float64   `json:"rps"`
	BytesPerS float64   `json:"bytes_per_s"`
	P50US     float64   `json:"p50_us"`
	P90US     float64   `json:"p90_us"`
	P99US     float64   `json:"p99_us"`
	P999US    float64   `json:"p999_us"`
	Errors    []string  `json:"errors"`
	Hist      histogram `json:"hist"`
}

// fortioResult is the part of fortio's JSON result the benchmark reads.
type fortioResult struct {
	ActualQPS         float64
	StartTime         time.Time
	ActualDuration    time.Duration
	DurationHistogram struct {
		Count       int64
		Percentiles []struct {
			Percentile float64
			Value      float64 // seconds
		}
	}
	ErrorsDurationHistogram struct {
		Count int64
	}
	RetCodes map[string]int64
}

// runFortio runs `fortio load` in the client pod against the fortio server:
// Istio's method (fixed total rate, 1 KiB bodies echoed back).
func (e *env) runFortio(ctx context.Context, c Cell, window time.Duration, marks *windowMarks) (*sample, error) {
	// mstest window reads the CPU times when fortio prints the lines that
	// open and close its window ("Starting at", "Ended after").
	args := append([]string{e.opts.bin("mstest"), "window"}, e.cpuStatArgs()...)
	args = append(args, "--start", "Starting at ", "--end", "Ended after ", "--",
		e.opts.bin("fortio"), "load", "-qps", fmt.Sprint(c.Rate), "-c", fmt.Sprint(c.Conns),
		"-t", window.String(), "-r", "0.00001", "-p", "50,90,99,99.9", "-payload-size", fmt.Sprint(c.Size),
		"-uniform", "-json", "-", "-logger-json=false",
		"http://"+e.target(fortioPort)+"/echo")
	p, err := e.start(e.client, roleClientApp, e.client.app, appUID, args, func(stream, line string) {
		if stream == "stderr" {
			marks.line(line)
		}
	}, true)
	if err != nil {
		return nil, err
	}
	if err := p.Wait(ctx, window+60*time.Second); err != nil {
		return nil, err
	}
	var r fortioResult
	if err := json.Unmarshal([]byte(strings.Join(p.Stdout(), "\n")), &r); err != nil {
		return nil, fmt.Errorf("fortio result: %w; last output:\n%s", err, p.Tail())
	}
	h := r.DurationHistogram
	if h.Count == 0 || r.ErrorsDurationHistogram.Count != 0 || r.RetCodes["200"] != h.Count {
		return nil, fmt.Errorf("fortio: %d requests, %d errors, return codes %v", h.Count, r.ErrorsDurationHistogram.Count, r.RetCodes)
	}
	marks.covers(r.StartTime, r.ActualDuration, r.ActualDuration/20)
	s := &sample{rps: r.ActualQPS, units: h.Count, hasLatency: true}
	for _, pc := range h.Percentiles {
		v := pc.Value * 1e6
		switch pc.Percentile {
		case 50:
			s.p50 = v
		case 90:
			s.p90 = v
		case 99:
			s.p99 = v
		case 99.9:
			s.p999 = v
		}
	}
	return s, nil
}
