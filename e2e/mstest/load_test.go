package main

import (
	"math"
	"testing"
	"time"

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
			args := append([]string{bin, "client", "--target", target(srv.IPv4, tc.port), "--duration", "200ms", "--warmup", "50ms"}, tc.args...)
			p := testnet.Start(t, testnet.StartOpts{NetNS: cli.NS, Name: "client", Args: args})
			if err := p.WaitTimeout(30 * time.Second); err != nil {
				t.Fatal(err)
			}
			var phases []string
			var agg testnet.Event
			for _, ev := range p.Events() {
				switch ev.Str("event") {
				case "window":
					phases = append(phases, ev.Str("phase"))
				case "aggregate":
					agg = ev
				case "result":
					if !ev.Bool("ok") {
						t.Errorf("result: %v", ev)
					}
				}
			}
			if len(phases) != 2 || phases[0] != "start" || phases[1] != "end" {
				t.Errorf("window events %v, want start then end", phases)
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
