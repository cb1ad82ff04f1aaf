package bench_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshsplice/meshsplice/bench"
	"github.com/meshsplice/meshsplice/internal/lab"
	"github.com/meshsplice/meshsplice/internal/testnet"
)

// TestLimitsSmoke runs the limits benchmark once at a small size: both pod
// counts are measured on the captured path, the map memory is read, and
// nothing is left behind. It asserts nothing about timing.
func TestLimitsSmoke(t *testing.T) {
	testnet.RequireRoot(t)
	dir := binDir(t)
	rep, err := bench.Limits(context.Background(), bench.LimitsOptions{
		Options: bench.Options{BinDir: dir, Reps: 1, Warmup: 20 * time.Millisecond, ThroughputWindow: 100 * time.Millisecond},
		Pods:    20,
	})
	if rep != nil {
		checkLeftovers(t, rep.Resources)
	}
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Points) != 2 {
		t.Fatalf("points = %+v, want one per pod count", rep.Points)
	}
	for _, p := range rep.Points {
		if p.Captured == 0 || p.ConnsPerS <= 0 {
			t.Errorf("%d pods: captured %d, %.0f conns/s: the connect path did not run", p.Pods, p.Captured, p.ConnsPerS)
		}
	}
	if rep.Small.Pods != 2 || rep.Large.Pods != 20 || rep.Large.PolicyIPs != 20 {
		t.Errorf("small %+v large %+v, want 2 and 20 pods, 20 policy addresses", rep.Small, rep.Large)
	}
	names := map[string]bool{}
	for _, m := range rep.Maps {
		names[m.Name] = true
	}
	for _, want := range []string{"ms_pods", "ms_socks", "ms_orig_dst", "ms_pol_ids"} {
		if !names[want] {
			t.Errorf("map %s missing from the memory report %+v", want, rep.Maps)
		}
	}
	if rep.MemlockBytes <= 0 {
		t.Errorf("memlock %d", rep.MemlockBytes)
	}
}

// checkLeftovers fails when a run left a namespace, cgroup or pin.
func checkLeftovers(t *testing.T, prefixes []string) {
	t.Helper()
	if len(prefixes) == 0 {
		t.Error("the run names nothing it created")
	}
	for _, p := range prefixes {
		if left, err := lab.Leftovers(p); err != nil || len(left) > 0 {
			t.Errorf("left behind by %s: %v %v", p, left, err)
		}
		if _, err := os.Stat(filepath.Join(lab.BPFFSRoot, p)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("pin dir of %s: %v", p, err)
		}
	}
}

// TestSoakSmoke runs the soak for a few seconds: traffic flows without an
// error while pods and the policy churn, samples are taken, every map is
// back to its baseline at the end, the chart renders, and nothing is left
// behind. It asserts nothing about timing.
func TestSoakSmoke(t *testing.T) {
	testnet.RequireRoot(t)
	dir := binDir(t)
	rep, err := bench.Soak(context.Background(), bench.SoakOptions{
		Options:  bench.Options{BinDir: dir},
		Duration: 8 * time.Second, Pods: 6, Churn: 200 * time.Millisecond, Sample: time.Second,
	})
	if rep != nil {
		checkLeftovers(t, rep.Resources)
	}
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Errors) > 0 {
		t.Errorf("errors: %q", rep.Errors)
	}
	if len(rep.NotBack) > 0 {
		t.Errorf("not back to baseline: %q", rep.NotBack)
	}
	if rep.NewConns == 0 || rep.LongLivedMessages == 0 || rep.PodChurns == 0 || rep.PolicyChurns == 0 || len(rep.Samples) < 2 {
		t.Errorf("new conns %d, long-lived exchanges %d, pod churns %d, policy churns %d, samples %d: something did not run",
			rep.NewConns, rep.LongLivedMessages, rep.PodChurns, rep.PolicyChurns, len(rep.Samples))
	}
	if rep.Baseline["ms_pods"] != 2 {
		t.Errorf("baseline %v: want the 2 traffic pods in ms_pods", rep.Baseline)
	}
	var svg strings.Builder
	if err := rep.WriteSVG(&svg); err != nil || !strings.Contains(svg.String(), "<polyline") {
		t.Errorf("svg: %v", err)
	}
}
