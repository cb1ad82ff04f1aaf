package bench

import (
	"context"
	"errors"
	"fmt"
	"html"
	"io"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/internal/lab"
	"github.com/meshsplice/meshsplice/istio"
)

// SoakOptions configure Soak. Of Options it uses BinDir, Pin, Nice,
// Progress, Log and Command.
type SoakOptions struct {
	Options
	// Duration of the traffic (default 30m).
	Duration time.Duration
	// Pods is the number of meshed pods (default 20): the client and
	// server pods that carry the traffic, and Pods-2 that churn.
	Pods int
	// Churn is the interval between two churn steps (default 500ms): one
	// pod unregistered or registered again, then a new kernel policy.
	Churn time.Duration
	// Sample is the interval between two samples (default Duration/120,
	// at least 1s).
	Sample time.Duration
}

// SoakReport is the outcome of Soak, as --json prints it.
type SoakReport struct {
	Command string    `json:"command"`
	Started time.Time `json:"started"`
	Seconds float64   `json:"duration_s"`
	Machine Machine   `json:"machine"`
	Method  string    `json:"method"`
	Pods    int       `json:"pods"`
	// NewConns are the connections the connect workload made;
	// LongLivedMessages the exchanges over the long-lived connections.
	NewConns          int64 `json:"new_conns"`
	LongLivedMessages int64 `json:"long_lived_messages"`
	PodChurns         int   `json:"pod_churns"`
	PolicyChurns      int   `json:"policy_churns"`
	// Errors are the failed connections and steps (0 expected).
	Errors []string `json:"errors"`
	// Baseline and End are the entries of every hash-type map before the
	// churn pods were registered and after everything stopped; NotBack
	// names the maps whose counts differ.
	Baseline map[string]int `json:"baseline_entries"`
	End      map[string]int `json:"end_entries"`
	NotBack  []string       `json:"not_back_to_baseline"`
	// LRUGrowth are the LRU maps whose counts differ: they keep entries
	// until full by design (ms_self_syn has no close hook).
	LRUGrowth []string     `json:"lru_growth"`
	Samples   []SoakSample `json:"samples"`
	// Resources are the name prefixes of what the run created.
	Resources []string `json:"resources"`
}

// SoakSample is the state at one moment of the soak.
type SoakSample struct {
	Second float64 `json:"t_s"`
	// RSSKiB is the resident memory of the process that holds the
	// datapath (this one, as the agent would); HeapKiB its Go heap.
	RSSKiB  int64          `json:"rss_kib"`
	HeapKiB int64          `json:"heap_kib"`
	Entries map[string]int `json:"entries"`
	// Registered are the pods registered at that moment.
	Registered int   `json:"registered"`
	NewConns   int64 `json:"new_conns"`
	Errors     int   `json:"errors"`
}

// Soak runs new and long-lived connections between two meshed pods of a
// node while the other pods of the node are unregistered and registered
// again (their sk_lookup links attached and detached) and the kernel
// policy is replaced, in turn; it samples the process's memory and the
// maps' entry counts, and checks that they return to their baseline.
// Everything it creates is removed, also when it fails.
func Soak(ctx context.Context, opts SoakOptions) (_ *SoakReport, err error) {
	if opts.Duration <= 0 {
		opts.Duration = 30 * time.Minute
	}
	if opts.Pods < 3 {
		opts.Pods = 20
	}
	if opts.Churn <= 0 {
		opts.Churn = 500 * time.Millisecond
	}
	if opts.Sample <= 0 {
		opts.Sample = max(time.Second, opts.Duration/120)
	}
	opts.setDefaults()
	rep := &SoakReport{Command: opts.Command, Started: time.Now().UTC().Truncate(time.Second), Machine: machine(), Pods: opts.Pods, Errors: []string{}, Resources: []string{}}
	rep.Method = fmt.Sprintf("%d meshed pods on one node: client -> server through both sidecars, one long-lived tcp-rr client (4 connections, 100 requests/s) for %v "+
		"and connect runs (1 worker, 64 B, 2 s each) back to back; every %v one of the %d other pods is unregistered or registered again (its sk_lookup link detached or attached) "+
		"and the kernel policy replaced (every registered address, new identities each time, all allowed); a sample every %v",
		opts.Pods, opts.Duration, opts.Churn, opts.Pods-2, opts.Sample)
	p := &progress{w: opts.Progress, inPlace: opts.InPlace}
	defer p.done()
	e, closeEnv, err := buildSameNode(ctx, &opts.Options, &rep.Resources, p, fmt.Sprintf(" with %d churning pods", opts.Pods-2))
	if err != nil {
		return nil, err
	}
	defer func() { err = errors.Join(err, closeEnv()) }()
	ch, err := newChurner(e, opts.Pods-2)
	if err != nil {
		return nil, err
	}
	cell := Cell{Topology: SameNode, Workload: Connect, Size: 64, Conns: 1}
	if _, err := e.run(ctx, cell, 50*time.Millisecond, 200*time.Millisecond); err != nil {
		return nil, fmt.Errorf("warm-up: %w", err)
	}
	time.Sleep(time.Second) // closes settle
	if rep.Baseline, _, err = mapEntries(); err != nil {
		return nil, err
	}
	start := time.Now()
	deadline := start.Add(opts.Duration)
	var mu sync.Mutex // rep, between the traffic and the churn goroutine
	addErr := func(format string, args ...any) {
		mu.Lock()
		defer mu.Unlock()
		rep.Errors = append(rep.Errors, fmt.Sprintf("%.1fs: ", time.Since(start).Seconds())+fmt.Sprintf(format, args...))
	}
	long, err := e.start(e.client, roleClientApp, e.client.app, appUID, []string{e.opts.bin("mstest"), "client",
		"--duration", opts.Duration.String(), "--conns", "4", "--rate", "100", "--size", "64", "--timeout", "10s",
		"--target", e.target(echoPort)}, nil, true)
	if err != nil {
		return nil, err
	}
	sample := func() {
		s := SoakSample{Second: round(time.Since(start).Seconds()), Registered: 2 + ch.registered(), RSSKiB: rssKiB()}
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		s.HeapKiB = int64(ms.HeapAlloc >> 10)
		entries, _, err := mapEntries()
		if err != nil {
			addErr("sample: %v", err)
		}
		mu.Lock()
		s.Entries, s.NewConns, s.Errors = entries, rep.NewConns, len(rep.Errors)
		rep.Samples = append(rep.Samples, s)
		mu.Unlock()
		p.note("t=%4.0fs rss %d KiB heap %d KiB pods %d new conns %d errors %d", s.Second, s.RSSKiB, s.HeapKiB, s.Registered, s.NewConns, s.Errors)
	}
	sample()
	// Churn and samples on their own goroutine, beside the connect runs.
	stop, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		churn, samp := time.NewTicker(opts.Churn), time.NewTicker(opts.Sample)
		defer churn.Stop()
		defer samp.Stop()
		for {
			select {
			case <-stop:
				return
			case <-churn.C:
				if err := ch.step(); err != nil {
					addErr("churn: %v", err)
				}
			case <-samp.C:
				sample()
			}
		}
	}()
	for time.Now().Before(deadline) && ctx.Err() == nil {
		window := min(2*time.Second, time.Until(deadline))
		if window < 100*time.Millisecond {
			break
		}
		s, err := e.runMstest(ctx, cell, 0, window, &windowMarks{root: e.root.Path})
		if err != nil {
			addErr("connect run: %v", err)
			continue
		}
		mu.Lock()
		rep.NewConns += s.units
		mu.Unlock()
	}
	close(stop)
	<-done
	if err := long.Wait(ctx, time.Until(deadline)+30*time.Second); err != nil {
		addErr("long-lived client: %v", err)
	} else if ev, err := long.WaitEvent(ctx, "aggregate", time.Second); err != nil {
		addErr("long-lived client: %v", err)
	} else {
		var agg aggregate
		if err := ev.Decode(&agg); err != nil || !agg.OK {
			addErr("long-lived client: %v %v", err, agg.Errors)
		}
		rep.LongLivedMessages = agg.Messages
	}
	rep.PodChurns, rep.PolicyChurns = ch.podChurns, ch.policyChurns
	// Back to the start: churn pods gone, the policy of the two pods.
	if err := ch.removeAll(); err != nil {
		addErr("remove churn pods: %v", err)
	}
	time.Sleep(2 * time.Second) // closes settle
	sample()
	var lru map[string]bool
	if rep.End, lru, err = mapEntries(); err != nil {
		return nil, err
	}
	for name, n := range rep.Baseline {
		diff := fmt.Sprintf("%s: %d at the start, %d at the end", name, n, rep.End[name])
		switch {
		case rep.End[name] == n:
		case lru[name]:
			rep.LRUGrowth = append(rep.LRUGrowth, diff)
		default:
			rep.NotBack = append(rep.NotBack, diff)
		}
	}
	slices.Sort(rep.NotBack)
	slices.Sort(rep.LRUGrowth)
	rep.Seconds = time.Since(rep.Started).Round(time.Second).Seconds()
	return rep, ctx.Err()
}

// churner registers and unregisters pods that have a namespace (no
// interface: nothing connects to them) and replaces the kernel policy.
type churner struct {
	e   *env
	tr  istio.Traffic
	ns  []*lab.Netns
	on  []bool
	ids uint32
	// next is the pod the next step flips.
	next                    int
	podChurns, policyChurns int
	mu                      sync.Mutex
}

func newChurner(e *env, n int) (*churner, error) {
	tr, _, err := istio.ParseTraffic(annotations(false), istio.DefaultDefaults())
	if err != nil {
		return nil, err
	}
	c := &churner{e: e, tr: tr, on: make([]bool, n), ids: 1}
	for i := range n {
		ns, err := e.lab.NewNetns(fmt.Sprintf("churn-%d", i))
		if err != nil {
			return nil, err
		}
		c.ns = append(c.ns, ns)
	}
	// The churn pods start unregistered, under the policy of the two
	// traffic pods: the baseline.
	if err := c.writePolicy(); err != nil {
		return nil, err
	}
	c.policyChurns = 0
	return c, nil
}

func (c *churner) registered() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, on := range c.on {
		if on {
			n++
		}
	}
	return n
}

func (c *churner) cookie(i int) (uint64, error) { return c.ns[i].Cookie() }

// step flips one pod's registration, then writes a new policy.
func (c *churner) step() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	i := c.next
	c.next = (c.next + 1) % len(c.ns)
	if err := c.set(i, !c.on[i]); err != nil {
		return err
	}
	c.podChurns++
	return c.writePolicy()
}

func (c *churner) set(i int, on bool) error {
	dp := c.e.nodes[0].dp
	cookie, err := c.cookie(i)
	if err != nil {
		return err
	}
	if on {
		err = dp.AddPod(datapath.Pod{NetnsPath: c.ns[i].Path, Cookie: cookie, IPs: []netip.Addr{fakeIP(i)}, Traffic: c.tr})
	} else {
		err = dp.RemovePod(cookie)
	}
	if err != nil {
		return fmt.Errorf("churn pod %d: %w", i, err)
	}
	c.on[i] = on
	return nil
}

// writePolicy gives every registered address a new identity (all
// allowed), so that every identity entry is replaced.
func (c *churner) writePolicy() error {
	var ips []netip.Addr
	for _, p := range c.e.meshed {
		ips = append(ips, p.IP)
	}
	for i, on := range c.on {
		if on {
			ips = append(ips, fakeIP(i))
		}
	}
	if err := c.e.nodes[0].dp.SetPolicy(allowPolicy(ips, c.ids)); err != nil {
		return fmt.Errorf("policy %d: %w", c.policyChurns+1, err)
	}
	c.ids += uint32(len(ips))
	c.policyChurns++
	return nil
}

// removeAll unregisters every churn pod and writes the policy of the
// remaining ones.
func (c *churner) removeAll() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	var errs []error
	for i, on := range c.on {
		if on {
			errs = append(errs, c.set(i, false))
		}
	}
	errs = append(errs, c.writePolicy())
	return errors.Join(errs...)
}

// rssKiB is this process's resident memory.
func rssKiB() int64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			n, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return n
		}
	}
	return 0
}

// WriteTable prints the report for people.
func (rep *SoakReport) WriteTable(w io.Writer) error {
	var b strings.Builder
	fmt.Fprintf(&b, "soak: %.0f s, %d pods, %d new connections, %d long-lived exchanges, %d pod churns, %d policy churns, %d errors\n",
		rep.Seconds, rep.Pods, rep.NewConns, rep.LongLivedMessages, rep.PodChurns, rep.PolicyChurns, len(rep.Errors))
	for _, e := range rep.Errors {
		fmt.Fprintf(&b, "  error %s\n", e)
	}
	if n := len(rep.Samples); n > 0 {
		first, last := rep.Samples[0], rep.Samples[n-1]
		peak := slices.MaxFunc(rep.Samples, func(a, b SoakSample) int { return int(a.RSSKiB - b.RSSKiB) })
		fmt.Fprintf(&b, "memory (RSS of the process holding the datapath): %d KiB at the start, peak %d KiB, %d KiB at the end; Go heap %d -> %d KiB\n",
			first.RSSKiB, peak.RSSKiB, last.RSSKiB, first.HeapKiB, last.HeapKiB)
	}
	if len(rep.NotBack) == 0 {
		fmt.Fprintf(&b, "map entries: every non-LRU hash map back to its baseline (%d maps counted)\n", len(rep.Baseline))
	}
	for _, nb := range rep.NotBack {
		fmt.Fprintf(&b, "  not back to baseline: %s\n", nb)
	}
	for _, g := range rep.LRUGrowth {
		fmt.Fprintf(&b, "  LRU map, bounded by its size: %s\n", g)
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// soakCharts are the chart's panels: memory, and the entries of the maps
// the churn and the traffic move.
var soakCharts = []struct {
	title  string
	series []string
}{
	{"memory of the process holding the datapath (MiB)", []string{"rss", "heap"}},
	{"map entries", []string{"ms_pods", "ms_pod_ips", "ms_ports", "ms_ip_info", "ms_pol_ids", "ms_socks", "ms_orig_dst", "ms_self_syn"}},
}

var soakColors = []string{"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"}

func (s SoakSample) value(series string) float64 {
	switch series {
	case "rss":
		return float64(s.RSSKiB) / 1024
	case "heap":
		return float64(s.HeapKiB) / 1024
	}
	return float64(s.Entries[series])
}

// WriteSVG draws the samples over time.
func (rep *SoakReport) WriteSVG(w io.Writer) error {
	const width, panelH, left, top = 860, 260, 60, 40
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" font-family="sans-serif" font-size="11">`+"\n", width, top+len(soakCharts)*(panelH+30))
	fmt.Fprintf(&b, `<text x="%d" y="18" font-size="13">%s</text>`+"\n", left, html.EscapeString(fmt.Sprintf("meshsplice bench --soak: %.0f s, %d pods, %d errors (%s)", rep.Seconds, rep.Pods, len(rep.Errors), rep.Machine.Kernel)))
	tMax := 1.0
	if n := len(rep.Samples); n > 0 {
		tMax = max(tMax, rep.Samples[n-1].Second)
	}
	for pi, c := range soakCharts {
		oy := top + pi*(panelH+30)
		pw, ph := width-left-180, panelH-30
		yMax := 1.0
		for _, s := range rep.Samples {
			for _, name := range c.series {
				yMax = max(yMax, s.value(name))
			}
		}
		yMax *= 1.1
		fmt.Fprintf(&b, `<text x="%d" y="%d">%s</text>`+"\n", left, oy+10, html.EscapeString(c.title))
		fmt.Fprintf(&b, `<rect x="%d" y="%d" width="%d" height="%d" fill="none" stroke="#999"/>`+"\n", left, oy+20, pw, ph)
		fmt.Fprintf(&b, `<text x="%d" y="%d" text-anchor="end">%.0f</text><text x="%d" y="%d" text-anchor="end">0</text>`+"\n", left-4, oy+28, yMax, left-4, oy+20+ph)
		fmt.Fprintf(&b, `<text x="%d" y="%d" text-anchor="end">%.0f s</text>`+"\n", left+pw, oy+20+ph+14, tMax)
		for si, name := range c.series {
			var pts []string
			for _, s := range rep.Samples {
				x := float64(left) + s.Second/tMax*float64(pw)
				y := float64(oy+20+ph) - s.value(name)/yMax*float64(ph)
				pts = append(pts, fmt.Sprintf("%.1f,%.1f", x, y))
			}
			color := soakColors[si%len(soakColors)]
			fmt.Fprintf(&b, `<polyline fill="none" stroke="%s" stroke-width="1.5" points="%s"/>`+"\n", color, strings.Join(pts, " "))
			fmt.Fprintf(&b, `<text x="%d" y="%d" fill="%s">%s</text>`+"\n", left+pw+10, oy+30+si*14, color, html.EscapeString(name))
		}
	}
	b.WriteString("</svg>\n")
	_, err := io.WriteString(w, b.String())
	return err
}
