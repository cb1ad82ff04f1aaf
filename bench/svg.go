package bench

import (
	"fmt"
	"html"
	"io"
	"math"
	"strings"
)

// modeColors are the chart's colours, one per mode.
var modeColors = map[Mode]string{
	Direct:         "#9e9e9e",
	Iptables:       "#d62728",
	Capture:        "#ff7f0e",
	Meshsplice:     "#1f77b4",
	MeshspliceFull: "#2ca02c",
}

// chartPanels picks the cells the chart shows: per topology, the 64 B
// one-connection latency cell and Istio's method at 16 connections.
func chartPanels(rs []Row) [][]Row {
	var panels [][]Row
	for _, t := range Topologies {
		for _, want := range []func(r Row) bool{
			func(r Row) bool { return r.Workload == TCPRR && r.Size == 64 && r.Conns == 1 && r.Rate > 0 },
			func(r Row) bool { return r.Workload == HTTP && r.Conns == 16 },
		} {
			var p []Row
			for _, r := range rs {
				if r.Topology == t && want(r) && r.P50US != nil {
					p = append(p, r)
				}
			}
			if len(p) > 0 {
				panels = append(panels, p)
			}
		}
	}
	return panels
}

// WriteSVG draws the latency percentiles of every mode for the cells of
// chartPanels, as grouped bars, one panel per cell.
func (rep *Report) WriteSVG(w io.Writer) error {
	panels := chartPanels(rep.Rows)
	const pw, ph, cols = 420, 300, 2
	rowsN := (len(panels) + cols - 1) / cols
	width, height := cols*pw+20, rowsN*ph+90
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif" font-size="11">`+"\n", width, height, width, height)
	fmt.Fprintf(&b, `<rect width="100%%" height="100%%" fill="white"/>`+"\n")
	fmt.Fprintf(&b, `<text x="10" y="20" font-size="15" font-weight="bold">meshsplice bench: request latency percentiles per mode (µs, lower is better)</text>`+"\n")
	fmt.Fprintf(&b, `<text x="10" y="38" fill="#555">%s; %s</text>`+"\n", html.EscapeString(rep.Machine.CPUModel+", "+rep.Machine.Kernel), html.EscapeString(rep.Method.Pinning))
	x := 10
	for _, m := range Modes {
		fmt.Fprintf(&b, `<rect x="%d" y="48" width="12" height="12" fill="%s"/><text x="%d" y="58">%s</text>`+"\n", x, modeColors[m], x+16, m)
		x += 30 + 7*len(m)
	}
	for i, p := range panels {
		ox, oy := 10+(i%cols)*pw, 75+(i/cols)*ph
		drawPanel(&b, p, ox, oy, pw-20, ph-20)
	}
	b.WriteString("</svg>\n")
	_, err := io.WriteString(w, b.String())
	return err
}

func drawPanel(b *strings.Builder, rs []Row, ox, oy, w, h int) {
	const left, top, bottom = 48, 22, 28
	plotW, plotH := w-left-8, h-top-bottom
	top0 := 0.0
	for _, r := range rs {
		top0 = math.Max(top0, *r.P999US)
	}
	step := niceStep(top0 / 5)
	ymax := math.Ceil(top0/step) * step
	if ymax <= 0 {
		ymax = 1
	}
	title := string(rs[0].Topology) + ": " + rs[0].Label
	fmt.Fprintf(b, `<g transform="translate(%d,%d)">`+"\n", ox, oy)
	fmt.Fprintf(b, `<text x="%d" y="14" font-weight="bold">%s</text>`+"\n", left, html.EscapeString(title))
	for v := 0.0; v <= ymax+step/2; v += step {
		y := top + plotH - int(v/ymax*float64(plotH))
		fmt.Fprintf(b, `<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="#e0e0e0"/><text x="%d" y="%d" text-anchor="end">%g</text>`+"\n",
			left, y, left+plotW, y, left-4, y+4, v)
	}
	groups := []string{"p50", "p90", "p99", "p99.9"}
	gw := float64(plotW) / float64(len(groups))
	bw := (gw - 12) / float64(len(rs))
	for gi, g := range groups {
		gx := float64(left) + gw*float64(gi) + 6
		for ri, r := range rs {
			v := []*float64{r.P50US, r.P90US, r.P99US, r.P999US}[gi]
			bh := *v / ymax * float64(plotH)
			fmt.Fprintf(b, `<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s"><title>%s %s: %.1f µs</title></rect>`+"\n",
				gx+bw*float64(ri), float64(top+plotH)-bh, bw-1, bh, modeColors[r.Mode], r.Mode, g, *v)
		}
		fmt.Fprintf(b, `<text x="%.1f" y="%d" text-anchor="middle">%s</text>`+"\n", gx+(gw-12)/2, top+plotH+16, g)
	}
	fmt.Fprintf(b, `<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="#333"/>`+"\n", left, top+plotH, left+plotW, top+plotH)
	b.WriteString("</g>\n")
}

// niceStep rounds a raw tick step up to 1, 2 or 5 times a power of ten.
func niceStep(raw float64) float64 {
	if raw <= 0 {
		return 1
	}
	p := math.Pow(10, math.Floor(math.Log10(raw)))
	for _, m := range []float64{1, 2, 5, 10} {
		if raw <= m*p {
			return m * p
		}
	}
	return 10 * p
}
