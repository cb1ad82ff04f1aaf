package datapath

import (
	"fmt"
	"sort"

	"github.com/cilium/ebpf"

	"github.com/meshsplice/meshsplice/redirect"
)

// A kernel table at its limit never breaks a connection silently: each
// program that meets a full map (or ring buffer) takes the fallback below
// and counts it. PressureCounters names those counters; the agent logs
// their growth once per interval and reports it on /readyz, and `meshsplice
// status` lists the ones that ever moved and the tables that are full now.
//
// Nothing is evicted silently either: ms_orig_dst is the only LRU a
// captured connection depends on, and an eviction fails the sidecar's
// SO_ORIGINAL_DST (ENOENT, so Envoy closes that one connection rather than
// forward it to a wrong destination) and is counted twice
// (getsockopt.orig_dst_missing at once, sockops.orig_dst_evicted at close).
// A captured connect is never sent on without the sidecar: the sidecar is
// where Istio's policy, mTLS and telemetry live, and iptables capture never
// bypasses it either.
var PressureCounters = []PressureCounter{
	{"sockops.sock_insert_failed", redirect.CaptureMapMsSocks,
		"a connection was not spliced (socket map full, or no socket storage): it uses plain TCP"},
	{"connect.no_storage", redirect.CaptureMapMsSkState,
		"a connect could not keep its original destination (no socket storage): it failed with EPERM rather than go around the sidecar"},
	{"getsockopt.orig_dst_missing", redirect.CaptureMapMsOrigDst,
		"a sidecar asked for an original destination the kernel no longer held: SO_ORIGINAL_DST failed with ENOENT"},
	{"sockops.orig_dst_evicted", redirect.CaptureMapMsOrigDst,
		"an original destination was evicted before its connection closed (map full)"},
	{"sockops.listener_event_lost", redirect.CaptureMapMsEvents,
		"a sidecar listener event was dropped (ring buffer full): the periodic resync registers the listener"},
	{"policy.denial_not_recorded", redirect.CaptureMapMsDenials,
		"a denial was enforced but not logged (ring buffer full)"},
}

// PressureCounter is a counter that moves only when a kernel table is full.
type PressureCounter struct {
	Counter string `json:"counter"`
	Map     string `json:"map"`
	Effect  string `json:"effect"`
}

// Pressure is a kernel table at its limit now (Entries == MaxEntries), or
// a pressure counter that moved (Count > 0, since the datapath was
// attached).
type Pressure struct {
	Map        string `json:"map"`
	Counter    string `json:"counter,omitempty"`
	Count      uint64 `json:"count,omitempty"`
	Entries    int    `json:"entries,omitempty"`
	MaxEntries int    `json:"max_entries,omitempty"`
	Effect     string `json:"effect"`
}

func (p Pressure) String() string {
	if p.Counter != "" {
		return fmt.Sprintf("%s: %s x%d: %s", p.Map, p.Counter, p.Count, p.Effect)
	}
	return fmt.Sprintf("%s full (%d/%d): %s", p.Map, p.Entries, p.MaxEntries, p.Effect)
}

// PressureOf lists the pressure counters in c that are not zero.
func PressureOf(c Counters) []Pressure {
	var out []Pressure
	for _, pc := range PressureCounters {
		if n := c[pc.Counter]; n > 0 {
			out = append(out, Pressure{Map: pc.Map, Counter: pc.Counter, Count: n, Effect: pc.Effect})
		}
	}
	return out
}

// fullEffects says what a full table means, for the tables Inspect counts.
var fullEffects = map[string]string{
	redirect.CaptureMapMsSocks:   "new connections are not spliced: they use plain TCP",
	redirect.CaptureMapMsOrigDst: "new captured connections evict the oldest original destinations",
	redirect.CaptureMapMsPods:    "new pods cannot be registered (CNI ADD fails, kubelet retries it)",
	redirect.CaptureMapMsPodIps:  "new pods cannot be registered (CNI ADD fails, kubelet retries it)",
	redirect.CaptureMapMsPorts:   "pods with more port rules cannot be registered",
	redirect.CaptureMapMsRanges:  "pods with more address ranges cannot be registered",
}

// fullPressure reports m when it holds as many entries as it can.
func fullPressure(name string, m *ebpf.Map, entries int) []Pressure {
	if max := int(m.MaxEntries()); entries < max {
		return nil
	}
	return []Pressure{{Map: name, Entries: entries, MaxEntries: int(m.MaxEntries()), Effect: fullEffects[name]}}
}

// registryPressure reports the registry tables that are full.
func registryPressure(maps map[string]*ebpf.Map, pods []Pod) []Pressure {
	counts := map[string]int{redirect.CaptureMapMsPods: len(pods)}
	for _, p := range pods {
		counts[redirect.CaptureMapMsPodIps] += len(p.IPs)
	}
	var out []Pressure
	names := make([]string, 0, len(counts))
	for n := range counts {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		out = append(out, fullPressure(n, maps[n], counts[n])...)
	}
	return out
}
