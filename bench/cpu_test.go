package bench_test

import (
	"context"
	"testing"
	"time"

	"github.com/meshsplice/meshsplice/bench"
	"github.com/meshsplice/meshsplice/internal/testnet"
)

// TestBenchCPUWithSlowBenchmark: on a loaded machine the benchmark process
// may handle a client's window marks long after the client printed them,
// here always later than the end of the window. CPU time per request must
// still be that of the window: never 0 (the readings taken together after
// the work), on the mstest client (connect) and on fortio (http).
func TestBenchCPUWithSlowBenchmark(t *testing.T) {
	testnet.RequireRoot(t)
	dir := binDir(t)
	bench.SetMarkDelay(t, 400*time.Millisecond)
	cells := []bench.Cell{
		{Topology: bench.SameNode, Workload: bench.Connect, Size: 64, Conns: 2},
		{Topology: bench.SameNode, Workload: bench.HTTP, Size: 1024, Conns: 2, Rate: 2000},
	}
	rep, err := bench.Run(context.Background(), bench.Options{
		BinDir: dir, Cells: cells, Reps: 1, Modes: []bench.Mode{bench.Direct, bench.Meshsplice},
		Warmup: 20 * time.Millisecond, LatencyWindow: 150 * time.Millisecond, ThroughputWindow: 100 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Rows) != 4 {
		t.Fatalf("%d rows, want 4", len(rep.Rows))
	}
	for _, r := range rep.Rows {
		if r.CPUUSPerReq == nil || *r.CPUUSPerReq <= 0 {
			t.Errorf("%s %s: cpu_us_per_req %v", r.Label, r.Mode, r.CPUUSPerReq)
		}
		for _, role := range []string{"client-app", "server-app"} {
			if c := r.CPUUSPerReqByRole[role]; c.Total <= 0 {
				t.Errorf("%s %s: %s cpu_us_per_req %v", r.Label, r.Mode, role, c.Total)
			}
		}
	}
}
