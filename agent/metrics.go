package agent

import (
	"encoding/json"
	"net/http"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// metricsHandler serves:
//
//	/healthz  200 while the process runs
//	/readyz   200 once the datapath is attached and the CNI API serves
//	          (naming the kernel features it runs without); 503 while a
//	          kernel table overflowed in the last PressureInterval
//	          (pressure.go) or the policy does not fit its maps
//	/metrics  Prometheus: meshsplice_datapath_events_total{program,event}
//	          (every kernel counter), meshsplice_pods{capture,splice},
//	          meshsplice_policy_pods{enforced},
//	          meshsplice_policy_not_applied_total, meshsplice_policy_applied,
//	          meshsplice_apply_failures_total{what} (failures.go),
//	          meshsplice_drift_pods, meshsplice_drift_node_switches,
//	          meshsplice_drift_checks_total{outcome} (drift_agent.go)
//	/pods     the registered pods as JSON, with policy.enforced and
//	          policy.reason per pod
//	/denials  the most recent connections policy denied, with the policies
func (a *Agent) metricsHandler() http.Handler {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	reg.MustRegister(&collector{a: a})
	reg.MustRegister(&inboundCollector{a: a})
	reg.MustRegister(&driftCollector{a: a})
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("ok\n")) })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, r *http.Request) {
		if err := a.Health(r.Context()); err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		var body strings.Builder
		if d := a.degraded(); len(d) > 0 {
			body.WriteString(errDegraded.Error() + "\n")
			for _, c := range d {
				body.WriteString("  " + c + "\n")
			}
			http.Error(w, body.String(), http.StatusServiceUnavailable)
			return
		}
		body.WriteString("ready\n")
		for _, f := range a.dp.MissingFeatures() {
			body.WriteString("running without " + f.Name + " (needs Linux >= " + f.Kernel + "): " + f.Without + "\n")
		}
		w.Write([]byte(body.String()))
	})
	mux.HandleFunc("/pods", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(a.Pods())
	})
	mux.HandleFunc("/denials", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(a.dp.Denials())
	})
	return readOnly(mux)
}

var (
	eventsDesc = prometheus.NewDesc("meshsplice_datapath_events_total",
		"What the kernel programs did, by program and event (see meshsplice status).",
		[]string{"program", "event"}, nil)
	podsDesc = prometheus.NewDesc("meshsplice_pods",
		"Pods registered with the agent.", []string{"capture", "splice"}, nil)
	policyPodsDesc = prometheus.NewDesc("meshsplice_policy_pods",
		"Registered pods by whether the kernel enforces their authorization policy (/pods says why not).",
		[]string{"enforced"}, nil)
	policyNotAppliedDesc = prometheus.NewDesc("meshsplice_policy_not_applied_total",
		"Authorization policies the kernel refused as a whole (too big for its maps, or a write failed); the previous one stayed in force.",
		nil, nil)
	failuresDesc = prometheus.NewDesc("meshsplice_apply_failures_total",
		"Failures to apply something (a pod, a policy, node switches, a state file), by kind; each is logged too.",
		[]string{"what"}, nil)
	policyAppliedDesc = prometheus.NewDesc("meshsplice_policy_applied",
		"1 when the kernel holds the latest authorization policy, 0 when the last one was not applied.", nil, nil)
)

// collector reads the kernel counters at scrape time.
type collector struct{ a *Agent }

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	ch <- eventsDesc
	ch <- podsDesc
	ch <- policyPodsDesc
	ch <- policyNotAppliedDesc
	ch <- policyAppliedDesc
	ch <- failuresDesc
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	if counters, err := c.a.dp.Counters(); err == nil {
		for name, v := range counters {
			program, event, _ := strings.Cut(name, ".")
			ch <- prometheus.MustNewConstMetric(eventsDesc, prometheus.CounterValue, float64(v), program, event)
		}
	}
	type key struct{ capture, splice bool }
	n := map[key]int{}
	enforced := map[bool]int{false: 0, true: 0}
	for _, p := range c.a.Pods() {
		n[key{p.Capture, p.Splice}]++
		enforced[p.Policy != nil && p.Policy.Enforced]++
	}
	for e, v := range enforced {
		ch <- prometheus.MustNewConstMetric(policyPodsDesc, prometheus.GaugeValue, float64(v), boolLabel(e))
	}
	ps := c.a.dp.PolicyState()
	ch <- prometheus.MustNewConstMetric(policyNotAppliedDesc, prometheus.CounterValue, float64(ps.NotApplied))
	applied := 1.0
	if ps.LastError != "" {
		applied = 0
	}
	ch <- prometheus.MustNewConstMetric(policyAppliedDesc, prometheus.GaugeValue, applied)
	kinds, fails := c.a.failures.snapshot()
	for _, k := range kinds {
		ch <- prometheus.MustNewConstMetric(failuresDesc, prometheus.CounterValue, float64(fails[k]), k)
	}
	for k, v := range n {
		ch <- prometheus.MustNewConstMetric(podsDesc, prometheus.GaugeValue, float64(v),
			boolLabel(k.capture), boolLabel(k.splice))
	}
}

func boolLabel(b bool) string {
	if b {
		return "true"
	}
	return "false"
}
