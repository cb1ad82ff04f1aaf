package bench

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/meshsplice/meshsplice/baseline"
	"github.com/meshsplice/meshsplice/internal/lab"
)

// Prefix starts the name of everything the benchmark creates.
const Prefix = "msbench"

// Pin is how processes are placed on CPUs.
type Pin string

// The pinnings.
const (
	// PinOne runs every pod process on CPU 0 and the benchmark itself on
	// CPU 1: no request ever waits for a wake-up on another CPU, so the
	// numbers are the CPU work of the path (the default).
	PinOne Pin = "one"
	// PinSplit runs apps on CPU 0 and sidecars on CPU 1: every proxy hop
	// crosses CPUs, as when Envoy has cores of its own.
	PinSplit Pin = "split"
	// PinNone leaves placement to the scheduler (runs swing 2-4x).
	PinNone Pin = "none"
)

// Options configure Run.
type Options struct {
	// BinDir holds mstest and fortio (make bench builds them into bin/).
	BinDir string
	// Cells is the matrix; empty means FullMatrix.
	Cells []Cell
	// Modes to compare; empty means every mode. Ratios need direct and
	// iptables.
	Modes []Mode
	// Reps is the number of repetitions of every cell and mode.
	Reps int
	// Warmup is the unmeasured start of every run (mstest client).
	Warmup time.Duration
	// LatencyWindow and ThroughputWindow are the measured part of a
	// latency (fixed-rate) run and of a throughput run.
	LatencyWindow, ThroughputWindow time.Duration
	// Pin places the processes on CPUs.
	Pin Pin
	// Nice is the scheduling priority of the benchmark and, inherited, of
	// every pod process (default -20, the highest): on a shared machine
	// other programs then barely delay the pods; on a quiet one it changes
	// nothing. Set it to 0 to run at normal priority.
	Nice *int
	// Retries is how often a run is repeated when other processes of the
	// machine used more than 5% of a CPU during its window, or when its
	// CPU time is unknown (the least disturbed attempt is kept; every row
	// reports the disturbance).
	Retries int
	// Progress receives a line per run; InPlace rewrites one terminal
	// line instead.
	Progress io.Writer
	InPlace  bool
	// Log receives the datapath's and the lab's log; nil discards.
	Log *slog.Logger
	// Command is recorded in the report.
	Command string
	// Inspect, when set, is called after every measured run, while its
	// mode is still in place; an error aborts the benchmark. Tests use it
	// to look at the pods themselves.
	Inspect func(Inspection) error
}

// Inspection describes a run that just ended, for Options.Inspect.
type Inspection struct {
	Cell Cell
	Mode Mode
	// MeshedNetns are the namespace paths of the pods with a sidecar;
	// Netns every pod's.
	MeshedNetns, Netns []string
	// Cgroups are the cgroups the datapaths are attached to, one per node.
	Cgroups []string
	// Evidence is what the benchmark itself found.
	Evidence Evidence
	// Prefix starts the names of everything this topology created.
	Prefix string
}

func (o *Options) bin(name string) string { return filepath.Join(o.BinDir, name) }

func (o *Options) setDefaults() {
	if len(o.Cells) == 0 {
		o.Cells = FullMatrix()
	}
	if len(o.Modes) == 0 {
		o.Modes = Modes
	}
	if o.Reps <= 0 {
		o.Reps = 3
	}
	if o.Warmup < 0 {
		o.Warmup = 0
	}
	if o.LatencyWindow <= 0 {
		o.LatencyWindow = time.Second
	}
	if o.ThroughputWindow <= 0 {
		o.ThroughputWindow = 400 * time.Millisecond
	}
	if o.Pin == "" {
		o.Pin = PinOne
	}
	if o.Nice == nil {
		n := -20
		o.Nice = &n
	}
	if o.Progress == nil {
		o.Progress = io.Discard
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
}

// Run builds every topology of the matrix in turn, measures each of its
// cells in every mode, and tears it down; it returns the report. Everything
// it creates is removed, also when it fails or ctx ends.
func Run(ctx context.Context, opts Options) (_ *Report, err error) {
	opts.setDefaults()
	// The programs run with / as working directory.
	if opts.BinDir, err = filepath.Abs(opts.BinDir); err != nil {
		return nil, err
	}
	if err := preflight(&opts); err != nil {
		return nil, err
	}
	rep := &Report{Command: opts.Command, Started: time.Now().UTC().Truncate(time.Second), Machine: machine(), SlowerThanIptables: []string{}, Resources: []string{}, Hops: []Hop{}}
	rep.Method = method(&opts)
	restore, err := placeSelf(&opts)
	if err != nil {
		return nil, err
	}
	defer restore()
	p := &progress{w: opts.Progress, inPlace: opts.InPlace, total: len(opts.Cells) * opts.Reps * len(opts.Modes)}
	for _, group := range byTopology(opts.Cells) {
		rs, err := runTopology(ctx, &opts, group, p, &rep.Resources)
		if err != nil {
			p.done()
			return nil, err
		}
		rep.Rows = append(rep.Rows, rs...)
	}
	p.done()
	rep.Seconds = time.Since(rep.Started).Round(time.Second).Seconds()
	rep.Derive()
	return rep, nil
}

// placeSelf pins the benchmark to CPU 1 (--pin one) and sets its nice
// value; restore undoes both.
func placeSelf(opts *Options) (restore func(), err error) {
	var undo []func()
	restore = func() {
		for _, u := range slices.Backward(undo) {
			u()
		}
	}
	if opts.Pin == PinOne && runtime.NumCPU() > 1 {
		r, err := pinSelf(1)
		if err != nil {
			return nil, err
		}
		undo = append(undo, r)
	}
	if *opts.Nice != 0 {
		r, err := niceSelf(*opts.Nice)
		if err != nil {
			restore()
			return nil, err
		}
		undo = append(undo, r)
	}
	return restore, nil
}

// Derive computes what the report derives from its rows: the targets, the
// per-hop breakdown and the list of cells where a meshsplice mode did worse
// than iptables. Run calls it; call it again on a report read back from
// JSON to re-derive with this version's rules.
func (rep *Report) Derive() {
	rep.Targets = checkTargets(rep.Rows)
	rep.Hops = hops(rep.Rows)
	rep.SlowerThanIptables = []string{}
	for _, r := range rep.Rows {
		if r.SlowerThanIptables && (r.Mode == Meshsplice || r.Mode == MeshspliceFull) {
			noise := "beyond noise"
			if !r.SlowerBeyondNoise {
				noise = "within noise"
			}
			rep.SlowerThanIptables = append(rep.SlowerThanIptables, fmt.Sprintf("%s %s %s: +%.0f%% (%s)", r.Topology, r.Label, r.Mode, r.SlowerByPct, noise))
		}
	}
}

// runTopology builds one topology, measures its cells and removes it.
func runTopology(ctx context.Context, opts *Options, cells []Cell, p *progress, labs *[]string) (_ []Row, err error) {
	topo := cells[0].Topology
	l, err := lab.New(Prefix, opts.Log)
	if err != nil {
		return nil, err
	}
	e := &env{opts: opts, topo: topo, lab: l}
	*labs = append(*labs, l.Prefix)
	defer func() {
		if cerr := e.close(); cerr != nil {
			err = errors.Join(err, fmt.Errorf("clean up %s: %w", topo, cerr))
		}
	}()
	p.note("building %s (%s)", topo, l.Prefix)
	if err := e.build(ctx); err != nil {
		return nil, fmt.Errorf("build %s: %w", topo, err)
	}
	// Warm-up: every mode once, discarded (page cache, conntrack, code
	// paths); it also proves every mode works before the long part.
	warm := Cell{Topology: topo, Workload: TCPRR, Size: 64, Conns: 1}
	for _, m := range opts.Modes {
		p.note("warm-up %s mode=%s", topo, m)
		if err := e.setMode(m); err != nil {
			return nil, err
		}
		if _, err := e.run(ctx, warm, 50*time.Millisecond, 200*time.Millisecond); err != nil {
			return nil, fmt.Errorf("warm-up: %w", err)
		}
	}
	samples := make([]map[Mode][]*sample, len(cells))
	for ci, c := range cells {
		samples[ci] = map[Mode][]*sample{}
		window := opts.ThroughputWindow
		if c.Kind() == Latency {
			window = opts.LatencyWindow
		}
		for rep := range opts.Reps {
			for _, m := range rotate(opts.Modes, ci+rep) {
				if err := ctx.Err(); err != nil {
					return nil, err
				}
				p.start("%s %s mode=%s rep=%d", topo, c.Label(), m, rep+1)
				if err := e.setMode(m); err != nil {
					return nil, err
				}
				s, err := e.runUndisturbed(ctx, c, window, p)
				if err != nil {
					return nil, err
				}
				samples[ci][m] = append(samples[ci][m], s)
				p.finish(s)
				if opts.Inspect != nil {
					if err := opts.Inspect(e.inspection(c, s)); err != nil {
						return nil, fmt.Errorf("inspect %s %s mode=%s: %w", topo, c.Label(), m, err)
					}
				}
			}
		}
	}
	var out []Row
	for ci, c := range cells {
		res := map[Mode]result{}
		for m, ss := range samples[ci] {
			res[m] = combine(ss)
		}
		out = append(out, rows(c, res)...)
	}
	return out, nil
}

// runUndisturbed runs c, again when other processes used more than 5% of a
// CPU during the window (a shared machine) or when the run's CPU time is
// unknown, up to Options.Retries times; it keeps the least disturbed run
// (one whose CPU time is known first), whose disturbance the report shows.
func (e *env) runUndisturbed(ctx context.Context, c Cell, window time.Duration, p *progress) (*sample, error) {
	var best *sample
	attempts := 1 + e.opts.Retries
	for i := range attempts {
		s, err := e.run(ctx, c, e.opts.Warmup, window)
		if err != nil {
			return nil, err
		}
		if best == nil || better(s, best) {
			best = s
		}
		if !s.disturbed() && s.cpuUnknown == "" {
			break
		}
		next := map[bool]string{true: "keeping the least disturbed attempt", false: "again"}[i == attempts-1]
		if s.cpuUnknown != "" {
			p.note("CPU time unknown (%s): %s", s.cpuUnknown, next)
		} else {
			p.note("other processes used %.0f%% of a CPU during the run: %s", s.foreignPct, next)
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(time.Duration(i+1) * 500 * time.Millisecond):
		}
	}
	return best, nil
}

// better tells whether run a is worth more than run b: a known CPU time
// first, then less disturbance.
func better(a, b *sample) bool {
	if (a.cpuUnknown == "") != (b.cpuUnknown == "") {
		return a.cpuUnknown == ""
	}
	return a.foreign < b.foreign
}

func preflight(o *Options) error {
	if os.Geteuid() != 0 {
		return errors.New("the benchmark needs root: it creates network namespaces, cgroups and BPF programs")
	}
	needFortio := false
	for _, c := range o.Cells {
		needFortio = needFortio || c.Workload == HTTP
	}
	bins := []string{"mstest"}
	if needFortio {
		bins = append(bins, "fortio")
	}
	for _, b := range bins {
		if _, err := os.Stat(o.bin(b)); err != nil {
			return fmt.Errorf("missing %s: run `make bench`, which builds it (%w)", o.bin(b), err)
		}
	}
	for _, tool := range []string{"nsenter", "taskset", "iptables-save", "iptables-nft-restore", "iptables-nft-save"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("missing %s: hack/deps.sh bench (which make bench runs) installs it", tool)
		}
	}
	if o.Pin == PinSplit && runtime.NumCPU() < 2 {
		return errors.New("--pin split needs two CPUs")
	}
	switch o.Pin {
	case PinOne, PinSplit, PinNone:
	default:
		return fmt.Errorf("unknown pinning %q (one, split, none)", o.Pin)
	}
	return nil
}

func machine() Machine {
	m := Machine{CPUs: runtime.NumCPU(), Go: runtime.Version()}
	if f, err := os.Open("/proc/cpuinfo"); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if k, v, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPUModel = strings.TrimSpace(v)
				break
			}
		}
		f.Close()
	}
	var uts unix.Utsname
	if unix.Uname(&uts) == nil {
		m.Kernel = unix.ByteSliceToString(uts.Sysname[:]) + " " + unix.ByteSliceToString(uts.Release[:])
	}
	return m
}

func method(o *Options) Method {
	pin := map[Pin]string{
		PinOne:   "every pod process (apps, sidecars, servers, load generators) pinned to CPU 0 with taskset, the benchmark driver on CPU 1",
		PinSplit: "apps and load generators on CPU 0, sidecars on CPU 1",
		PinNone:  "no pinning",
	}[o.Pin]
	if *o.Nice != 0 {
		pin += fmt.Sprintf("; every process at nice %d", *o.Nice)
	}
	return Method{
		Reps: o.Reps, WarmupMS: ms(o.Warmup), LatencyWindowMS: ms(o.LatencyWindow), ThroughputWindowMS: ms(o.ThroughputWindow),
		Pinning: pin, Modes: o.Modes,
		IstioVersion: baseline.IstioVersion,
		IstioRules:   "istio-iptables -p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x '' -b '*' -d 15090,15021,15020 (package baseline)",
		Fortio:       "fortio 1.68.2: fortio load -qps RATE -c CONNS -t WINDOW -r 0.00001 -payload-size 1024 -uniform against fortio server's /echo, under mstest window (reads the CPU times at fortio's start and end lines)",
		Sidecar:      "mstest sidecar: a small Go proxy following Envoy's interception contract (uid 1337, 15001/15006, SO_ORIGINAL_DST, inbound from 127.0.0.6), not Envoy",
		Order:        "per cell: repetitions in turn, each running every mode once, round-robin, the starting mode rotated per repetition and cell; one discarded warm-up run per mode per topology",
		Statistics:   "tcp-rr/connect latency: percentiles of the pooled samples of all repetitions (1% log buckets); http latency: median over repetitions of fortio's percentiles; rps and CPU time: medians over repetitions; CPU time is the role cgroups' cpu.stat read by the load generator's side at the window's edges (a repetition whose readings missed the edges by over 5% of the window is unknown and left out; all unknown: null)",
	}
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// pinSelf moves every thread of this process to cpu, so the benchmark's
// own work stays off the pods' CPU; new threads inherit it. restore
// undoes it.
func pinSelf(cpu int) (restore func(), err error) {
	var orig unix.CPUSet
	if err := unix.SchedGetaffinity(0, &orig); err != nil {
		return nil, fmt.Errorf("read CPU affinity: %w", err)
	}
	var set unix.CPUSet
	set.Set(cpu)
	apply := func(s *unix.CPUSet) error {
		return forThreads(func(tid int) error { return unix.SchedSetaffinity(tid, s) })
	}
	if err := apply(&set); err != nil {
		apply(&orig)
		return nil, fmt.Errorf("set CPU affinity: %w", err)
	}
	return func() { apply(&orig) }, nil
}

// forThreads applies fn to every thread of this process; new threads
// inherit the creating thread's affinity and priority.
func forThreads(fn func(tid int) error) error {
	tasks, err := os.ReadDir("/proc/self/task")
	if err != nil {
		return err
	}
	for _, t := range tasks {
		tid, err := strconv.Atoi(t.Name())
		if err != nil {
			continue
		}
		if err := fn(tid); err != nil && !errors.Is(err, unix.ESRCH) {
			return fmt.Errorf("thread %d: %w", tid, err)
		}
	}
	return nil
}

// niceSelf sets the nice value of every thread of this process (and so of
// the processes it starts); restore goes back to the previous one.
func niceSelf(nice int) (restore func(), err error) {
	// getpriority(2) returns 20 - nice.
	prev, err := unix.Getpriority(unix.PRIO_PROCESS, 0)
	if err != nil {
		return nil, fmt.Errorf("read priority: %w", err)
	}
	set := func(n int) error {
		return forThreads(func(tid int) error { return unix.Setpriority(unix.PRIO_PROCESS, tid, n) })
	}
	if err := set(nice); err != nil {
		set(20 - prev)
		return nil, fmt.Errorf("set nice %d: %w", nice, err)
	}
	return func() { set(20 - prev) }, nil
}

// progress prints what runs.
type progress struct {
	w       io.Writer
	inPlace bool
	total   int
	n       int
	line    string
}

func (p *progress) note(format string, args ...any) {
	p.clear()
	fmt.Fprintf(p.w, format+"\n", args...)
}

func (p *progress) start(format string, args ...any) {
	p.n++
	p.line = fmt.Sprintf("[%d/%d] ", p.n, p.total) + fmt.Sprintf(format, args...)
	if p.inPlace {
		fmt.Fprintf(p.w, "\r\033[K%s ...", p.line)
	}
}

func (p *progress) finish(s *sample) {
	res := fmt.Sprintf("%.0f req/s", s.rps)
	if s.hasLatency {
		res = fmt.Sprintf("p50 %.1fus p99 %.1fus %s", s.p50, s.p99, res)
	}
	if s.foreignPct >= 1 {
		res += fmt.Sprintf(" (other processes used %.0f%% of a CPU)", s.foreignPct)
	}
	if p.inPlace {
		fmt.Fprintf(p.w, "\r\033[K%s  %s", p.line, res)
		return
	}
	fmt.Fprintf(p.w, "%s  %s\n", p.line, res)
}

func (p *progress) clear() {
	if p.inPlace && p.line != "" {
		fmt.Fprint(p.w, "\r\033[K")
		p.line = ""
	}
}

func (p *progress) done() {
	if p.inPlace && p.line != "" {
		fmt.Fprintln(p.w)
		p.line = ""
	}
}

// Cleanup removes what benchmarks killed before they could clean up
// (every msbench-* namespace, cgroup and pin directory). Do not run it
// while a benchmark runs.
func Cleanup() error {
	return lab.RemoveLeftovers(Prefix+"-", func(dir string) error {
		err := detachAll(dir)
		return errors.Join(err, os.RemoveAll(dir))
	})
}
