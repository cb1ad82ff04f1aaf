package agent

import (
	"net/netip"
	"reflect"
	"testing"

	"github.com/meshsplice/meshsplice/istio"
	"github.com/meshsplice/meshsplice/policy"
)

// TestClusterWorkloads: injected pods of the cluster become policy
// workloads with their identity; pods without a sidecar, and pods an IP of
// which a local pod or WorkloadEntry holds, do not.
func TestClusterWorkloads(t *testing.T) {
	ip := netip.MustParseAddr
	c := istio.Config{PodIPs: map[netip.Addr]istio.PodIdentity{
		ip("10.0.1.1"): {Namespace: "a", Name: "web", ServiceAccount: "web-sa", NodeName: "n2", Injected: true},
		ip("fd00::1"):  {Namespace: "a", Name: "web", ServiceAccount: "web-sa", NodeName: "n2", Injected: true},
		ip("10.0.1.2"): {Namespace: "a", Name: "plain", ServiceAccount: "default", NodeName: "n2"},
		ip("10.0.1.3"): {Namespace: "b", Name: "local", ServiceAccount: "x", NodeName: "n1", Injected: true},
		ip("fd00::3"):  {Namespace: "b", Name: "local", ServiceAccount: "x", NodeName: "n1", Injected: true},
	}}
	known := map[netip.Addr]string{ip("10.0.1.3"): "b/local"}
	got := clusterWorkloads(c, known)
	want := []policy.Workload{{Namespace: "a", Name: "web", ServiceAccount: "web-sa", IPs: []netip.Addr{ip("10.0.1.1"), ip("fd00::1")}}}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("clusterWorkloads = %+v, want %+v", got, want)
	}
	if got := clusterWorkloads(istio.Config{}, nil); len(got) != 0 {
		t.Errorf("no Kubernetes source: %+v", got)
	}
}
