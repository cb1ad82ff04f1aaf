package bench

import (
	"fmt"
	"io"
	"math"
	"strings"
	"time"
)

// Report is the outcome of a benchmark run, as --json prints it.
type Report struct {
	Command string    `json:"command"`
	Started time.Time `json:"started"`
	Seconds float64   `json:"duration_s"`
	Machine Machine   `json:"machine"`
	Method  Method    `json:"method"`
	// Rows holds one row per topology, cell and mode.
	Rows []Row `json:"rows"`
	// Targets are the targets, checked on this run.
	Targets []Target `json:"targets"`
	// Hops breaks the same-node path's cost down by hop.
	Hops []Hop `json:"hops"`
	// SlowerThanIptables lists the rows of meshsplice's modes that did
	// worse than the iptables mode in the same cell.
	SlowerThanIptables []string `json:"slower_than_iptables"`
	// Resources are the name prefixes of what the run created (one per
	// topology), all removed by the time Run returns.
	Resources []string `json:"resources"`
}

// Machine describes where the run happened.
type Machine struct {
	CPUModel string `json:"cpu_model"`
	CPUs     int    `json:"cpus"`
	Kernel   string `json:"kernel"`
	Go       string `json:"go"`
}

// Method describes how the run measured.
type Method struct {
	Reps               int     `json:"reps"`
	WarmupMS           float64 `json:"warmup_ms"`
	LatencyWindowMS    float64 `json:"latency_window_ms"`
	ThroughputWindowMS float64 `json:"throughput_window_ms"`
	Pinning            string  `json:"pinning"`
	Modes              []Mode  `json:"modes"`
	IstioVersion       string  `json:"istio_version"`
	IstioRules         string  `json:"istio_rules"`
	Fortio             string  `json:"fortio"`
	Sidecar            string  `json:"sidecar"`
	Order              string  `json:"order"`
	Statistics         string  `json:"statistics"`
}

// Row is one cell in one mode.
type Row struct {
	Topology Topology `json:"topology"`
	Workload Workload `json:"workload"`
	Size     int      `json:"size"`
	Conns    int      `json:"conns"`
	Rate     int      `json:"rate"`
	Kind     Kind     `json:"kind"`
	Label    string   `json:"label"`
	Mode     Mode     `json:"mode"`
	// Latency percentiles in microseconds; null for a stream.
	P50US  *float64 `json:"p50_us"`
	P90US  *float64 `json:"p90_us"`
	P99US  *float64 `json:"p99_us"`
	P999US *float64 `json:"p999_us"`
	// RPS are requests per second (stream: writes of Size bytes;
	// connect: connections); BytesPerS the bytes written per second.
	RPS       float64 `json:"rps"`
	BytesPerS float64 `json:"bytes_per_s"`
	// CPUUSPerReq is the CPU time of every pod process per request (per
	// write, per connection), from the role cgroups' cpu.stat;
	// CPUUSPerReqByRole splits it by role (client-app, client-sidecar,
	// server-sidecar, server-app) into user and system time. null means
	// unknown: no repetition's readings covered its window (see
	// docs/benchmarks.md, Method); never 0.
	CPUUSPerReq       *float64           `json:"cpu_us_per_req"`
	CPUUSPerReqByRole map[string]RoleCPU `json:"cpu_us_per_req_by_role"`
	// AddedUS is the latency added over the direct mode, per percentile.
	AddedUS Percentiles `json:"added_us"`
	// RatioVsIptables is the headline comparison with the iptables mode:
	// for latency cells the added p50 latency over direct divided by
	// iptables' (lower is better, 1 = iptables, 0 = no sidecar cost); for
	// throughput cells rps divided by iptables' rps (higher is better).
	RatioVsIptables *float64 `json:"ratio_vs_iptables"`
	RatioKind       string   `json:"ratio_kind"`
	// AddedLatencyRatioVsIptables is the added-latency ratio at each
	// percentile; RPSRatioVsIptables the plain rps ratio.
	AddedLatencyRatioVsIptables Percentiles `json:"added_latency_ratio_vs_iptables"`
	RPSRatioVsIptables          *float64    `json:"rps_ratio_vs_iptables"`
	// SlowerThanIptables: latency cells, p50 or p99 above iptables';
	// throughput cells, fewer rps. SlowerByPct is by how much (worst).
	// SlowerBeyondNoise: even the best repetition did worse than the
	// iptables mode's worst one.
	SlowerThanIptables bool      `json:"slower_than_iptables"`
	SlowerByPct        float64   `json:"slower_by_pct"`
	SlowerBeyondNoise  bool      `json:"slower_beyond_noise"`
	Reps               []RepStat `json:"reps"`
	Evidence           Evidence  `json:"evidence"`
	// ForeignCPUPct is the most CPU time other processes of the machine
	// used during a repetition's window, in percent of one CPU (runs above
	// 5% are repeated; a high value here means the machine was not quiet).
	ForeignCPUPct float64 `json:"foreign_cpu_pct"`
}

// Percentiles holds one value per reported percentile (null when n/a).
type Percentiles struct {
	P50  *float64 `json:"p50"`
	P90  *float64 `json:"p90"`
	P99  *float64 `json:"p99"`
	P999 *float64 `json:"p999"`
}

// RoleCPU is CPU time per request of one role, in microseconds.
type RoleCPU struct {
	Total  float64 `json:"total"`
	User   float64 `json:"user"`
	System float64 `json:"system"`
}

// RepStat is one repetition's own numbers, to show the spread.
type RepStat struct {
	P50US         float64  `json:"p50_us"`
	P99US         float64  `json:"p99_us"`
	RPS           float64  `json:"rps"`
	CPUUSPerReq   *float64 `json:"cpu_us_per_req"` // null: unknown
	ForeignCPUPct float64  `json:"foreign_cpu_pct"`
}

// Target is one of the targets, checked.
type Target struct {
	Name string   `json:"name"`
	Mode Mode     `json:"mode"`
	Cell string   `json:"cell"`
	Want string   `json:"want"`
	Got  *float64 `json:"got"`
	Met  bool     `json:"met"`
}

func ptr(v float64) *float64 {
	r := round(v)
	return &r
}

// rows turns the results of one cell into report rows with ratios.
func rows(c Cell, res map[Mode]result) []Row {
	var out []Row
	direct, hasDirect := res[Direct]
	ipt, hasIpt := res[Iptables]
	for _, m := range Modes {
		r, ok := res[m]
		if !ok {
			continue
		}
		row := Row{
			Topology: c.Topology, Workload: c.Workload, Size: c.Size, Conns: c.Conns, Rate: c.Rate,
			Kind: c.Kind(), Label: c.Label(), Mode: m,
			RPS: round(r.rps), BytesPerS: math.Round(r.bytesPerS), CPUUSPerReq: r.cpuPerUnit,
			CPUUSPerReqByRole: r.cpuByRole, Reps: r.reps, Evidence: r.evidence, ForeignCPUPct: round(r.foreignPct),
		}
		if r.hasLatency {
			row.P50US, row.P90US, row.P99US, row.P999US = ptr(r.p50), ptr(r.p90), ptr(r.p99), ptr(r.p999)
		}
		if hasDirect && r.hasLatency && direct.hasLatency {
			row.AddedUS = Percentiles{ptr(r.p50 - direct.p50), ptr(r.p90 - direct.p90), ptr(r.p99 - direct.p99), ptr(r.p999 - direct.p999)}
			if hasIpt && ipt.hasLatency {
				ratio := func(v, d, i float64) *float64 {
					if i-d <= 0 {
						return nil
					}
					return ptr((v - d) / (i - d))
				}
				row.AddedLatencyRatioVsIptables = Percentiles{
					ratio(r.p50, direct.p50, ipt.p50), ratio(r.p90, direct.p90, ipt.p90),
					ratio(r.p99, direct.p99, ipt.p99), ratio(r.p999, direct.p999, ipt.p999),
				}
			}
		}
		if hasIpt && ipt.rps > 0 {
			row.RPSRatioVsIptables = ptr(r.rps / ipt.rps)
		}
		if c.Kind() == Latency {
			row.RatioKind = "added_latency_p50"
			row.RatioVsIptables = row.AddedLatencyRatioVsIptables.P50
		} else {
			row.RatioKind = "rps"
			row.RatioVsIptables = row.RPSRatioVsIptables
		}
		if hasIpt && m != Direct && m != Iptables {
			if c.Kind() == Latency && r.hasLatency {
				worst := max(r.p50/ipt.p50, r.p99/ipt.p99)
				row.SlowerThanIptables = worst > 1
				row.SlowerByPct = round(math.Max(0, worst-1) * 100)
				p50 := func(s RepStat) float64 { return s.P50US }
				p99 := func(s RepStat) float64 { return s.P99US }
				row.SlowerBeyondNoise = minOf(r.reps, p50) > maxOf(ipt.reps, p50) || minOf(r.reps, p99) > maxOf(ipt.reps, p99)
			} else if ipt.rps > 0 {
				row.SlowerThanIptables = r.rps < ipt.rps
				row.SlowerByPct = round(math.Max(0, 1-r.rps/ipt.rps) * 100)
				rps := func(s RepStat) float64 { return s.RPS }
				row.SlowerBeyondNoise = maxOf(r.reps, rps) < minOf(ipt.reps, rps)
			}
		}
		out = append(out, row)
	}
	return out
}

func minOf(reps []RepStat, f func(RepStat) float64) float64 {
	m := math.Inf(1)
	for _, r := range reps {
		m = math.Min(m, f(r))
	}
	return m
}

func maxOf(reps []RepStat, f func(RepStat) float64) float64 {
	m := math.Inf(-1)
	for _, r := range reps {
		m = math.Max(m, f(r))
	}
	return m
}

// checkTargets evaluates the targets on the same-node, 64 B, one
// connection cells.
func checkTargets(rs []Row) []Target {
	var ts []Target
	find := func(rate bool, m Mode) *Row {
		for i := range rs {
			r := &rs[i]
			if r.Topology == SameNode && r.Workload == TCPRR && r.Size == 64 && r.Conns == 1 && (r.Rate > 0) == rate && r.Mode == m {
				return r
			}
		}
		return nil
	}
	for _, m := range []Mode{Meshsplice, MeshspliceFull} {
		if r := find(true, m); r != nil {
			for _, q := range []struct {
				name string
				v    *float64
			}{{"added p50 latency vs iptables", r.AddedLatencyRatioVsIptables.P50}, {"added p99 latency vs iptables", r.AddedLatencyRatioVsIptables.P99}} {
				ts = append(ts, Target{Name: q.name, Mode: m, Cell: string(r.Topology) + " " + r.Label, Want: "<= 0.40", Got: q.v, Met: q.v != nil && *q.v <= 0.40})
			}
		}
		if r := find(false, m); r != nil {
			ts = append(ts, Target{Name: "req/s vs iptables", Mode: m, Cell: string(r.Topology) + " " + r.Label, Want: ">= 2.00",
				Got: r.RPSRatioVsIptables, Met: r.RPSRatioVsIptables != nil && *r.RPSRatioVsIptables >= 2})
		}
	}
	return ts
}

func fmtPtr(v *float64, format string) string {
	if v == nil {
		return "-"
	}
	return fmt.Sprintf(format, *v)
}

// cpuText is the CPU time per request for people: "unknown" when the
// readings did not cover the window.
func (r Row) cpuText() string {
	if r.CPUUSPerReq == nil {
		return "unknown"
	}
	return fmt.Sprintf("%.1f", *r.CPUUSPerReq)
}

func (r Row) ratioText() string {
	if r.RatioVsIptables == nil {
		return "-"
	}
	if r.RatioKind == "rps" {
		return fmt.Sprintf("%.2fx rps", *r.RatioVsIptables)
	}
	return fmt.Sprintf("%.2fx added", *r.RatioVsIptables)
}

func (r Row) rateText() string {
	if r.Workload == Stream {
		return fmt.Sprintf("%.0f MiB/s", r.BytesPerS/(1<<20))
	}
	return fmt.Sprintf("%.0f", r.RPS)
}

// slowerText marks a row that did worse than iptables.
func (r Row) slowerText() string {
	switch {
	case r.SlowerBeyondNoise:
		return fmt.Sprintf("  SLOWER +%.0f%%", r.SlowerByPct)
	case r.SlowerThanIptables:
		return fmt.Sprintf("  (slower +%.0f%%, within noise)", r.SlowerByPct)
	}
	return ""
}

// WriteTable prints the report as a plain-text table, one block per cell.
func (rep *Report) WriteTable(w io.Writer) error {
	var last string
	for _, r := range rep.Rows {
		head := string(r.Topology) + "  " + r.Label + "  (" + string(r.Kind) + ")"
		if head != last {
			fmt.Fprintf(w, "\n%s\n  %-16s %8s %8s %8s %9s %11s %10s %8s %8s  %s\n", head,
				"mode", "p50 us", "p90 us", "p99 us", "p99.9 us", "req/s", "cpu us/req", "+p50 us", "+p99 us", "vs iptables")
			last = head
		}
		if _, err := fmt.Fprintf(w, "  %-16s %8s %8s %8s %9s %11s %10s %8s %8s  %s%s\n", r.Mode,
			fmtPtr(r.P50US, "%.1f"), fmtPtr(r.P90US, "%.1f"), fmtPtr(r.P99US, "%.1f"), fmtPtr(r.P999US, "%.1f"),
			r.rateText(), r.cpuText(), fmtPtr(r.AddedUS.P50, "%.1f"), fmtPtr(r.AddedUS.P99, "%.1f"), r.ratioText(), r.slowerText()); err != nil {
			return err
		}
	}
	writeHops(w, rep.Hops)
	if len(rep.Targets) > 0 {
		fmt.Fprintf(w, "\ntargets (same-node, 64 B, 1 connection):\n")
		for _, t := range rep.Targets {
			met := "MISSED"
			if t.Met {
				met = "met"
			}
			fmt.Fprintf(w, "  %-16s %-31s want %s got %s  %s\n", t.Mode, t.Name, t.Want, fmtPtr(t.Got, "%.2f"), met)
		}
	}
	if len(rep.SlowerThanIptables) > 0 {
		fmt.Fprintf(w, "\nslower than iptables (meshsplice modes):\n  %s\n", strings.Join(rep.SlowerThanIptables, "\n  "))
	}
	return nil
}

// WriteMarkdown prints the rows as one Markdown table per topology.
func (rep *Report) WriteMarkdown(w io.Writer) error {
	var topo Topology
	for _, r := range rep.Rows {
		if r.Topology != topo {
			topo = r.Topology
			fmt.Fprintf(w, "\n#### %s\n\n", topo)
			fmt.Fprintf(w, "| cell | mode | p50 µs | p90 µs | p99 µs | p99.9 µs | req/s | CPU µs/req | +p50 µs | +p99 µs | vs iptables |\n")
			fmt.Fprintf(w, "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n")
		}
		ratio := r.ratioText()
		switch {
		case r.SlowerBeyondNoise:
			ratio += fmt.Sprintf(" **slower +%.0f%%**", r.SlowerByPct)
		case r.SlowerThanIptables:
			ratio += fmt.Sprintf(" (slower +%.0f%%, noise)", r.SlowerByPct)
		}
		if _, err := fmt.Fprintf(w, "| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n", r.Label, r.Mode,
			fmtPtr(r.P50US, "%.1f"), fmtPtr(r.P90US, "%.1f"), fmtPtr(r.P99US, "%.1f"), fmtPtr(r.P999US, "%.1f"),
			r.rateText(), r.cpuText(), fmtPtr(r.AddedUS.P50, "%.1f"), fmtPtr(r.AddedUS.P99, "%.1f"), ratio); err != nil {
			return err
		}
	}
	return nil
}
