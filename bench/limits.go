package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/cilium/ebpf"

	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/internal/lab"
	"github.com/meshsplice/meshsplice/istio"
)

// LimitsOptions configure Limits. Of Options it uses BinDir, Reps (default
// 5), Warmup (default 150ms), ThroughputWindow (default 1s), Pin, Nice, Retries, Progress,
// Log and Command.
type LimitsOptions struct {
	Options
	// Pods is the number of registered pods of the large point (default
	// 1000): the topology's own pods plus fake ones (netns cookies and
	// addresses in the maps, no namespace).
	Pods int
	// Conns is the number of parallel connecting workers (default 1).
	Conns int
}

// LimitsReport is the outcome of Limits, as --json prints it.
type LimitsReport struct {
	Command string    `json:"command"`
	Started time.Time `json:"started"`
	Seconds float64   `json:"duration_s"`
	Machine Machine   `json:"machine"`
	Method  string    `json:"method"`
	// Points are the runs, in the order they ran.
	Points []LimitsPoint `json:"points"`
	// Small and Large are the medians over repetitions at each pod count.
	Small LimitsPoint `json:"small"`
	Large LimitsPoint `json:"large"`
	// RateRatio is Large's connections/s over Small's (1: flat);
	// P50Ratio and P99Ratio Large's connect+exchange latency over Small's.
	RateRatio float64 `json:"rate_ratio"`
	P50Ratio  float64 `json:"p50_ratio"`
	P99Ratio  float64 `json:"p99_ratio"`
	// RegisterMS is the time AddPod took for the last fake pod registered
	// (the registry is walked on every registration).
	RegisterMS float64 `json:"register_last_pod_ms"`
	// Maps are the datapath's maps as the kernel accounts them.
	Maps []MapMemory `json:"maps"`
	// MemlockBytes is the sum of Maps' memlock.
	MemlockBytes int64 `json:"memlock_bytes"`
	// Resources are the name prefixes of what the run created, all
	// removed by the time Limits returns.
	Resources []string `json:"resources"`
}

// LimitsPoint is one measured run (or a median of runs).
type LimitsPoint struct {
	Pods int `json:"pods"`
	// PolicyIPs are the addresses the kernel policy knows (one identity
	// each).
	PolicyIPs int     `json:"policy_ips"`
	ConnsPerS float64 `json:"conns_per_s"`
	// P50US and P99US are the latency of one connect, one 64-byte
	// exchange and the close, in microseconds.
	P50US float64 `json:"p50_us"`
	P99US float64 `json:"p99_us"`
	// Captured are the connections meshsplice captured during the run
	// (proof the path was taken).
	Captured   uint64  `json:"captured"`
	ForeignPct float64 `json:"other_processes_cpu_pct"`
}

// MapMemory is one BPF map as /proc/self/fdinfo reports it.
type MapMemory struct {
	Name       string `json:"name"`
	Type       string `json:"type"`
	MaxEntries uint32 `json:"max_entries"`
	Memlock    int64  `json:"memlock_bytes"`
}

// fakePodBase is the first netns cookie of the fake pods: far above the
// kernel's counter, which starts at 1 and counts namespaces.
const fakePodBase = uint64(1) << 62

// Limits measures what the number of registered pods does to a new
// connection: the connect workload (connect, capture, policy, sk_lookup,
// sockops, one exchange, close) between two meshed pods on one node, with
// only those pods registered and with opts.Pods registered, the two points
// interleaved within every repetition (starting point alternating), and
// reports the ratio. It also reads the datapath's map memory. Everything it
// creates is removed, also when it fails.
func Limits(ctx context.Context, opts LimitsOptions) (_ *LimitsReport, err error) {
	if opts.Reps <= 0 {
		opts.Reps = 5
	}
	if opts.ThroughputWindow <= 0 {
		opts.ThroughputWindow = time.Second
	}
	if opts.Pods <= 0 {
		opts.Pods = 1000
	}
	if opts.Warmup <= 0 {
		opts.Warmup = 150 * time.Millisecond
	}
	if opts.Conns <= 0 {
		opts.Conns = 1
	}
	opts.Modes = []Mode{Meshsplice}
	opts.setDefaults()
	rep := &LimitsReport{Command: opts.Command, Started: time.Now().UTC().Truncate(time.Second), Machine: machine(), Resources: []string{}}
	p := &progress{w: opts.Progress, inPlace: opts.InPlace, total: 2 * opts.Reps}
	defer p.done()
	e, closeEnv, err := buildSameNode(ctx, &opts.Options, &rep.Resources, p, "")
	if err != nil {
		return nil, err
	}
	defer func() { err = errors.Join(err, closeEnv()) }()
	small := len(e.meshed)
	if opts.Pods < small {
		return nil, fmt.Errorf("--limits-pods %d: the topology alone registers %d", opts.Pods, small)
	}
	fk := &fakePods{e: e}
	cell := Cell{Topology: SameNode, Workload: Connect, Size: 64, Conns: opts.Conns}
	rep.Method = fmt.Sprintf("connect workload (mstest client --reconnect, %d worker(s), 64 B exchange) client pod -> server pod through both sidecars on one node, meshsplice mode; "+
		"%d vs %d registered pods (fake pods: a netns cookie, an address and Istio's default rules in the registry, an identity in the kernel policy), "+
		"%d repetitions, the two points interleaved and the starting one alternating, %v warm-up and %v window each, medians",
		opts.Conns, small, opts.Pods, opts.Reps, opts.Warmup, opts.ThroughputWindow)
	if _, err := e.run(ctx, cell, 50*time.Millisecond, 200*time.Millisecond); err != nil {
		return nil, fmt.Errorf("warm-up: %w", err)
	}
	for r := range opts.Reps {
		order := []int{small, opts.Pods}
		if r%2 == 1 {
			order = []int{opts.Pods, small}
		}
		for _, n := range order {
			if err := ctx.Err(); err != nil {
				return nil, err
			}
			if err := fk.set(n - small); err != nil {
				return nil, err
			}
			if fk.lastAdd > 0 {
				rep.RegisterMS = ms(fk.lastAdd)
			}
			p.start("connect with %d registered pods rep=%d", n, r+1)
			s, err := e.runUndisturbed(ctx, cell, opts.ThroughputWindow, p)
			if err != nil {
				return nil, err
			}
			p.finish(s)
			rep.Points = append(rep.Points, LimitsPoint{
				Pods: n, PolicyIPs: len(fk.policy.IPs), ConnsPerS: round(s.rps), P50US: round(s.p50), P99US: round(s.p99),
				Captured: s.evidence.ConnectCaptured, ForeignPct: round(s.foreignPct),
			})
		}
	}
	rep.Small, rep.Large = medianPoint(rep.Points, small), medianPoint(rep.Points, opts.Pods)
	rep.RateRatio = ratio(rep.Large.ConnsPerS, rep.Small.ConnsPerS)
	rep.P50Ratio = ratio(rep.Large.P50US, rep.Small.P50US)
	rep.P99Ratio = ratio(rep.Large.P99US, rep.Small.P99US)
	if rep.Maps, err = mapMemory(); err != nil {
		return nil, err
	}
	for _, m := range rep.Maps {
		rep.MemlockBytes += m.Memlock
	}
	if err := fk.set(0); err != nil {
		return nil, err
	}
	rep.Seconds = time.Since(rep.Started).Round(time.Second).Seconds()
	return rep, nil
}

// buildSameNode prepares this process (pinning, nice) and builds a
// same-node topology for Limits and Soak, noting its name prefix in
// resources; closeEnv removes it and restores the process. On error
// nothing is left.
func buildSameNode(ctx context.Context, opts *Options, resources *[]string, p *progress, what string) (e *env, closeEnv func() error, err error) {
	if opts.BinDir, err = filepath.Abs(opts.BinDir); err != nil {
		return nil, nil, err
	}
	if err := preflight(opts); err != nil {
		return nil, nil, err
	}
	restore, err := placeSelf(opts)
	if err != nil {
		return nil, nil, err
	}
	l, err := lab.New(Prefix, opts.Log)
	if err != nil {
		restore()
		return nil, nil, err
	}
	*resources = append(*resources, l.Prefix)
	e = &env{opts: opts, topo: SameNode, lab: l}
	closeEnv = func() error {
		defer restore()
		if err := e.close(); err != nil {
			return fmt.Errorf("clean up: %w", err)
		}
		return nil
	}
	p.note("building %s%s (%s)", SameNode, what, l.Prefix)
	if err := e.build(ctx); err != nil {
		return nil, nil, errors.Join(fmt.Errorf("build: %w", err), closeEnv())
	}
	return e, closeEnv, nil
}

func ratio(a, b float64) float64 {
	if b == 0 {
		return 0
	}
	return round(a / b)
}

// medianPoint is the median of every field over the points with n pods.
func medianPoint(ps []LimitsPoint, n int) LimitsPoint {
	var rate, p50, p99, foreign []float64
	out := LimitsPoint{Pods: n}
	for _, p := range ps {
		if p.Pods == n {
			rate, p50, p99, foreign = append(rate, p.ConnsPerS), append(p50, p.P50US), append(p99, p.P99US), append(foreign, p.ForeignPct)
			out.PolicyIPs, out.Captured = p.PolicyIPs, out.Captured+p.Captured
		}
	}
	if len(rate) == 0 {
		return out
	}
	out.ConnsPerS, out.P50US, out.P99US, out.ForeignPct = round(median(rate)), round(median(p50)), round(median(p99)), round(median(foreign))
	return out
}

// fakePods registers pods that have no namespace with the topology's
// datapath, and keeps a kernel policy that gives every registered pod's
// address (real and fake) an identity the policy allows explicitly.
type fakePods struct {
	e       *env
	n       int
	policy  datapath.Policy
	lastAdd time.Duration
}

func fakeIP(i int) netip.Addr {
	return netip.AddrFrom4([4]byte{100, 64 + byte(i>>16), byte(i >> 8), byte(i)})
}

// set makes n fake pods registered, then rewrites the policy.
func (f *fakePods) set(n int) error {
	dp := f.e.nodes[0].dp
	tr, _, err := istio.ParseTraffic(annotations(false), istio.DefaultDefaults())
	if err != nil {
		return err
	}
	for f.n < n {
		ip := fakeIP(f.n)
		start := time.Now()
		if err := dp.AddPod(datapath.Pod{Cookie: fakePodBase + uint64(f.n), IPs: []netip.Addr{ip}, Traffic: tr}); err != nil {
			return fmt.Errorf("register fake pod %d of %d: %w", f.n+1, n, err)
		}
		f.lastAdd = time.Since(start)
		f.n++
	}
	for f.n > n {
		if err := dp.RemovePod(fakePodBase + uint64(f.n-1)); err != nil {
			return fmt.Errorf("remove fake pod %d: %w", f.n, err)
		}
		f.n--
	}
	var ips []netip.Addr
	for _, p := range f.e.meshed {
		ips = append(ips, p.IP)
	}
	for i := range f.n {
		ips = append(ips, fakeIP(i))
	}
	f.policy = allowPolicy(ips, 1)
	if err := dp.SetPolicy(f.policy); err != nil {
		return fmt.Errorf("policy for %d pods: %w", len(f.policy.IPs), err)
	}
	return nil
}

// allowPolicy is a kernel policy that gives each of ips an identity
// (firstID, firstID+1, ...) and a policy set, and allows every connection
// after the whole lookup: one set, two ALLOW atoms, any port; bit 0 from
// anyone (pods registered without an identity connect as identity 0), bit
// 1 from each given identity, so that each has its own ms_pol_ids entry.
func allowPolicy(ips []netip.Addr, firstID uint32) datapath.Policy {
	set := datapath.PolicySet{
		HasAllow: true, AllowMask: 3, DefaultIdentityMask: 1, DefaultPortMask: 3, IdentityMasks: map[uint32]uint64{},
		PrefixMasks: map[netip.Prefix]uint64{netip.MustParsePrefix("0.0.0.0/0"): 3, netip.MustParsePrefix("::/0"): 3},
		Atoms:       []string{"allow-any", "allow-registered"},
	}
	pol := datapath.Policy{Sets: []datapath.PolicySet{set}, IPs: map[netip.Addr]datapath.IPPolicy{}}
	for i, ip := range ips {
		id := firstID + uint32(i)
		set.IdentityMasks[id] = 3
		pol.IPs[ip] = datapath.IPPolicy{Identity: id, Set: 0}
	}
	return pol
}

// procMap is a BPF map this process holds open, by its /proc/self/fdinfo.
type procMap struct {
	id   ebpf.MapID
	info map[string]string
}

// processMaps lists the BPF maps this process holds open (the
// datapath's), each once.
func processMaps() ([]procMap, error) {
	fds, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return nil, err
	}
	seen := map[uint64]bool{}
	var out []procMap
	for _, fd := range fds {
		if target, err := os.Readlink(filepath.Join("/proc/self/fd", fd.Name())); err != nil || target != "anon_inode:bpf-map" {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc/self/fdinfo", fd.Name()))
		if err != nil {
			continue // closed meanwhile
		}
		info := map[string]string{}
		for _, line := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok {
				info[k] = strings.TrimSpace(v)
			}
		}
		id, err := strconv.ParseUint(info["map_id"], 10, 32)
		if err != nil || seen[id] {
			continue
		}
		seen[id] = true
		out = append(out, procMap{id: ebpf.MapID(id), info: info})
	}
	if len(out) == 0 {
		return nil, errors.New("no BPF map open in this process")
	}
	return out, nil
}

// mapMemory reads the BPF maps this process holds open, as bpftool map
// show does: memlock is what the kernel charges for each map.
func mapMemory() ([]MapMemory, error) {
	pms, err := processMaps()
	if err != nil {
		return nil, err
	}
	var out []MapMemory
	for _, pm := range pms {
		m := MapMemory{}
		m.Memlock, _ = strconv.ParseInt(pm.info["memlock"], 10, 64)
		if mm, err := ebpf.NewMapFromID(pm.id); err == nil {
			if mi, err := mm.Info(); err == nil {
				m.Name, m.Type, m.MaxEntries = mi.Name, mi.Type.String(), mi.MaxEntries
			}
			mm.Close()
		}
		out = append(out, m)
	}
	slices.SortFunc(out, func(a, b MapMemory) int {
		if a.Memlock != b.Memlock {
			return int(b.Memlock - a.Memlock)
		}
		return strings.Compare(a.Name, b.Name)
	})
	return out, nil
}

// countedTypes are the maps whose entries mapEntries counts: those that
// hold only what was put in them.
var countedTypes = []ebpf.MapType{ebpf.Hash, ebpf.LRUHash, ebpf.PerCPUHash, ebpf.LRUCPUHash, ebpf.LPMTrie, ebpf.SockHash}

// mapEntries counts the entries of every hash-type map this process holds
// open, by name; lru names the LRU ones (which forget entries only when
// full).
func mapEntries() (out map[string]int, lru map[string]bool, err error) {
	pms, err := processMaps()
	if err != nil {
		return nil, nil, err
	}
	out, lru = map[string]int{}, map[string]bool{}
	for _, pm := range pms {
		m, err := ebpf.NewMapFromID(pm.id)
		if err != nil {
			return nil, nil, fmt.Errorf("map %d: %w", pm.id, err)
		}
		mi, err := m.Info()
		if err == nil && slices.Contains(countedTypes, mi.Type) {
			out[mi.Name], err = countKeys(m)
			lru[mi.Name] = mi.Type == ebpf.LRUHash || mi.Type == ebpf.LRUCPUHash
		}
		m.Close()
		if err != nil {
			return nil, nil, fmt.Errorf("map %d: %w", pm.id, err)
		}
	}
	return out, lru, nil
}

// countKeys walks m's keys (at most twice its size: a walk that entries
// deleted meanwhile restart ends anyway).
func countKeys(m *ebpf.Map) (int, error) {
	var prev []byte
	next := make([]byte, m.KeySize())
	n := 0
	for n < 2*int(m.MaxEntries()) {
		var err error
		if prev == nil {
			err = m.NextKey(nil, next)
		} else {
			err = m.NextKey(prev, next)
		}
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			break
		}
		if err != nil {
			return 0, err
		}
		n++
		prev = slices.Clone(next)
	}
	return n, nil
}

// WriteTable prints the report for people.
func (rep *LimitsReport) WriteTable(w io.Writer) error {
	var b strings.Builder
	fmt.Fprintf(&b, "new connection cost by registered pods (%s)\n\n", rep.Machine.Kernel)
	fmt.Fprintf(&b, "%-8s %-10s %-12s %-10s %-10s %s\n", "pods", "policy IPs", "conns/s", "p50 us", "p99 us", "other CPU %")
	for _, p := range rep.Points {
		fmt.Fprintf(&b, "%-8d %-10d %-12.0f %-10.1f %-10.1f %.0f\n", p.Pods, p.PolicyIPs, p.ConnsPerS, p.P50US, p.P99US, p.ForeignPct)
	}
	fmt.Fprintf(&b, "\nmedians: %d pods %.0f conns/s p50 %.1fus p99 %.1fus; %d pods %.0f conns/s p50 %.1fus p99 %.1fus\n",
		rep.Small.Pods, rep.Small.ConnsPerS, rep.Small.P50US, rep.Small.P99US, rep.Large.Pods, rep.Large.ConnsPerS, rep.Large.P50US, rep.Large.P99US)
	fmt.Fprintf(&b, "ratio %d/%d pods: conns/s x%.2f, p50 x%.2f, p99 x%.2f (1.00: flat)\n", rep.Large.Pods, rep.Small.Pods, rep.RateRatio, rep.P50Ratio, rep.P99Ratio)
	fmt.Fprintf(&b, "registering pod %d took %.2f ms\n\n", rep.Large.Pods, rep.RegisterMS)
	fmt.Fprintf(&b, "BPF map memory (memlock): %.1f MiB in %d maps\n", float64(rep.MemlockBytes)/(1<<20), len(rep.Maps))
	for _, m := range rep.Maps {
		fmt.Fprintf(&b, "  %-20s %-16s %8d entries %10.1f KiB\n", m.Name, m.Type, m.MaxEntries, float64(m.Memlock)/1024)
	}
	_, err := io.WriteString(w, b.String())
	return err
}
