package agent

import (
	"net/netip"
	"reflect"
	"testing"

	networkingv1alpha3 "istio.io/api/networking/v1alpha3"
	securityv1beta1 "istio.io/api/security/v1beta1"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"

	"github.com/meshsplice/meshsplice/agent/api"
	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/istio"
	"github.com/meshsplice/meshsplice/policy"
)

// TestPlaintextIPs: only pods surely without a sidecar are plaintext; an
// injected pod, a proxy without injection, a terminating pod, a pod whose
// annotations are unknown, a WorkloadEntry and an unknown address never.
func TestPlaintextIPs(t *testing.T) {
	ip := netip.MustParseAddr
	status := map[string]string{istio.AnnotationStatus: "{}"}
	c := istio.Config{PodIPs: map[netip.Addr]istio.PodIdentity{
		ip("10.0.1.1"): {Namespace: "a", Name: "plain"},
		ip("fd00::1"):  {Namespace: "a", Name: "plain"},
		ip("10.0.1.2"): {Namespace: "a", Name: "meshed", Injected: true},
		ip("10.0.1.3"): {Namespace: "a", Name: "gateway", Proxy: true},
		ip("10.0.1.4"): {Namespace: "a", Name: "going", Terminating: true},
		ip("10.0.1.5"): {Namespace: "a", Name: "vm-twin"},
		ip("10.0.1.6"): {Namespace: "a", Name: "registered-meshed"},
		ip("10.0.1.7"): {Namespace: "a", Name: "recovered"},
	}}
	c.WorkloadEntries = []*networkingv1.WorkloadEntry{{Spec: networkingv1alpha3.WorkloadEntry{Address: "10.0.1.5"}}}
	pods := map[string]*pod{
		// Standalone registrations (no PodIPs entry).
		"c1": {Reg: api.PodRegistration{IPs: []netip.Addr{ip("10.0.2.1")}, Annotations: map[string]string{"x": "y"}}},
		"c2": {Reg: api.PodRegistration{IPs: []netip.Addr{ip("10.0.2.2")}, Annotations: status}},
		"c3": {Reg: api.PodRegistration{IPs: []netip.Addr{ip("10.0.2.3")}}}, // annotations not passed
		"c4": {Reg: api.PodRegistration{IPs: []netip.Addr{ip("10.0.2.4")}, Annotations: map[string]string{"x": "y"}}, Recovered: true},
		// Kubernetes: the registration says injected, the API server not yet.
		"c5": {Reg: api.PodRegistration{IPs: []netip.Addr{ip("10.0.1.6")}, Annotations: status}},
		// Kubernetes: rebuilt from the kernel, the API server knows it.
		"c6": {Reg: api.PodRegistration{IPs: []netip.Addr{ip("10.0.1.7")}}, Recovered: true},
	}
	got := plaintextIPs(c, pods)
	want := map[netip.Addr]bool{ip("10.0.1.1"): true, ip("fd00::1"): true, ip("10.0.1.7"): true, ip("10.0.2.1"): true}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("plaintextIPs = %v, want %v", got, want)
	}
}

// TestMarkPlaintext: the flag is written only when a set has a STRICT
// atom, on known entries and as new unknown-identity entries.
func TestMarkPlaintext(t *testing.T) {
	ip := netip.MustParseAddr
	plain := map[netip.Addr]bool{ip("10.0.0.1"): true, ip("10.0.0.2"): true}
	dp := datapath.Policy{IPs: map[netip.Addr]datapath.IPPolicy{ip("10.0.0.1"): {Identity: 7, Set: 0}}}
	markPlaintext(&dp, policy.Result{Sets: []policy.PolicySet{{DenyMask: 1}}}, plain)
	if len(dp.IPs) != 1 || dp.IPs[ip("10.0.0.1")].Plaintext {
		t.Errorf("no STRICT atom: %v, want nothing flagged or added", dp.IPs)
	}
	markPlaintext(&dp, policy.Result{Sets: []policy.PolicySet{{DenyMask: 1, PlaintextMask: 1}}}, plain)
	want := map[netip.Addr]datapath.IPPolicy{
		ip("10.0.0.1"): {Identity: 7, Set: 0, Plaintext: true},
		ip("10.0.0.2"): {Set: -1, Plaintext: true},
	}
	if !reflect.DeepEqual(dp.IPs, want) {
		t.Errorf("with a STRICT atom: %v, want %v", dp.IPs, want)
	}
}

// TestNoIdentityForPodsWithoutSidecar: a registered pod that is not known
// to have a sidecar shows the destination's sidecar no certificate, so no
// principal and no namespace: a DENY by its service account's principal
// does not match it there, and the kernel must not attribute one to it
// either (it would deny what the sidecar allows). It stays an unknown
// source (never denied by principal or namespace; ipBlocks still apply).
func TestNoIdentityForPodsWithoutSidecar(t *testing.T) {
	ip := netip.MustParseAddr
	deny := &securityv1.AuthorizationPolicy{}
	deny.Namespace, deny.Name = "shop", "deny-legacy"
	deny.Spec.Action = securityv1beta1.AuthorizationPolicy_DENY
	deny.Spec.Rules = []*securityv1beta1.Rule{{From: []*securityv1beta1.Rule_From{{Source: &securityv1beta1.Source{
		Principals: []string{"cluster.local/ns/shop/sa/legacy"}}}}}}
	status := map[string]string{istio.AnnotationStatus: "{}"}
	reg := func(name string, addr string, ann map[string]string) *pod {
		return &pod{Reg: api.PodRegistration{PodNamespace: "shop", PodName: name, ServiceAccount: "legacy",
			IPs: []netip.Addr{ip(addr)}, Annotations: ann, Labels: map[string]string{"app": name}}}
	}
	pods := map[string]*pod{
		"web":      reg("web", "10.0.2.1", status),
		"meshed":   reg("meshed", "10.0.2.2", status),
		"plain":    reg("plain", "10.0.2.3", map[string]string{"x": "y"}),
		"no-annot": reg("no-annot", "10.0.2.4", nil),
	}
	c := istio.Config{Mesh: istio.DefaultMeshConfig(), AuthorizationPolicies: []*securityv1.AuthorizationPolicy{deny}}
	in, ipWorkload := policyInput(c, pods)
	res, err := policy.Compile(in, policy.NewAllocator())
	if err != nil {
		t.Fatal(err)
	}
	dp := kernelPolicy(res, ipWorkload)
	if _, ok := dp.IPs[ip("10.0.2.2")]; !ok {
		t.Fatalf("the meshed pod has no identity in the kernel policy: %v", dp.IPs)
	}
	for _, a := range []string{"10.0.2.3", "10.0.2.4"} {
		if p, ok := dp.IPs[ip(a)]; ok {
			t.Errorf("%s (no sidecar known) has kernel identity %d: a DENY by its service account would refuse what the sidecar allows", a, p.Identity)
		}
	}
}
