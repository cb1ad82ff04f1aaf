package agent

import (
	"context"
	"errors"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshsplice/meshsplice/datapath"
)

// DefaultDriftInterval is how often the agent compares the kernel with
// the config when nothing was applied in between.
const DefaultDriftInterval = 30 * time.Second

// After an apply the check waits driftSettle, and at least driftMinGap
// after the previous check.
const (
	driftSettle = 200 * time.Millisecond
	driftMinGap = time.Second
)

// The agent's drift check (drift.go) runs every DriftInterval and soon
// after each apply. A pod found drifting is logged, counted in the gauge
// meshsplice_drift_pods and reported as an Event (reason KernelDrift);
// the agent then applies everything again once. If the same difference is
// still there after that, it is left as it is and reported until it
// changes: a difference an apply cannot mend (an edit the agent does not
// follow yet, a table the policy does not fit) must not turn into a loop
// of re-applies.

// driftState is the outcome of the agent's drift checks. Its own lock:
// the metrics collector reads it without a.mu.
type driftState struct {
	once sync.Once
	poke chan struct{}

	mu       sync.Mutex
	checked  bool
	pods     int               // pods that differ
	node     int               // node switch differences
	ok, errs uint64            // drift checks done, by outcome
	reported map[string]string // pod -> the differences last reported
	repaired map[string]string // pod -> the differences an apply was tried for
}

func (s *driftState) pokes() chan struct{} {
	s.once.Do(func() { s.poke = make(chan struct{}, 1) })
	return s.poke
}

// soon asks for a drift check (after an apply). Never blocks.
func (s *driftState) soon() {
	select {
	case s.pokes() <- struct{}{}:
	default:
	}
}

// driftLoop checks for drift every interval and after each apply until
// ctx ends.
func (a *Agent) driftLoop(ctx context.Context) {
	interval := a.cfg.DriftInterval
	if interval <= 0 {
		interval = DefaultDriftInterval
	}
	tick := time.NewTicker(interval)
	defer tick.Stop()
	var last time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		case <-a.drift.pokes():
			// Let a burst of applies settle first, and compile the policy
			// for a check at most once a second under churn.
			wait := max(driftSettle, time.Until(last.Add(driftMinGap)))
			select {
			case <-ctx.Done():
				return
			case <-time.After(wait):
			}
		}
		a.checkDrift()
		last = time.Now()
	}
}

// driftInput snapshots what the expected state is made of. Called with
// a.mu held.
func (a *Agent) driftInput() (driftInput, error) {
	ids, err := cloneAllocator(a.ids)
	if err != nil {
		return driftInput{}, err
	}
	pods := make(map[string]*pod, len(a.pods))
	for id, p := range a.pods {
		cp := *p
		pods[id] = &cp
	}
	node := a.nodeSettings()
	appSplice, _ := a.dp.AppSpliceDefault()
	return driftInput{cfg: a.istio, node: node, pods: pods, ids: ids, hostIDs: datapath.HostProxyIDs,
		gone: datapath.NetnsGone, appSpliceDefault: appSplice}, nil
}

// CheckDrift runs a drift check now and returns its report (tests, and
// the periodic check).
func (a *Agent) CheckDrift() (DriftReport, error) {
	select {
	case <-a.loaded:
	default:
		return DriftReport{}, errors.New("no Istio configuration yet")
	}
	// The snapshot and the kernel are read together, under the lock every
	// apply holds, so a check never sees half of an apply.
	a.mu.Lock()
	in, err := a.driftInput()
	var k *datapath.KernelState
	if err == nil {
		k, err = a.dp.KernelState()
	}
	a.mu.Unlock()
	if err != nil {
		return DriftReport{}, err
	}
	return computeDrift(in, k)
}

// checkDrift is the periodic check: it records, reports and mends.
func (a *Agent) checkDrift() {
	select {
	case <-a.loaded:
	default:
		return // nothing to compare with yet
	}
	rep, err := a.CheckDrift()
	s := &a.drift
	s.mu.Lock()
	if err != nil {
		s.errs++
		s.mu.Unlock()
		a.log.Error("drift check", "error", err)
		return
	}
	s.ok++
	s.checked = true
	s.pods, s.node = len(rep.Pods), len(rep.Node)
	if s.reported == nil {
		s.reported, s.repaired = map[string]string{}, map[string]string{}
	}
	now := map[string]string{}
	var fresh []PodDrift
	repair, repairPolicy := false, false
	for _, d := range rep.Pods {
		sum := d.Summary()
		for _, it := range d.Items {
			if strings.HasPrefix(it.Field, "policy of ") {
				repairPolicy = true
			}
		}
		now[d.Pod] = sum
		if s.reported[d.Pod] != sum {
			fresh = append(fresh, d)
		}
		if s.repaired[d.Pod] != sum {
			s.repaired[d.Pod] = sum
			repair = true
		}
	}
	for pod := range s.repaired {
		if _, ok := now[pod]; !ok {
			delete(s.repaired, pod)
		}
	}
	s.reported = now
	nodeSum := ""
	for _, it := range rep.Node {
		nodeSum += it.Field + ": config " + it.Config + ", kernel " + it.Kernel + "; "
	}
	if nodeSum != "" && s.repaired[""] != nodeSum {
		s.repaired[""] = nodeSum
		repair = true
	} else if nodeSum == "" {
		delete(s.repaired, "")
	}
	s.mu.Unlock()

	for _, d := range fresh {
		a.log.Warn("kernel drift: the kernel does not hold what the config says", "pod", d.Pod,
			"netns_cookie", d.Cookie, "differences", d.Summary())
		if a.cfg.Events != nil {
			a.cfg.Events.Failure("drift", d.Pod, errors.New(d.Summary()))
		}
	}
	if nodeSum != "" {
		a.log.Warn("kernel drift in the node switches", "differences", nodeSum)
	}
	if !repair {
		if rep.Drifted() {
			a.log.Debug("kernel drift persists after a re-apply; left as it is", "pods", len(rep.Pods))
		}
		return
	}
	a.log.Info("applying everything again to mend kernel drift", "pods", len(rep.Pods), "node", len(rep.Node))
	a.mu.Lock()
	if repairPolicy {
		// The agent skips a policy equal to the one it applied last,
		// which is what the kernel no longer holds. Only then: a forced
		// swap needs room for two copies of the policy.
		a.applied = datapath.Policy{}
	}
	ok := a.reconcile()
	a.mu.Unlock()
	if !ok {
		a.needRetry()
	}
}

var (
	driftPodsDesc = prometheus.NewDesc("meshsplice_drift_pods",
		"Pods whose kernel state differs from what the config says, at the last drift check (pods; meshsplice check --drift shows the differences).",
		nil, nil)
	driftNodeDesc = prometheus.NewDesc("meshsplice_drift_node_switches",
		"Node switches whose kernel value differs from the config, at the last drift check (switches).", nil, nil)
	driftChecksDesc = prometheus.NewDesc("meshsplice_drift_checks_total",
		"Drift checks done (checks), by outcome: ok or error (the check itself failed; see the log).",
		[]string{"outcome"}, nil)
)

// driftCollector exports the last drift check.
type driftCollector struct{ a *Agent }

func (c *driftCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- driftPodsDesc
	ch <- driftNodeDesc
	ch <- driftChecksDesc
}

func (c *driftCollector) Collect(ch chan<- prometheus.Metric) {
	s := &c.a.drift
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.checked {
		ch <- prometheus.MustNewConstMetric(driftPodsDesc, prometheus.GaugeValue, float64(s.pods))
		ch <- prometheus.MustNewConstMetric(driftNodeDesc, prometheus.GaugeValue, float64(s.node))
	}
	ch <- prometheus.MustNewConstMetric(driftChecksDesc, prometheus.CounterValue, float64(s.ok), "ok")
	ch <- prometheus.MustNewConstMetric(driftChecksDesc, prometheus.CounterValue, float64(s.errs), "error")
}
