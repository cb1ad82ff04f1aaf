package policy

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"testing"

	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	"sigs.k8s.io/yaml"
)

// testWorkloads is the world every golden case runs in: a few namespaces,
// two workloads sharing a service account, one with the default service
// account, dual-stack and IPv4-only addresses.
func testWorkloads() []Workload {
	ip := func(ss ...string) []netip.Addr {
		out := make([]netip.Addr, len(ss))
		for i, s := range ss {
			out[i] = netip.MustParseAddr(s)
		}
		return out
	}
	return []Workload{
		{Namespace: "istio-system", Name: "ingressgateway", ServiceAccount: "istio-ingressgateway",
			Labels: map[string]string{"app": "istio-ingressgateway"}, IPs: ip("10.0.0.10")},
		{Namespace: "default", Name: "frontend", ServiceAccount: "frontend",
			Labels: map[string]string{"app": "frontend"}, IPs: ip("10.0.1.1", "fd00::1:1")},
		{Namespace: "default", Name: "backend", ServiceAccount: "backend",
			Labels: map[string]string{"app": "backend", "version": "v1"}, IPs: ip("10.0.1.2", "fd00::1:2")},
		{Namespace: "default", Name: "backend-v2", ServiceAccount: "backend",
			Labels: map[string]string{"app": "backend", "version": "v2"}, IPs: ip("10.0.1.3")},
		{Namespace: "default", Name: "db", ServiceAccount: "db",
			Labels: map[string]string{"app": "db"}, IPs: ip("10.0.1.4")},
		{Namespace: "prod", Name: "api", ServiceAccount: "api",
			Labels: map[string]string{"app": "api"}, IPs: ip("10.0.2.1", "fd00::2:1")},
		{Namespace: "prod", Name: "worker",
			Labels: map[string]string{"app": "worker"}, IPs: ip("10.0.2.2")},
		{Namespace: "legacy", Name: "client", ServiceAccount: "client",
			Labels: map[string]string{"app": "client"}, IPs: ip("10.1.0.5")},
	}
}

func testServices() []Service {
	return []Service{
		{Namespace: "default", Name: "backend", Selector: map[string]string{"app": "backend"}},
		{Namespace: "default", Name: "db", Selector: map[string]string{"app": "db"}},
		{Namespace: "prod", Name: "api", Selector: map[string]string{"app": "api"}},
		{Namespace: "default", Name: "external"}, // no selector: no pods
	}
}

// unknownSources are addresses of no workload.
var unknownSources = []netip.Addr{netip.MustParseAddr("192.0.2.7"), netip.MustParseAddr("2001:db8::7")}

// parsePolicies reads a multi-document YAML stream of AuthorizationPolicies.
func parsePolicies(data []byte) ([]*securityv1.AuthorizationPolicy, error) {
	var out []*securityv1.AuthorizationPolicy
	for i, doc := range bytes.Split(append([]byte("\n"), data...), []byte("\n---")) {
		js, err := yaml.YAMLToJSON(doc)
		if err != nil {
			return nil, fmt.Errorf("document %d: %w", i+1, err)
		}
		if t := bytes.TrimSpace(js); bytes.Equal(t, []byte("null")) || len(t) == 0 {
			continue
		}
		var tm struct {
			Kind string `json:"kind"`
		}
		if err := json.Unmarshal(js, &tm); err != nil {
			return nil, fmt.Errorf("document %d: %w", i+1, err)
		}
		if tm.Kind != "AuthorizationPolicy" {
			return nil, fmt.Errorf("document %d: kind %q, want AuthorizationPolicy", i+1, tm.Kind)
		}
		p := &securityv1.AuthorizationPolicy{}
		if err := json.Unmarshal(js, p); err != nil {
			return nil, fmt.Errorf("document %d: %w", i+1, err)
		}
		out = append(out, p)
	}
	return out, nil
}

func loadPolicies(tb testing.TB, path string) []*securityv1.AuthorizationPolicy {
	tb.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		tb.Fatal(err)
	}
	ps, err := parsePolicies(data)
	if err != nil {
		tb.Fatalf("%s: %v", path, err)
	}
	return ps
}
