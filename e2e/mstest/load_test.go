package main

import (
	"bytes"
	"errors"
	"math"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/meshsplice/meshsplice/internal/lab"
	"github.com/meshsplice/meshsplice/internal/testnet"
)

func TestNewHistogram(t *testing.T) {
	h := newHistogram([]time.Duration{10 * time.Microsecond, 10 * time.Microsecond, time.Millisecond, 0})
	if h.Base != histBase {
		t.Fatalf("base %v", h.Base)
	}
	var n int64
	for i, b := range h.Buckets {
		n += b[1]
		if i > 0 && b[0] <= h.Buckets[i-1][0] {
			t.Fatalf("buckets not in increasing order: %v", h.Buckets)
		}
		// The bucket's lower bound is within 1% below every sample in it.
		lo := math.Pow(histBase, float64(b[0]))
		if lo > 1e6 || (lo < 1e4*0.99 && lo > 2) {
			t.Errorf("bucket %d starts at %v ns", b[0], lo)
		}
	}
	if n != 4 || len(h.Buckets) != 3 {
		t.Fatalf("buckets %v", h.Buckets)
	}
}

// TestLoadMode runs the client's load mode (request/response at a fixed
// rate and as fast as possible, stream to a sink, one connection per
// exchange) against servers in another pod, and checks the window events
// and the aggregate. Nothing is asserted about timing.
func TestLoadMode(t *testing.T) {
	testnet.RequireRoot(t)
	bin := testnet.BuildBinary(t, ".")
	bn := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	srv := bn.AddPod(t, "srv")
	cli := bn.AddPod(t, "cli")
	startServer(t, bin, testnet.StartOpts{NetNS: srv.NS}, "echo", "--port", "7101", "--quiet")
	startServer(t, bin, testnet.StartOpts{NetNS: srv.NS}, "sink", "--port", "7102", "--quiet")

	for _, tc := range []struct {
		name  string
		port  int
		args  []string
		shape string
	}{
		{"rr-rate", 7101, []string{"--conns", "4", "--size", "100", "--rate", "2000"}, "rr"},
		{"rr-max", 7101, []string{"--conns", "2", "--size", "16384"}, "rr"},
		{"stream", 7102, []string{"--size", "65536", "--stream"}, "stream"},
		{"reconnect", 7101, []string{"--conns", "2", "--size", "64", "--reconnect"}, "reconnect"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cg := testnet.NewCgroup(t)
			args := append([]string{bin, "client", "--target", target(srv.IPv4, tc.port), "--duration", "200ms", "--warmup", "50ms",
				"--cpu-stat", "client=" + cg.Path}, tc.args...)
			p := testnet.Start(t, testnet.StartOpts{NetNS: cli.NS, Name: "client", Args: args, Cgroup: cg})
			if err := p.WaitTimeout(30 * time.Second); err != nil {
				t.Fatal(err)
			}
			var phases []string
			var agg testnet.Event
			var cpuUS []float64 // the client cgroup's CPU time at each mark
			for _, ev := range p.Events() {
				switch ev.Str("event") {
				case "window":
					phases = append(phases, ev.Str("phase"))
					cpu, _ := ev["cpu"].(map[string]any)
					client, _ := cpu["client"].(map[string]any)
					total, _ := client["total_us"].(float64)
					cpuUS = append(cpuUS, total)
				case "aggregate":
					agg = ev
				case "result":
					if !ev.Bool("ok") {
						t.Errorf("result: %v", ev)
					}
				}
			}
			if len(phases) != 2 || phases[0] != "start" || phases[1] != "end" {
				t.Fatalf("window events %v, want start then end", phases)
			}
			// The client read its cgroup at both marks, and worked in
			// between.
			if cpuUS[0] <= 0 || cpuUS[1] <= cpuUS[0] {
				t.Errorf("client CPU time at the window's start and end: %v us", cpuUS)
			}
			if agg == nil || !agg.Bool("ok") || agg.Str("shape") != tc.shape || agg.Int("messages") <= 0 || agg["rps"].(float64) <= 0 {
				t.Fatalf("aggregate %v", agg)
			}
			if tc.shape == "stream" {
				if agg["p50_us"].(float64) != 0 || agg["bytes_per_s"].(float64) <= 0 {
					t.Errorf("stream aggregate %v", agg)
				}
				return
			}
			p50, p99, p999 := agg["p50_us"].(float64), agg["p99_us"].(float64), agg["p999_us"].(float64)
			if p50 <= 0 || p99 < p50 || p999 < p99 {
				t.Errorf("percentiles p50 %v p99 %v p99.9 %v", p50, p99, p999)
			}
			if tc.name == "rr-rate" && agg.Int("messages") > 2000*2 {
				t.Errorf("%d exchanges in a 200ms window at 2000/s", agg.Int("messages"))
			}
		})
	}
}

// TestWindowCommand runs a program under mstest window: its standard output
// passes through, its window lines are each followed by a window event
// with the cgroup's CPU time, and its exit status is kept.
func TestWindowCommand(t *testing.T) {
	testnet.RequireRoot(t)
	bin := testnet.BuildBinary(t, ".")
	cg := testnet.NewCgroup(t)
	cmd := exec.Command(bin, "window", "--cpu-stat", "app="+cg.Path, "--start", "Starting at ", "--end", "Ended after ", "--",
		"sh", "-c", `echo '{"result":1}'; echo 'Starting at 10 qps' >&2; echo work >&2; echo 'Starting at again' >&2; echo 'Ended after 1s' >&2; exit 3`)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	cmd.SysProcAttr = cg.SysProcAttr()
	err := cmd.Run()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 3 {
		t.Fatalf("exit: %v, want status 3; stderr:\n%s", err, stderr.String())
	}
	if stdout.String() != "{\"result\":1}\n" {
		t.Errorf("stdout %q", stdout.String())
	}
	lines := strings.Split(strings.TrimSuffix(stderr.String(), "\n"), "\n")
	var shape []string
	var cpuUS []float64
	for _, l := range lines {
		ev, ok := lab.ParseEvent(l)
		if !ok {
			shape = append(shape, l)
			continue
		}
		shape = append(shape, ev.Str("event")+" "+ev.Str("phase"))
		cpu, _ := ev["cpu"].(map[string]any)
		app, _ := cpu["app"].(map[string]any)
		total, _ := app["total_us"].(float64)
		cpuUS = append(cpuUS, total)
	}
	want := []string{"Starting at 10 qps", "window start", "work", "Starting at again", "Ended after 1s", "window end"}
	if !slices.Equal(shape, want) {
		t.Fatalf("stderr:\n%s\nwant the lines %q", stderr.String(), want)
	}
	if cpuUS[0] <= 0 || cpuUS[1] < cpuUS[0] {
		t.Errorf("CPU time at the marks: %v us", cpuUS)
	}
}
