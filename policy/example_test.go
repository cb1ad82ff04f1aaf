package policy_test

import (
	"fmt"
	"net/netip"

	securityv1beta1 "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"

	"github.com/meshsplice/meshsplice/policy"
)

func Example() {
	// db accepts backend, on 5432, for GET requests only.
	allow := &securityv1.AuthorizationPolicy{}
	allow.Namespace, allow.Name = "default", "db-from-backend"
	allow.Spec.Selector = &typev1beta1.WorkloadSelector{MatchLabels: map[string]string{"app": "db"}}
	allow.Spec.Rules = []*securityv1beta1.Rule{{
		From: []*securityv1beta1.Rule_From{{Source: &securityv1beta1.Source{
			Principals: []string{"cluster.local/ns/default/sa/backend"},
		}}},
		To: []*securityv1beta1.Rule_To{{Operation: &securityv1beta1.Operation{
			Methods: []string{"GET"}, Ports: []string{"5432"},
		}}},
	}}

	in := policy.Input{
		Workloads: []policy.Workload{
			{Namespace: "default", Name: "backend", ServiceAccount: "backend", IPs: []netip.Addr{netip.MustParseAddr("10.0.0.2")}},
			{Namespace: "default", Name: "frontend", ServiceAccount: "frontend", IPs: []netip.Addr{netip.MustParseAddr("10.0.0.1")}},
			{Namespace: "default", Name: "db", ServiceAccount: "db", Labels: map[string]string{"app": "db"}},
		},
		Policies: []*securityv1.AuthorizationPolicy{allow},
	}
	res, err := policy.Compile(in, policy.NewAllocator())
	if err != nil {
		panic(err)
	}
	set := &res.Sets[res.WorkloadSet["default/db"]]
	fmt.Println(set.Atoms[0])
	fmt.Println(set.NotEnforced[0])
	for _, src := range []string{"10.0.0.2", "10.0.0.1"} {
		ip := netip.MustParseAddr(src)
		for _, port := range []uint16{5432, 22} {
			allowed, _ := set.Verdict(res.IPIdentity[ip], ip, port)
			fmt.Printf("%s -> db:%d allowed=%v\n", src, port, allowed)
		}
	}
	// Output:
	// ALLOW default/db-from-backend rule 0 source 0 operation 0: from {unknown, cluster.local/ns/default/sa/backend} (principals [cluster.local/ns/default/sa/backend]), address any, port 5432
	// default/db-from-backend rule 0 operation 0: methods: not visible in the kernel, dropped (the kernel allows more)
	// 10.0.0.2 -> db:5432 allowed=true
	// 10.0.0.2 -> db:22 allowed=false
	// 10.0.0.1 -> db:5432 allowed=false
	// 10.0.0.1 -> db:22 allowed=false
}
