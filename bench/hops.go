package bench

import (
	"fmt"
	"io"
)

// Hop is one part of a request's cost on the same-node path, worked out
// from the differences between modes (64 B request/response, one
// connection): CPU time per request from the as-fast-as-possible cell (one
// CPU runs everything, so CPU time is the cost), p50 latency from the
// fixed-rate cell.
type Hop struct {
	Name    string `json:"name"`
	Formula string `json:"formula"`
	// CPUUS is CPU time per request, LatencyUS the p50 latency it
	// accounts for; null when the run lacks a mode the formula needs.
	CPUUS     *float64 `json:"cpu_us"`
	LatencyUS *float64 `json:"p50_latency_us"`
}

// hops computes the per-hop breakdown from the report's rows.
func hops(rs []Row) []Hop {
	find := func(t Topology, rate bool, m Mode) *Row {
		for i := range rs {
			r := &rs[i]
			if r.Topology == t && r.Workload == TCPRR && r.Size == 64 && r.Conns == 1 && (r.Rate > 0) == rate && r.Mode == m {
				return r
			}
		}
		return nil
	}
	cpu := func(t Topology, m Mode) (float64, bool) {
		if r := find(t, false, m); r != nil && r.CPUUSPerReq != nil {
			return *r.CPUUSPerReq, true
		}
		return 0, false
	}
	lat := func(t Topology, m Mode) (float64, bool) {
		if r := find(t, true, m); r != nil && r.P50US != nil {
			return *r.P50US, true
		}
		return 0, false
	}
	diff := func(get func(Topology, Mode) (float64, bool), t Topology, a, b Mode) *float64 {
		x, ok1 := get(t, a)
		y, ok2 := get(t, b)
		if !ok1 || !ok2 {
			return nil
		}
		return ptr(x - y)
	}
	abs := func(get func(Topology, Mode) (float64, bool), t Topology, a Mode) *float64 {
		if x, ok := get(t, a); ok {
			return ptr(x)
		}
		return nil
	}
	role := func(name string) *float64 {
		if r := find(SameNode, false, MeshspliceFull); r != nil {
			if c, ok := r.CPUUSPerReqByRole[name]; ok {
				return ptr(c.Total)
			}
		}
		return nil
	}
	out := []Hop{}
	add := func(name, formula string, cpu, lat *float64) {
		if cpu != nil || lat != nil {
			out = append(out, Hop{Name: name, Formula: formula, CPUUS: cpu, LatencyUS: lat})
		}
	}
	add("no sidecar: client app, server app, one veth/bridge crossing each way", "same-node direct",
		abs(cpu, SameNode, Direct), abs(lat, SameNode, Direct))
	add("Istio's NAT and conntrack", "same-node iptables - capture",
		diff(cpu, SameNode, Iptables, Capture), diff(lat, SameNode, Iptables, Capture))
	add("sidecar <-> sidecar hop: TCP over veth and bridge rather than spliced", "same-node capture - meshsplice",
		diff(cpu, SameNode, Capture, Meshsplice), diff(lat, SameNode, Capture, Meshsplice))
	add("app <-> sidecar hops (two): TCP over loopback rather than spliced", "same-node meshsplice - meshsplice-full",
		diff(cpu, SameNode, Meshsplice, MeshspliceFull), diff(lat, SameNode, Meshsplice, MeshspliceFull))
	add("what splicing cannot remove: two sidecar traversals (proxy wake-up, read, write) with every hop spliced, less direct's veth crossing",
		"same-node meshsplice-full - direct",
		diff(cpu, SameNode, MeshspliceFull, Direct), diff(lat, SameNode, MeshspliceFull, Direct))
	add("  of which the client sidecar's own CPU time", "same-node meshsplice-full, client-sidecar cgroup", role(roleClientSidecar), nil)
	add("  of which the server sidecar's own CPU time", "same-node meshsplice-full, server-sidecar cgroup", role(roleServerSidecar), nil)
	add("one sidecar traversal with its app <-> sidecar hop spliced (in-pod)", "in-pod meshsplice-full - direct",
		diff(cpu, InPod, MeshspliceFull, Direct), diff(lat, InPod, MeshspliceFull, Direct))
	add("app <-> sidecar hop (one): TCP over loopback rather than spliced (in-pod)", "in-pod capture - meshsplice-full",
		diff(cpu, InPod, Capture, MeshspliceFull), diff(lat, InPod, Capture, MeshspliceFull))
	add("node <-> node routing (two-nodes direct - same-node direct)", "two-nodes direct - same-node direct",
		func() *float64 {
			a, ok1 := cpu(TwoNodes, Direct)
			b, ok2 := cpu(SameNode, Direct)
			if !ok1 || !ok2 {
				return nil
			}
			return ptr(a - b)
		}(), func() *float64 {
			a, ok1 := lat(TwoNodes, Direct)
			b, ok2 := lat(SameNode, Direct)
			if !ok1 || !ok2 {
				return nil
			}
			return ptr(a - b)
		}())
	return out
}

// writeHops prints the breakdown.
func writeHops(w io.Writer, hs []Hop) {
	if len(hs) == 0 {
		return
	}
	fmt.Fprintf(w, "\nwhere the time goes (64 B request/response, 1 connection; cpu: as fast as possible, p50: at 1000/s):\n")
	fmt.Fprintf(w, "  %9s %9s  %s\n", "cpu us", "p50 us", "")
	for _, h := range hs {
		fmt.Fprintf(w, "  %9s %9s  %s  [%s]\n", fmtPtr(h.CPUUS, "%.1f"), fmtPtr(h.LatencyUS, "%.1f"), h.Name, h.Formula)
	}
}
