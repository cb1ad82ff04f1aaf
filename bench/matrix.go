package bench

import (
	"fmt"
	"slices"
)

// Mode is one way of moving a request between the pods.
type Mode string

// The modes, in the order they are reported.
const (
	Direct         Mode = "direct"
	Iptables       Mode = "iptables"
	Capture        Mode = "capture"
	Meshsplice     Mode = "meshsplice"
	MeshspliceFull Mode = "meshsplice-full"
)

// Modes lists every mode in report order.
var Modes = []Mode{Direct, Iptables, Capture, Meshsplice, MeshspliceFull}

// Topology is where the client and server pods sit.
type Topology string

// The topologies.
const (
	InPod    Topology = "in-pod"
	SameNode Topology = "same-node"
	TwoNodes Topology = "two-nodes"
)

// Topologies lists every topology in run order.
var Topologies = []Topology{InPod, SameNode, TwoNodes}

// Workload is what the client does.
type Workload string

// The workloads.
const (
	// TCPRR is request/response over long-lived TCP connections (mstest
	// client and echo server).
	TCPRR Workload = "tcp-rr"
	// HTTP is HTTP/1.1 request/response with fortio (load and server), 1 KiB
	// request bodies echoed back: Istio's published method.
	HTTP Workload = "http"
	// Stream is one-way bulk transfer to a sink.
	Stream Workload = "stream"
	// Connect is one new connection per request/response (connect, one
	// exchange, graceful close).
	Connect Workload = "connect"
)

// Kind tells what a cell's headline number is.
type Kind string

// The kinds.
const (
	// Latency cells run at a fixed rate; their headline is latency.
	Latency Kind = "latency"
	// Throughput cells run as fast as possible; their headline is rps.
	Throughput Kind = "throughput"
)

// Cell is one measurement of the matrix, run in every mode.
type Cell struct {
	Topology Topology `json:"topology"`
	Workload Workload `json:"workload"`
	// Size is the message (request and reply) size in bytes, or the write
	// size of a stream.
	Size int `json:"size"`
	// Conns is the number of connections (connect: parallel workers).
	Conns int `json:"conns"`
	// Rate is the total request rate per second; 0 means as fast as
	// possible.
	Rate int `json:"rate"`
}

// Kind returns the cell's kind.
func (c Cell) Kind() Kind {
	if c.Rate > 0 && (c.Workload == TCPRR || c.Workload == HTTP) {
		return Latency
	}
	return Throughput
}

// Label names the cell for people, e.g. "tcp-rr 1KiB c=8 rate=1000".
func (c Cell) Label() string {
	rate := "max"
	if c.Rate > 0 {
		rate = fmt.Sprintf("rate=%d", c.Rate)
	}
	return fmt.Sprintf("%s %s c=%d %s", c.Workload, sizeLabel(c.Size), c.Conns, rate)
}

func sizeLabel(n int) string {
	switch {
	case n >= 1<<10 && n%(1<<10) == 0:
		return fmt.Sprintf("%dKiB", n>>10)
	default:
		return fmt.Sprintf("%dB", n)
	}
}

// Istio's published method: 1000 requests/s in total, 1 KiB, over these
// connection counts.
var istioConns = []int{2, 4, 8, 16, 32, 64}

// FullMatrix is the matrix of a full run.
func FullMatrix() []Cell {
	var cells []Cell
	for _, t := range Topologies {
		for _, rate := range []int{1000, 0} {
			for _, size := range []int{64, 1 << 10, 16 << 10} {
				for _, conns := range []int{1, 8, 64} {
					cells = append(cells, Cell{Topology: t, Workload: TCPRR, Size: size, Conns: conns, Rate: rate})
				}
			}
		}
		for _, conns := range istioConns {
			cells = append(cells, Cell{Topology: t, Workload: HTTP, Size: 1 << 10, Conns: conns, Rate: 1000})
		}
		cells = append(cells,
			Cell{Topology: t, Workload: Stream, Size: 64 << 10, Conns: 1},
			Cell{Topology: t, Workload: Connect, Size: 64, Conns: 4},
		)
	}
	return cells
}

// QuickMatrix is the reduced matrix of --quick: the target cells and one
// cell of every other workload on the same-node path, and the 64 B latency
// cell on the other topologies.
func QuickMatrix() []Cell {
	return []Cell{
		{Topology: InPod, Workload: TCPRR, Size: 64, Conns: 1, Rate: 1000},
		{Topology: SameNode, Workload: TCPRR, Size: 64, Conns: 1, Rate: 1000},
		{Topology: SameNode, Workload: TCPRR, Size: 64, Conns: 1},
		{Topology: SameNode, Workload: HTTP, Size: 1 << 10, Conns: 16, Rate: 1000},
		{Topology: SameNode, Workload: Stream, Size: 64 << 10, Conns: 1},
		{Topology: SameNode, Workload: Connect, Size: 64, Conns: 4},
		{Topology: TwoNodes, Workload: TCPRR, Size: 64, Conns: 1, Rate: 1000},
	}
}

// byTopology groups cells by topology, in Topologies order, keeping the
// cells' order inside each group.
func byTopology(cells []Cell) [][]Cell {
	var groups [][]Cell
	for _, t := range Topologies {
		var g []Cell
		for _, c := range cells {
			if c.Topology == t {
				g = append(g, c)
			}
		}
		if len(g) > 0 {
			groups = append(groups, g)
		}
	}
	return groups
}

// rotate returns modes starting at index k (round-robin order).
func rotate(modes []Mode, k int) []Mode {
	if len(modes) == 0 {
		return nil
	}
	k %= len(modes)
	return append(slices.Clone(modes[k:]), modes[:k]...)
}
