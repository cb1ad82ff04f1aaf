package policy

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
)

// TestBadWorkloadAffectsOnlyItself: a duplicate workload name, a workload
// without a name, or an identity the allocator cannot number is reported
// for that workload alone; every other workload still gets its policy.
func TestBadWorkloadAffectsOnlyItself(t *testing.T) {
	policies := `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: default}
spec: {}
`
	backendAgain := Workload{Namespace: "default", Name: "backend", ServiceAccount: "other",
		IPs: []netip.Addr{netip.MustParseAddr("10.0.9.9")}}
	for _, tc := range []struct {
		name string
		in   func(*Input)
		ids  Identities
		bad  string // the workload reported
	}{
		{name: "two workloads with one name", bad: "default/backend",
			in: func(in *Input) { in.Workloads = append(in.Workloads, backendAgain) }},
		{name: "workload without a name", bad: "default/",
			in: func(in *Input) { in.Workloads = append(in.Workloads, Workload{Namespace: "default"}) }},
		{name: "allocator without a number for one identity", bad: "prod/api",
			ids: refuse{"spiffe://cluster.local/ns/prod/sa/api", NewAllocator()}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ps, err := parsePolicies([]byte(policies))
			if err != nil {
				t.Fatal(err)
			}
			in := Input{Workloads: testWorkloads(), Policies: ps}
			if tc.in != nil {
				tc.in(&in)
			}
			ids := tc.ids
			if ids == nil {
				ids = NewAllocator()
			}
			res, err := Compile(in, ids)
			if err != nil {
				t.Fatalf("Compile: %v; one bad workload must not stop the others", err)
			}
			if why := res.Unenforced[tc.bad]; !errors.Is(why, ErrInvalidWorkload) {
				t.Errorf("%s: Unenforced %v, want ErrInvalidWorkload", tc.bad, why)
			}
			if res.WorkloadSet[tc.bad] >= 0 && tc.bad != "default/" {
				t.Errorf("%s has a kernel set", tc.bad)
			}
			if idx, ok := res.WorkloadSet["default/db"]; !ok || idx < 0 {
				t.Fatalf("default/db lost its policy: set %d, %v", idx, res.Unenforced["default/db"])
			}
			if allow, _ := res.Sets[res.WorkloadSet["default/db"]].Verdict(UnknownIdentity, netip.MustParseAddr("10.0.1.1"), 80); allow {
				t.Error("db's allow-nothing is not enforced")
			}
		})
	}
}

// refuse is an allocator that has no number for one identity.
type refuse struct {
	no string
	a  *Allocator
}

func (r refuse) ID(spiffe string) IdentityID {
	if spiffe == r.no {
		return UnknownIdentity
	}
	return r.a.ID(spiffe)
}

// TestUnknownLabelsNeverDenyMore: when the runtime did not pass a pod's
// labels, the kernel cannot tell which selector policies apply. It must
// then enforce what every possible answer would deny: a root allow-nothing
// plus a per-workload ALLOW with a selector must not turn into "deny all",
// and a DENY with a selector must not apply.
func TestUnknownLabelsNeverDenyMore(t *testing.T) {
	const rootAllowNothing = `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: istio-system}
spec: {}
---
`
	const selectedDB = `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: db, namespace: default}
spec:
  selector: {matchLabels: {app: db}}
`
	frontend := netip.MustParseAddr("10.0.1.1")
	for _, tc := range []struct {
		name     string
		policies string
		port     uint16
		allow    bool
	}{
		{name: "root allow-nothing and a selected ALLOW: frontend allowed", port: 8080, allow: true, policies: rootAllowNothing + selectedDB + `  rules: [{from: [{source: {principals: ["cluster.local/ns/default/sa/frontend"]}}]}]
`},
		{name: "root allow-nothing and a selected ALLOW: other ports of the rule still denied", port: 9090, allow: false, policies: rootAllowNothing + selectedDB + `  rules: [{to: [{operation: {ports: ["8080"]}}]}]
`},
		{name: "only a selected ALLOW: nothing denied", port: 9090, allow: true, policies: selectedDB + `  rules: [{to: [{operation: {ports: ["8080"]}}]}]
`},
		{name: "a selected DENY: not applied", port: 8080, allow: true, policies: selectedDB + `  action: DENY
  rules: [{}]
`},
		{name: "a DENY without selector: still applied", port: 8080, allow: false, policies: `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: db, namespace: default}
spec:
  action: DENY
  rules: [{to: [{operation: {ports: ["8080"]}}]}]
`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ps, err := parsePolicies([]byte(tc.policies))
			if err != nil {
				t.Fatal(err)
			}
			in := Input{Workloads: testWorkloads(), Policies: ps}
			for i := range in.Workloads {
				if in.Workloads[i].Name == "db" {
					in.Workloads[i].Labels, in.Workloads[i].LabelsUnknown = nil, true
				}
			}
			res, err := Compile(in, NewAllocator())
			if err != nil {
				t.Fatal(err)
			}
			allow := true
			if idx := res.WorkloadSet["default/db"]; idx >= 0 {
				allow, _ = res.Sets[idx].Verdict(res.IPIdentity[frontend], frontend, tc.port)
			}
			if allow != tc.allow {
				t.Errorf("frontend -> db:%d with db's labels unknown: allow=%v, want %v", tc.port, allow, tc.allow)
			}
			if why := res.Partial["default/db"]; !strings.Contains(why, "labels") && strings.Contains(tc.policies, "selector") {
				t.Errorf("Partial[default/db] = %q, want it to say the labels are unknown", why)
			}
		})
	}
}

// TestAllocatorSharingNumbers: an allocator that gives two identities one
// number leaves the second workload unenforced, not the node.
func TestAllocatorSharingNumbers(t *testing.T) {
	in := Input{Workloads: []Workload{{Namespace: "a", Name: "b"}, {Namespace: "a", Name: "c", ServiceAccount: "other"}}}
	res, err := Compile(in, oneID{})
	if err != nil {
		t.Fatal(err)
	}
	if !errors.Is(res.Unenforced["a/c"], ErrInvalidWorkload) || res.Unenforced["a/b"] != nil {
		t.Errorf("Unenforced = %v, want only a/c", res.Unenforced)
	}
}
