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
//	/metrics  Prometheus: meshsplice_datapath_events_total{program,event}
//	          (every kernel counter), meshsplice_pods{capture,splice}
//	/pods     the registered pods as JSON
//	/denials  the most recent connections policy denied, with the policies
func (a *Agent) metricsHandler() http.Handler {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	reg.MustRegister(&collector{a: a})
	reg.MustRegister(&inboundCollector{a: a})
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("ok\n")) })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, r *http.Request) {
		if err := a.Health(r.Context()); err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		w.Write([]byte("ready\n"))
	})
	mux.HandleFunc("/pods", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(a.Pods())
	})
	mux.HandleFunc("/denials", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(a.dp.Denials())
	})
	return mux
}

var (
	eventsDesc = prometheus.NewDesc("meshsplice_datapath_events_total",
		"What the kernel programs did, by program and event (see meshsplice status).",
		[]string{"program", "event"}, nil)
	podsDesc = prometheus.NewDesc("meshsplice_pods",
		"Pods registered with the agent.", []string{"capture", "splice"}, nil)
)

// collector reads the kernel counters at scrape time.
type collector struct{ a *Agent }

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	ch <- eventsDesc
	ch <- podsDesc
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
	for _, p := range c.a.Pods() {
		n[key{p.Capture, p.Splice}]++
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
