package policy

import (
	"fmt"
	"net/netip"
	"testing"

	securityv1beta1 "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
)

// BenchmarkCompile compiles a cluster of 100 namespaces with 20 workloads
// each (2000 workloads, 1000 identities) and 3 policies per namespace.
func BenchmarkCompile(b *testing.B) {
	in := Input{}
	for n := range 100 {
		ns := fmt.Sprintf("ns%d", n)
		for w := range 20 {
			in.Workloads = append(in.Workloads, Workload{
				Namespace: ns, Name: fmt.Sprintf("w%d", w), ServiceAccount: fmt.Sprintf("sa%d", w/2),
				Labels: map[string]string{"app": fmt.Sprintf("app%d", w%5)},
				IPs:    []netip.Addr{netip.AddrFrom4([4]byte{10, byte(n), byte(w), 1})},
			})
		}
		allow := &securityv1.AuthorizationPolicy{}
		allow.Namespace, allow.Name = ns, "allow-app0"
		allow.Spec.Selector = &typev1beta1.WorkloadSelector{MatchLabels: map[string]string{"app": "app0"}}
		allow.Spec.Rules = []*securityv1beta1.Rule{{
			From: []*securityv1beta1.Rule_From{
				{Source: &securityv1beta1.Source{Principals: []string{fmt.Sprintf("cluster.local/ns/ns%d/sa/sa1", (n+1)%100)}}},
				{Source: &securityv1beta1.Source{Namespaces: []string{ns, "ns1*"}}},
			},
			To: []*securityv1beta1.Rule_To{{Operation: &securityv1beta1.Operation{Ports: []string{"8080", "9090"}, Methods: []string{"GET"}}}},
		}}
		deny := &securityv1.AuthorizationPolicy{}
		deny.Namespace, deny.Name = ns, "deny-outside"
		deny.Spec.Action = securityv1beta1.AuthorizationPolicy_DENY
		deny.Spec.Rules = []*securityv1beta1.Rule{{
			From: []*securityv1beta1.Rule_From{{Source: &securityv1beta1.Source{NotIpBlocks: []string{"10.0.0.0/8"}}}},
		}}
		ns2 := &securityv1.AuthorizationPolicy{}
		ns2.Namespace, ns2.Name = ns, "allow-same-namespace"
		ns2.Spec.Rules = []*securityv1beta1.Rule{{From: []*securityv1beta1.Rule_From{{Source: &securityv1beta1.Source{Namespaces: []string{ns}}}}}}
		in.Policies = append(in.Policies, allow, deny, ns2)
	}
	ids := NewAllocator()
	b.ResetTimer()
	for range b.N {
		if _, err := Compile(in, ids); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkCompileScale is the shape of the Kubernetes scale run
// (docs/kubernetes-scale.md): 5,500 workloads (500 on the node, 5,000
// elsewhere) and 1,000 selector policies, spread over 50 namespaces or all
// in one (the scale run's worst case).
func BenchmarkCompileScale(b *testing.B) {
	for _, namespaces := range []int{50, 1} {
		b.Run(fmt.Sprintf("namespaces=%d", namespaces), func(b *testing.B) {
			in := Input{}
			for i := range 5500 {
				in.Workloads = append(in.Workloads, Workload{
					Namespace: fmt.Sprintf("ns%d", i%namespaces), Name: fmt.Sprintf("w%d", i), ServiceAccount: fmt.Sprintf("sa%d", i%100),
					Labels: map[string]string{"app": fmt.Sprintf("app%d", i%200), "version": "v1"},
					IPs:    []netip.Addr{netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})},
				})
			}
			for i := range 1000 {
				p := &securityv1.AuthorizationPolicy{}
				p.Namespace, p.Name = fmt.Sprintf("ns%d", i%namespaces), fmt.Sprintf("p%d", i)
				p.Spec.Selector = &typev1beta1.WorkloadSelector{MatchLabels: map[string]string{"app": fmt.Sprintf("app%d", i%200)}}
				p.Spec.Rules = []*securityv1beta1.Rule{{
					From: []*securityv1beta1.Rule_From{{Source: &securityv1beta1.Source{Principals: []string{fmt.Sprintf("cluster.local/ns/ns0/sa/sa%d", i%100)}}}},
					To:   []*securityv1beta1.Rule_To{{Operation: &securityv1beta1.Operation{Ports: []string{"8080"}}}},
				}}
				in.Policies = append(in.Policies, p)
			}
			ids := NewAllocator()
			b.ResetTimer()
			for range b.N {
				if _, err := Compile(in, ids); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
