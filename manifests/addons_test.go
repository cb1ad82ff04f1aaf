package manifests

import (
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"
)

// TestAddons: the dashboard queries only metrics the agent exports and
// addons/README.md documents, filters only on kernel counters that exist,
// and the PodMonitor selects the chart's pods on their metrics port.
func TestAddons(t *testing.T) {
	var dash struct {
		Panels []struct {
			Title   string
			Targets []struct{ Expr string }
		}
	}
	if err := json.Unmarshal(must(os.ReadFile("addons/grafana-dashboard.json")), &dash); err != nil {
		t.Fatal(err)
	}
	var agentSrc strings.Builder
	files, _ := filepath.Glob("../agent/*.go")
	for _, f := range files {
		if !strings.HasSuffix(f, "_test.go") {
			agentSrc.Write(must(os.ReadFile(f)))
		}
	}
	counters := string(must(os.ReadFile("../datapath/counters.go")))
	readme := string(must(os.ReadFile("addons/README.md")))
	metricRE := regexp.MustCompile(`meshsplice_[a-z_]+`)
	eventRE := regexp.MustCompile(`program="([a-z_]+)",event="([a-z_]+)"`)
	exprs := 0
	for _, p := range dash.Panels {
		for _, tg := range p.Targets {
			exprs++
			for _, m := range metricRE.FindAllString(tg.Expr, -1) {
				if !strings.Contains(agentSrc.String(), `prometheus.NewDesc("`+m+`"`) {
					t.Errorf("panel %q: the agent exports no %s", p.Title, m)
				}
				if !strings.Contains(readme, "`"+m+"`") {
					t.Errorf("panel %q: addons/README.md does not document %s", p.Title, m)
				}
			}
			for _, m := range eventRE.FindAllStringSubmatch(tg.Expr, -1) {
				if !strings.Contains(counters, `{"`+m[1]+`", "`+m[2]+`"}`) {
					t.Errorf("panel %q: no kernel counter %s/%s", p.Title, m[1], m[2])
				}
			}
		}
	}
	if exprs < 8 {
		t.Errorf("the dashboard has %d queries", exprs)
	}
	var pm struct {
		Kind string
		Spec struct {
			Selector            struct{ MatchLabels map[string]string }
			PodMetricsEndpoints []struct{ Port, Path string }
		}
	}
	if err := yaml.Unmarshal(must(os.ReadFile("addons/podmonitor.yaml")), &pm); err != nil {
		t.Fatal(err)
	}
	if pm.Kind != "PodMonitor" || pm.Spec.Selector.MatchLabels["app.kubernetes.io/name"] != "meshsplice" ||
		len(pm.Spec.PodMetricsEndpoints) != 1 || pm.Spec.PodMetricsEndpoints[0].Port != "http-metrics" ||
		!strings.Contains(string(must(os.ReadFile("meshsplice.yaml"))), "name: http-metrics") {
		t.Errorf("PodMonitor %+v does not select the chart's metrics port", pm)
	}
}
