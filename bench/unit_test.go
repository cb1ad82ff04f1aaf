package bench

import (
	"bytes"
	"encoding/xml"
	"math"
	"slices"
	"strings"
	"testing"
)

func TestRotate(t *testing.T) {
	got := [][]Mode{}
	for k := range len(Modes) + 1 {
		got = append(got, rotate(Modes, k))
	}
	if !slices.Equal(got[0], Modes) || !slices.Equal(got[len(Modes)], Modes) {
		t.Fatalf("rotate by 0 or len: %v", got)
	}
	firsts := map[Mode]bool{}
	for _, r := range got[:len(Modes)] {
		if len(r) != len(Modes) {
			t.Fatalf("rotate lost modes: %v", r)
		}
		firsts[r[0]] = true
	}
	if len(firsts) != len(Modes) {
		t.Fatalf("every mode must start one round: %v", firsts)
	}
}

func TestMatrix(t *testing.T) {
	full := FullMatrix()
	// Per topology: 2 rates x 3 sizes x 3 connection counts, Istio's six
	// fortio cells, stream and connect.
	if want := len(Topologies) * (18 + len(istioConns) + 2); len(full) != want {
		t.Fatalf("full matrix has %d cells, want %d", len(full), want)
	}
	groups := byTopology(append(QuickMatrix(), full...))
	if len(groups) != len(Topologies) {
		t.Fatalf("%d topology groups", len(groups))
	}
	for _, g := range groups {
		for _, c := range g {
			if c.Topology != g[0].Topology {
				t.Fatalf("group mixes %s and %s", c.Topology, g[0].Topology)
			}
		}
	}
	if (Cell{Workload: HTTP, Rate: 1000}).Kind() != Latency || (Cell{Workload: TCPRR}).Kind() != Throughput || (Cell{Workload: Stream, Rate: 5}).Kind() != Throughput {
		t.Fatal("cell kinds")
	}
	if got := (Cell{Workload: TCPRR, Size: 16 << 10, Conns: 8, Rate: 1000}).Label(); got != "tcp-rr 16KiB c=8 rate=1000" {
		t.Fatalf("label %q", got)
	}
}

func TestLogHistQuantile(t *testing.T) {
	// 100 samples of 10 us and 1 of 1 ms: p50 ~10 us, max ~1 ms.
	h := &logHist{base: 1.01, counts: map[int64]int64{}}
	add := func(ns float64, n int64) {
		h.counts[int64(math.Floor(math.Log(ns)/math.Log(1.01)))] += n
		h.n += n
	}
	add(10e3, 100)
	add(1e6, 1)
	if q := h.quantile(0.5); math.Abs(q-10) > 0.1 {
		t.Fatalf("p50 = %v us, want 10", q)
	}
	if q := h.quantile(1); math.Abs(q-1000)/1000 > 0.01 {
		t.Fatalf("max = %v us, want 1000", q)
	}
	o := &logHist{base: 1.01, counts: map[int64]int64{}}
	o.merge(h)
	o.merge(h)
	if o.n != 202 || o.quantile(0.5) != h.quantile(0.5) {
		t.Fatalf("merge: n=%d", o.n)
	}
}

func lat(p50, p99 float64, rps float64) result {
	return result{hasLatency: true, p50: p50, p90: p50, p99: p99, p999: p99, rps: rps,
		reps: []RepStat{{P50US: p50, P99US: p99, RPS: rps}}}
}

func TestRowsRatios(t *testing.T) {
	c := Cell{Topology: SameNode, Workload: TCPRR, Size: 64, Conns: 1, Rate: 1000}
	rs := rows(c, map[Mode]result{
		Direct:     lat(20, 40, 1000),
		Iptables:   lat(120, 140, 1000),
		Capture:    lat(130, 150, 1000),
		Meshsplice: lat(60, 80, 1000),
	})
	if len(rs) != 4 {
		t.Fatalf("%d rows", len(rs))
	}
	by := map[Mode]Row{}
	for _, r := range rs {
		by[r.Mode] = r
	}
	check := func(m Mode, want float64) {
		t.Helper()
		got := by[m].RatioVsIptables
		if got == nil || math.Abs(*got-want) > 1e-9 {
			t.Errorf("%s ratio = %v, want %v", m, got, want)
		}
	}
	check(Direct, 0)
	check(Iptables, 1)
	check(Capture, 1.1)
	check(Meshsplice, 0.4)
	if by[Meshsplice].RatioKind != "added_latency_p50" || by[Meshsplice].SlowerThanIptables {
		t.Errorf("meshsplice row: %+v", by[Meshsplice])
	}
	if !by[Capture].SlowerThanIptables || !by[Capture].SlowerBeyondNoise || math.Abs(by[Capture].SlowerByPct-8.33) > 0.01 {
		t.Errorf("capture should be slower by 8.33%%: %+v", by[Capture])
	}

	tc := Cell{Topology: SameNode, Workload: TCPRR, Size: 64, Conns: 1}
	trs := rows(tc, map[Mode]result{Direct: lat(10, 20, 30000), Iptables: lat(100, 150, 8000), Meshsplice: lat(50, 60, 16000)})
	for _, r := range trs {
		if r.Mode == Meshsplice && (r.RatioKind != "rps" || *r.RatioVsIptables != 2) {
			t.Errorf("throughput ratio: %+v", r)
		}
	}
	ts := checkTargets(append(rs, trs...))
	met := 0
	for _, tg := range ts {
		if tg.Met {
			met++
		}
	}
	// p50 0.4 and rps 2.0 are met, p99 (80-40)/(140-40) = 0.4 is met too.
	if len(ts) != 3 || met != 3 {
		t.Errorf("targets %+v", ts)
	}
}

func TestRenderers(t *testing.T) {
	c := Cell{Topology: SameNode, Workload: TCPRR, Size: 64, Conns: 1, Rate: 1000}
	s := Cell{Topology: SameNode, Workload: Stream, Size: 64 << 10, Conns: 1}
	res := map[Mode]result{}
	sres := map[Mode]result{}
	for i, m := range Modes {
		res[m] = lat(float64(20+10*i), float64(40+10*i), 1000)
		sres[m] = result{rps: float64(1000 * (i + 1)), bytesPerS: float64(1<<20) * float64(i+1)}
	}
	rep := &Report{Rows: append(rows(c, res), rows(s, sres)...)}
	rep.Derive()
	var b bytes.Buffer
	if err := rep.WriteTable(&b); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"same-node  tcp-rr 64B c=1 rate=1000  (latency)", "meshsplice-full", "MiB/s", "targets"} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, b.String())
		}
	}
	b.Reset()
	if err := rep.WriteMarkdown(&b); err != nil {
		t.Fatal(err)
	}
	if strings.Count(b.String(), "\n| ") < len(rep.Rows) {
		t.Errorf("markdown:\n%s", b.String())
	}
	b.Reset()
	if err := rep.WriteSVG(&b); err != nil {
		t.Fatal(err)
	}
	if err := xml.Unmarshal(b.Bytes(), new(struct{})); err != nil {
		t.Fatalf("SVG is not well-formed XML: %v", err)
	}
	if n := strings.Count(b.String(), "<rect x="); n < 4*len(Modes) {
		t.Errorf("SVG has %d bars", n)
	}
}
