package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/meshsplice/meshsplice/bench"
)

func runBench(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	exe, _ := os.Executable()
	binDir := fs.String("bin-dir", filepath.Dir(exe), "directory holding mstest and fortio (make bench builds them into bin/)")
	quick := fs.Bool("quick", false, "reduced matrix and short runs, under a minute (smoke checks)")
	reps := fs.Int("reps", 0, "repetitions of every cell and mode (default 3, --quick 2)")
	warmup := fs.Duration("warmup", 0, "unmeasured start of every tcp run (default 150ms, --quick 100ms)")
	window := fs.Duration("window", 0, "measured part of a fixed-rate (latency) run (default 1s, --quick 300ms)")
	tputWindow := fs.Duration("throughput-window", 0, "measured part of an as-fast-as-possible run (default 400ms, --quick 250ms)")
	pin := fs.String("pin", string(bench.PinOne), "CPU placement: one (every pod process on CPU 0, the benchmark on CPU 1), split (apps on CPU 0, sidecars on CPU 1), none")
	nice := fs.Int("nice", -20, "nice value of the benchmark and its pods (-20: other programs of a shared machine barely delay them; 0: normal)")
	retries := fs.Int("retries", 0, "repeat a run up to this many times when other processes used more than 5% of a CPU during it")
	topos := fs.String("topologies", "", "comma-separated subset of in-pod,same-node,two-nodes")
	workloads := fs.String("workloads", "", "comma-separated subset of tcp-rr,http,stream,connect")
	modes := fs.String("modes", "", "comma-separated subset of direct,iptables,capture,meshsplice,meshsplice-full (ratios need direct and iptables)")
	asJSON := fs.Bool("json", false, "print the report as JSON on stdout (the table then goes to stderr)")
	svg := fs.String("svg", "", "write a chart of the latency percentiles per mode to this SVG file")
	md := fs.String("markdown", "", "write the table as Markdown to this file")
	fromJSON := fs.String("from-json", "", "measure nothing: render the report of an earlier --json run")
	cleanup := fs.Bool("cleanup", false, "measure nothing: remove what killed benchmark runs left (msbench-* namespaces, cgroups, pins)")
	verbose := fs.Bool("v", false, "log the datapath's work to stderr")
	limits := fs.Bool("limits", false, "measure instead the cost of a new connection with the topology's 2 pods and with --limits-pods registered, interleaved, and the BPF map memory (docs/limits.md); uses --reps (default 5), --warmup, --throughput-window (default 1s), --json")
	var soak soakFlag
	fs.Var(&soak, "soak", "run instead the soak: --soak (30m) or --soak=DURATION; new and long-lived connections while pods and the policy churn; prints errors, memory and map entries over time; --svg charts them, --json (docs/limits.md)")
	soakPods := fs.Int("soak-pods", 20, "meshed pods of --soak (2 carry the traffic, the others churn)")
	limitsPods := fs.Int("limits-pods", 1000, "registered pods of --limits' large point")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if *cleanup {
		if err := bench.Cleanup(); err != nil {
			return err
		}
		fmt.Fprintln(os.Stderr, "meshsplice bench: no msbench-* namespace, cgroup or pin left")
		return nil
	}
	if *limits {
		lo := bench.LimitsOptions{Pods: *limitsPods, Options: bench.Options{
			BinDir: *binDir, Reps: *reps, Warmup: *warmup, ThroughputWindow: *tputWindow, Pin: bench.Pin(*pin), Nice: nice,
			Retries: *retries, Progress: os.Stderr, InPlace: isTerminal(os.Stderr), Command: "meshsplice bench " + strings.Join(args, " "),
		}}
		if *verbose {
			lo.Log = slog.New(slog.NewTextHandler(os.Stderr, nil))
		}
		return runLimits(ctx, lo, *asJSON)
	}

	if soak.d > 0 {
		so := bench.SoakOptions{Duration: soak.d, Pods: *soakPods, Options: bench.Options{
			BinDir: *binDir, Pin: bench.Pin(*pin), Nice: nice, Progress: os.Stderr, Command: "meshsplice bench " + strings.Join(args, " "),
		}}
		if *verbose {
			so.Log = slog.New(slog.NewTextHandler(os.Stderr, nil))
		}
		return runSoak(ctx, so, *asJSON, *svg)
	}

	var rep *bench.Report
	if *fromJSON != "" {
		b, err := os.ReadFile(*fromJSON)
		if err != nil {
			return err
		}
		rep = &bench.Report{}
		if err := json.Unmarshal(b, rep); err != nil {
			return fmt.Errorf("read %s: %w", *fromJSON, err)
		}
		rep.Derive()
	} else {
		opts := bench.Options{
			BinDir: *binDir, Reps: *reps, Warmup: *warmup, LatencyWindow: *window, ThroughputWindow: *tputWindow,
			Pin: bench.Pin(*pin), Nice: nice, Retries: *retries, Progress: os.Stderr, InPlace: isTerminal(os.Stderr),
			Command: "meshsplice bench " + strings.Join(args, " "),
		}
		if *verbose {
			opts.Log = slog.New(slog.NewTextHandler(os.Stderr, nil))
		}
		if *quick {
			opts.Cells = bench.QuickMatrix()
			opts.Reps = orDefault(opts.Reps, 2)
			opts.Warmup = orDefaultDur(opts.Warmup, 100*time.Millisecond)
			opts.LatencyWindow = orDefaultDur(opts.LatencyWindow, 300*time.Millisecond)
			opts.ThroughputWindow = orDefaultDur(opts.ThroughputWindow, 250*time.Millisecond)
		} else {
			opts.Cells = bench.FullMatrix()
			opts.Warmup = orDefaultDur(opts.Warmup, 150*time.Millisecond)
		}
		var err error
		if opts.Cells, err = filterCells(opts.Cells, *topos, *workloads); err != nil {
			return err
		}
		if len(opts.Cells) == 0 {
			return errors.New("--topologies and --workloads leave no cell to measure")
		}
		if opts.Modes, err = parseModes(*modes); err != nil {
			return err
		}
		if rep, err = bench.Run(ctx, opts); err != nil {
			return err
		}
	}

	table := io.Writer(os.Stdout)
	if *asJSON {
		table = os.Stderr
	}
	if err := rep.WriteTable(table); err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(rep); err != nil {
			return err
		}
	}
	if *svg != "" {
		if err := writeFile(*svg, rep.WriteSVG); err != nil {
			return err
		}
	}
	if *md != "" {
		if err := writeFile(*md, rep.WriteMarkdown); err != nil {
			return err
		}
	}
	return nil
}

// runLimits runs bench --limits and prints its table, or its JSON on stdout
// and the table on stderr.
func runLimits(ctx context.Context, opts bench.LimitsOptions, asJSON bool) error {
	rep, err := bench.Limits(ctx, opts)
	if err != nil {
		return err
	}
	table := io.Writer(os.Stdout)
	if asJSON {
		table = os.Stderr
	}
	if err := rep.WriteTable(table); err != nil || !asJSON {
		return err
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(rep)
}

// soakFlag is --soak: alone 30 minutes, or --soak=DURATION.
type soakFlag struct{ d time.Duration }

func (f *soakFlag) String() string   { return f.d.String() }
func (f *soakFlag) IsBoolFlag() bool { return true }
func (f *soakFlag) Set(v string) error {
	switch v {
	case "true":
		f.d = 30 * time.Minute
	case "false":
		f.d = 0
	default:
		d, err := time.ParseDuration(v)
		if err != nil || d <= 0 {
			return fmt.Errorf("want a positive duration such as 30m, got %q", v)
		}
		f.d = d
	}
	return nil
}

// runSoak runs bench --soak and prints its summary, or its JSON on stdout
// and the summary on stderr; svg, when set, receives the chart. A soak with
// errors or maps not back to their baseline fails.
func runSoak(ctx context.Context, opts bench.SoakOptions, asJSON bool, svg string) error {
	rep, err := bench.Soak(ctx, opts)
	if err != nil {
		return err
	}
	table := io.Writer(os.Stdout)
	if asJSON {
		table = os.Stderr
	}
	if err := rep.WriteTable(table); err != nil {
		return err
	}
	if asJSON {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(rep); err != nil {
			return err
		}
	}
	if svg != "" {
		if err := writeFile(svg, rep.WriteSVG); err != nil {
			return err
		}
	}
	if len(rep.Errors) > 0 || len(rep.NotBack) > 0 {
		return fmt.Errorf("soak: %d errors, %d maps not back to their baseline", len(rep.Errors), len(rep.NotBack))
	}
	return nil
}

func orDefault(v, d int) int {
	if v > 0 {
		return v
	}
	return d
}

func orDefaultDur(v, d time.Duration) time.Duration {
	if v > 0 {
		return v
	}
	return d
}

// filterCells keeps the cells of the listed topologies and workloads (all
// when a list is empty).
func filterCells(cells []bench.Cell, topos, workloads string) ([]bench.Cell, error) {
	wantTopo, err := parseList(topos, "topology", func(t string) bool {
		return slices.Contains(bench.Topologies, bench.Topology(t))
	})
	if err != nil {
		return nil, err
	}
	wantWork, err := parseList(workloads, "workload", func(w string) bool {
		return slices.Contains([]bench.Workload{bench.TCPRR, bench.HTTP, bench.Stream, bench.Connect}, bench.Workload(w))
	})
	if err != nil {
		return nil, err
	}
	var out []bench.Cell
	for _, c := range cells {
		if (wantTopo == nil || wantTopo[string(c.Topology)]) && (wantWork == nil || wantWork[string(c.Workload)]) {
			out = append(out, c)
		}
	}
	return out, nil
}

// parseList splits a comma-separated list and checks every item; nil means
// no list was given.
func parseList(list, what string, known func(string) bool) (map[string]bool, error) {
	if list == "" {
		return nil, nil
	}
	want := map[string]bool{}
	for _, item := range strings.Split(list, ",") {
		item = strings.TrimSpace(item)
		if !known(item) {
			return nil, fmt.Errorf("unknown %s %q", what, item)
		}
		want[item] = true
	}
	return want, nil
}

func parseModes(list string) ([]bench.Mode, error) {
	if list == "" {
		return nil, nil
	}
	want, err := parseList(list, "mode", func(m string) bool { return slices.Contains(bench.Modes, bench.Mode(m)) })
	if err != nil {
		return nil, err
	}
	var out []bench.Mode
	for _, m := range bench.Modes {
		if want[string(m)] {
			out = append(out, m)
		}
	}
	return out, nil
}

func writeFile(path string, write func(io.Writer) error) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if err := write(f); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", path, err)
	}
	return f.Close()
}

func isTerminal(f *os.File) bool {
	_, err := unix.IoctlGetTermios(int(f.Fd()), unix.TCGETS)
	return err == nil
}
