package policy

import (
	"net/netip"
	"testing"
)

// TestUnknownSourceJudgedOnlyByWhatTheKernelKnows: a source the agent does
// not know (a pod of another node, a VM) may present any certificate to the
// sidecar, so the kernel may deny it only where no identity could help:
// identity conditions (principals, namespaces, service accounts, trust
// domains, their not- forms and their when keys) never deny an unknown
// source, address and port conditions still do.
func TestUnknownSourceJudgedOnlyByWhatTheKernelKnows(t *testing.T) {
	remote := netip.MustParseAddr("192.0.2.7")
	cluster := netip.MustParseAddr("10.9.0.7")
	tests := []struct {
		name   string
		policy string
		ip     netip.Addr
		port   uint16
		allow  bool
	}{
		{name: "allow by principal: a remote frontend is allowed", allow: true, ip: remote, port: 8080, policy: `
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/frontend"]}}]`},
		{name: "allow by namespace: a remote pod of prod is allowed", allow: true, ip: remote, port: 8080, policy: `
  action: ALLOW
  rules:
  - from: [{source: {namespaces: ["prod"]}}]`},
		{name: "allow any principal: a remote mTLS peer is allowed", allow: true, ip: remote, port: 8080, policy: `
  action: ALLOW
  rules:
  - from: [{source: {principals: ["*"]}}]`},
		{name: "allow by principal and port: other ports still denied", allow: false, ip: remote, port: 9090, policy: `
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/frontend"]}}]
    to: [{operation: {ports: ["8080"]}}]`},
		{name: "allow by principal and ipBlocks: outside the block denied", allow: false, ip: remote, port: 8080, policy: `
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/frontend"], ipBlocks: ["10.0.0.0/8"]}}]`},
		{name: "allow by principal and ipBlocks: inside the block allowed", allow: true, ip: cluster, port: 8080, policy: `
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/frontend"], ipBlocks: ["10.0.0.0/8"]}}]`},
		{name: "when source.principal: a remote frontend is allowed", allow: true, ip: remote, port: 8080, policy: `
  action: ALLOW
  rules:
  - when: [{key: source.principal, values: ["cluster.local/ns/default/sa/frontend"]}]`},
		{name: "deny notPrincipals: a remote backend is not denied", allow: true, ip: remote, port: 8080, policy: `
  action: DENY
  rules:
  - from: [{source: {notPrincipals: ["cluster.local/ns/default/sa/backend"]}}]`},
		{name: "deny notNamespaces: a remote pod of default is not denied", allow: true, ip: remote, port: 8080, policy: `
  action: DENY
  rules:
  - from: [{source: {notNamespaces: ["default"]}}]`},
		{name: "deny when notValues source.namespace: not denied", allow: true, ip: remote, port: 8080, policy: `
  action: DENY
  rules:
  - when: [{key: source.namespace, notValues: ["default"]}]`},
		{name: "deny notIpBlocks: an unknown address outside is denied", allow: false, ip: remote, port: 8080, policy: `
  action: DENY
  rules:
  - from: [{source: {notIpBlocks: ["10.0.0.0/8"]}}]`},
		{name: "deny ipBlocks: an unknown address inside is denied", allow: false, ip: remote, port: 8080, policy: `
  action: DENY
  rules:
  - from: [{source: {ipBlocks: ["192.0.2.0/24"]}}]`},
		{name: "deny a port to all: unknown denied too", allow: false, ip: remote, port: 22, policy: `
  action: DENY
  rules:
  - to: [{operation: {ports: ["22"]}}]`},
		{name: "deny notPrincipals and a port: unknown not denied", allow: true, ip: remote, port: 22, policy: `
  action: DENY
  rules:
  - from: [{source: {notPrincipals: ["cluster.local/ns/default/sa/backend"]}}]
    to: [{operation: {ports: ["22"]}}]`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ps, err := parsePolicies([]byte("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: default}\nspec:\n  selector: {matchLabels: {app: db}}" + tc.policy))
			if err != nil {
				t.Fatal(err)
			}
			in := Input{Workloads: testWorkloads(), Policies: ps}
			res, err := Compile(in, NewAllocator())
			if err != nil {
				t.Fatal(err)
			}
			idx := res.WorkloadSet["default/db"]
			if idx < 0 {
				t.Fatalf("db has no set: %v", res.Unenforced["default/db"])
			}
			got, atom := res.Sets[idx].Verdict(UnknownIdentity, tc.ip, tc.port)
			if got != tc.allow {
				t.Errorf("unknown source %s to db:%d: allow=%v (atom %d), want %v", tc.ip, tc.port, got, atom, tc.allow)
			}
			if want := newRefEvaluator(in).verdict(in.Workloads[4], refRequest{ip: tc.ip, port: tc.port}); want != tc.allow {
				t.Errorf("reference evaluator: allow=%v, want %v", want, tc.allow)
			}
		})
	}
}
