package bench_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meshsplice/meshsplice/bench"
	"github.com/meshsplice/meshsplice/internal/cgroups"
	"github.com/meshsplice/meshsplice/internal/lab"
	"github.com/meshsplice/meshsplice/internal/testnet"
)

// binDir builds mstest and fortio (from tools/fortio, its own module) into
// one directory.
func binDir(t *testing.T) string {
	t.Helper()
	mstest := testnet.BuildBinary(t, "github.com/meshsplice/meshsplice/e2e/mstest")
	dir := filepath.Dir(mstest)
	cmd := exec.Command("go", "build", "-C", "../tools/fortio", "-o", filepath.Join(dir, "fortio"), "fortio.org/fortio")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build fortio: %v\n%s", err, out)
	}
	return dir
}

// smokeCells: every workload on the same-node path, and the request/response
// cell on the other topologies. Rates and windows give a few hundred
// requests per mode.
var smokeCells = []bench.Cell{
	{Topology: bench.InPod, Workload: bench.TCPRR, Size: 64, Conns: 1, Rate: 2000},
	{Topology: bench.SameNode, Workload: bench.TCPRR, Size: 64, Conns: 1, Rate: 2000},
	{Topology: bench.SameNode, Workload: bench.TCPRR, Size: 64, Conns: 1},
	{Topology: bench.SameNode, Workload: bench.HTTP, Size: 1024, Conns: 2, Rate: 2000},
	{Topology: bench.SameNode, Workload: bench.Stream, Size: 64 << 10, Conns: 1},
	{Topology: bench.SameNode, Workload: bench.Connect, Size: 64, Conns: 2},
	{Topology: bench.TwoNodes, Workload: bench.TCPRR, Size: 64, Conns: 1, Rate: 2000},
}

// TestBenchSmoke runs every mode of a small matrix once and checks, from
// the pods themselves, that the modes really take different paths, that
// the JSON report has every field, and that nothing is left behind. It
// asserts nothing about timing.
func TestBenchSmoke(t *testing.T) {
	testnet.RequireRoot(t)
	dir := binDir(t)
	var mu sync.Mutex
	var prefixes []string
	seen := map[string]bool{}
	inspect := func(in bench.Inspection) error {
		mu.Lock()
		if !slices.Contains(prefixes, in.Prefix) {
			prefixes = append(prefixes, in.Prefix)
		}
		seen[string(in.Cell.Topology)+"/"+in.Cell.Label()+"/"+string(in.Mode)] = true
		mu.Unlock()
		return checkPath(in)
	}
	rep, err := bench.Run(context.Background(), bench.Options{
		BinDir: dir, Cells: smokeCells, Reps: 1,
		Warmup: 20 * time.Millisecond, LatencyWindow: 150 * time.Millisecond, ThroughputWindow: 100 * time.Millisecond,
		Inspect: inspect,
	})
	for _, p := range prefixes {
		if left, lerr := lab.Leftovers(p); lerr != nil || len(left) > 0 {
			t.Errorf("left behind by %s: %v %v", p, left, lerr)
		}
	}
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range smokeCells {
		for _, m := range bench.Modes {
			if !seen[string(c.Topology)+"/"+c.Label()+"/"+string(m)] {
				t.Errorf("%s %s did not run in mode %s", c.Topology, c.Label(), m)
			}
		}
	}
	if len(rep.Rows) != len(smokeCells)*len(bench.Modes) {
		t.Errorf("report has %d rows, want %d", len(rep.Rows), len(smokeCells)*len(bench.Modes))
	}
	checkJSON(t, rep)
}

// checkPath looks at the pods after a run: Istio's rules must exist in the
// meshed pods in the iptables mode and nowhere else; meshsplice's capture
// counters must move only in its modes, its splice counters only where
// something can be spliced; the datapath must sit on a cgroup of the
// benchmark, never the machine's root cgroup.
func checkPath(in bench.Inspection) error {
	var problems []string
	for _, ns := range in.Netns {
		out, err := exec.Command("nsenter", "--net="+ns, "--", "iptables-save").CombinedOutput()
		if err != nil {
			return fmt.Errorf("iptables-save in %s: %w: %s", ns, err, out)
		}
		istio := strings.Count(string(out), "-A ISTIO_OUTPUT")
		switch meshed := slices.Contains(in.MeshedNetns, ns); {
		case in.Mode == bench.Iptables && meshed && istio == 0:
			problems = append(problems, "no Istio rules in meshed pod "+ns)
		case (in.Mode != bench.Iptables || !meshed) && strings.Contains(string(out), "ISTIO"):
			problems = append(problems, "Istio rules in "+ns)
		}
	}
	ev := in.Evidence
	captureModes := in.Mode == bench.Capture || in.Mode == bench.Meshsplice || in.Mode == bench.MeshspliceFull
	if captureModes != (ev.ConnectCaptured > 0) {
		problems = append(problems, fmt.Sprintf("connect.captured = %d", ev.ConnectCaptured))
	}
	spliceable := in.Mode == bench.MeshspliceFull || (in.Mode == bench.Meshsplice && in.Cell.Topology == bench.SameNode)
	if spliceable != (ev.MsgsRedirected > 0) {
		problems = append(problems, fmt.Sprintf("sk_msg.redirected = %d", ev.MsgsRedirected))
	}
	if (in.Mode == bench.Iptables) != (ev.OrigDstConntrack > 0) {
		problems = append(problems, fmt.Sprintf("SO_ORIGINAL_DST from conntrack = %d", ev.OrigDstConntrack))
	}
	root, err := cgroups.Mount()
	if err != nil {
		return err
	}
	for _, cg := range in.Cgroups {
		if rel, err := filepath.Rel(root, cg); err != nil || rel == "." || !strings.HasPrefix(rel, bench.Prefix+"-") {
			problems = append(problems, "datapath attached to "+cg)
		}
	}
	if len(problems) > 0 {
		return errors.New(strings.Join(problems, "; "))
	}
	return nil
}

// checkJSON checks that every row of the JSON report has the fields the
// issue asks for, with values where they apply.
func checkJSON(t *testing.T, rep *bench.Report) {
	t.Helper()
	b, err := json.Marshal(rep)
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		Rows    []map[string]any `json:"rows"`
		Machine map[string]any   `json:"machine"`
		Targets []map[string]any `json:"targets"`
	}
	if err := json.Unmarshal(b, &doc); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"cpu_model", "kernel", "go"} {
		if v, _ := doc.Machine[k].(string); v == "" {
			t.Errorf("machine.%s is empty", k)
		}
	}
	if len(doc.Targets) == 0 {
		t.Error("no targets checked")
	}
	for _, r := range doc.Rows {
		name := fmt.Sprintf("%v %v %v", r["topology"], r["label"], r["mode"])
		for _, k := range []string{"topology", "workload", "mode", "p50_us", "p90_us", "p99_us", "p999_us", "rps", "ratio_vs_iptables", "cpu_us_per_req", "evidence"} {
			if _, ok := r[k]; !ok {
				t.Errorf("%s: no %q", name, k)
			}
		}
		if rps, _ := r["rps"].(float64); rps <= 0 {
			t.Errorf("%s: rps %v", name, r["rps"])
		}
		// CPU time per request is measured, never 0; only fortio's
		// (http) may be unknown (null), when the readings could not be
		// taken at its window's edges.
		if cpu, ok := r["cpu_us_per_req"].(float64); ok && cpu <= 0 || !ok && (r["cpu_us_per_req"] != nil || r["workload"] != string(bench.HTTP)) {
			t.Errorf("%s: cpu_us_per_req %v", name, r["cpu_us_per_req"])
		}
		if r["workload"] != string(bench.Stream) {
			for _, k := range []string{"p50_us", "p90_us", "p99_us", "p999_us"} {
				if v, _ := r[k].(float64); v <= 0 {
					t.Errorf("%s: %s = %v", name, k, r[k])
				}
			}
		}
		if r["mode"] == string(bench.Iptables) {
			if v, _ := r["ratio_vs_iptables"].(float64); v != 1 && !(r["kind"] == string(bench.Latency) && r["ratio_vs_iptables"] == nil) {
				t.Errorf("%s: ratio_vs_iptables = %v, want 1", name, r["ratio_vs_iptables"])
			}
		}
		if r["kind"] == string(bench.Throughput) && r["ratio_vs_iptables"] == nil {
			t.Errorf("%s: throughput row without ratio_vs_iptables", name)
		}
	}
}

// TestBenchCleansUpOnFailure aborts a run from inside (as an error or a
// Ctrl-C would) and checks that nothing is left.
func TestBenchCleansUpOnFailure(t *testing.T) {
	testnet.RequireRoot(t)
	dir := binDir(t)
	var prefix string
	stop := errors.New("stop here")
	_, err := bench.Run(context.Background(), bench.Options{
		BinDir: dir, Reps: 1, Modes: []bench.Mode{bench.Iptables, bench.Meshsplice},
		Cells:  []bench.Cell{{Topology: bench.SameNode, Workload: bench.TCPRR, Size: 64, Conns: 1, Rate: 2000}},
		Warmup: 10 * time.Millisecond, LatencyWindow: 50 * time.Millisecond,
		Inspect: func(in bench.Inspection) error {
			prefix = in.Prefix
			return stop // after the first run, with that mode's rules in place
		},
	})
	if !errors.Is(err, stop) {
		t.Fatalf("Run = %v, want the inspection's error", err)
	}
	if prefix == "" {
		t.Fatal("nothing ran")
	}
	left, err := lab.Leftovers(prefix)
	if err != nil || len(left) > 0 {
		t.Fatalf("left behind: %v %v", left, err)
	}
	if _, err := os.Stat(filepath.Join(lab.BPFFSRoot, prefix)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("pin dir: %v", err)
	}
}
