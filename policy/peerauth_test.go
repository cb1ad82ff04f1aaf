package policy

import (
	"net/netip"
	"strings"
	"testing"
	"time"

	securityv1beta1 "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// paMode names the modes as the YAML spells them.
var paMode = map[string]securityv1beta1.PeerAuthentication_MutualTLS_Mode{
	"":           securityv1beta1.PeerAuthentication_MutualTLS_UNSET,
	"UNSET":      securityv1beta1.PeerAuthentication_MutualTLS_UNSET,
	"DISABLE":    securityv1beta1.PeerAuthentication_MutualTLS_DISABLE,
	"PERMISSIVE": securityv1beta1.PeerAuthentication_MutualTLS_PERMISSIVE,
	"STRICT":     securityv1beta1.PeerAuthentication_MutualTLS_STRICT,
}

// testPA builds a PeerAuthentication created age seconds after a fixed
// time; mode "" leaves mtls unset, "-" leaves the mtls field out.
func testPA(ns, name string, age int, sel map[string]string, mode string, ports map[uint32]string) *securityv1.PeerAuthentication {
	p := &securityv1.PeerAuthentication{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name,
		CreationTimestamp: metav1.NewTime(time.Date(2026, 1, 1, 0, 0, age, 0, time.UTC))}}
	if sel != nil {
		p.Spec.Selector = &typev1beta1.WorkloadSelector{MatchLabels: sel}
	}
	if mode != "-" {
		p.Spec.Mtls = &securityv1beta1.PeerAuthentication_MutualTLS{Mode: paMode[mode]}
	}
	if ports != nil {
		p.Spec.PortLevelMtls = map[uint32]*securityv1beta1.PeerAuthentication_MutualTLS{}
		for port, m := range ports {
			if m == "-" {
				p.Spec.PortLevelMtls[port] = nil
				continue
			}
			p.Spec.PortLevelMtls[port] = &securityv1beta1.PeerAuthentication_MutualTLS{Mode: paMode[m]}
		}
	}
	return p
}

// strictPorts is what the compiled STRICT atom of a workload says: "" (no
// atom), "any", "any but P, ..." or "P, ...".
func strictPorts(res Result, key string) string {
	idx := res.WorkloadSet[key]
	if idx < 0 {
		return ""
	}
	for _, a := range res.Sets[idx].Atoms {
		if a.Plaintext {
			return a.PortDesc
		}
	}
	return ""
}

// TestPeerAuthenticationCompile holds Compile to istiod's composition of
// PeerAuthentications (ComposePeerAuthentication): mesh (root namespace,
// no selector) < namespace < workload (selector, not in the root
// namespace), UNSET inheriting, the oldest policy of a level winning,
// portLevelMtls read from the workload-level policy only, on container
// ports. The result is the ports where plaintext from a source known to
// have no sidecar is denied.
func TestPeerAuthenticationCompile(t *testing.T) {
	web := map[string]string{"app": "web"}
	cases := []struct {
		name string
		pas  []*securityv1.PeerAuthentication
		// want maps workload keys to the STRICT atom's ports; workloads
		// not listed have none.
		want map[string]string
		// unknownLabels compiles with the workloads' labels unknown.
		unknownLabels bool
		warning       string
	}{
		{name: "none"},
		{name: "mesh STRICT", pas: []*securityv1.PeerAuthentication{testPA("istio-system", "default", 0, nil, "STRICT", nil)},
			want: map[string]string{"a/web": "any", "a/db": "any", "b/api": "any", "istio-system/gw": "any"}},
		{name: "mesh STRICT, namespace PERMISSIVE", pas: []*securityv1.PeerAuthentication{
			testPA("istio-system", "default", 0, nil, "STRICT", nil), testPA("a", "default", 0, nil, "PERMISSIVE", nil)},
			want: map[string]string{"b/api": "any", "istio-system/gw": "any"}},
		{name: "mesh STRICT, namespace UNSET inherits", pas: []*securityv1.PeerAuthentication{
			testPA("istio-system", "default", 0, nil, "STRICT", nil), testPA("a", "default", 0, nil, "", nil), testPA("b", "x", 0, nil, "-", nil)},
			want: map[string]string{"a/web": "any", "a/db": "any", "b/api": "any", "istio-system/gw": "any"}},
		{name: "mesh DISABLE, namespace STRICT", pas: []*securityv1.PeerAuthentication{
			testPA("istio-system", "default", 0, nil, "DISABLE", nil), testPA("b", "default", 0, nil, "STRICT", nil)},
			want: map[string]string{"b/api": "any"}},
		{name: "namespace STRICT, workload PERMISSIVE", pas: []*securityv1.PeerAuthentication{
			testPA("a", "default", 0, nil, "STRICT", nil), testPA("a", "web", 0, web, "PERMISSIVE", nil)},
			want: map[string]string{"a/db": "any"}},
		{name: "workload UNSET inherits namespace STRICT", pas: []*securityv1.PeerAuthentication{
			testPA("a", "default", 0, nil, "STRICT", nil), testPA("a", "web", 0, web, "", nil)},
			want: map[string]string{"a/web": "any", "a/db": "any"}},
		{name: "workload STRICT with port-level overrides", pas: []*securityv1.PeerAuthentication{
			testPA("a", "web", 0, web, "STRICT", map[uint32]string{8080: "PERMISSIVE", 9090: "", 9091: "DISABLE", 9092: "STRICT"})},
			want: map[string]string{"a/web": "any but 8080, 9091"}},
		{name: "port-level STRICT on a PERMISSIVE workload", pas: []*securityv1.PeerAuthentication{
			testPA("a", "web", 0, web, "PERMISSIVE", map[uint32]string{8080: "STRICT", 9090: "PERMISSIVE"})},
			want: map[string]string{"a/web": "8080"}},
		{name: "port-level UNSET takes the inherited workload mode", pas: []*securityv1.PeerAuthentication{
			testPA("istio-system", "default", 0, nil, "STRICT", nil),
			testPA("a", "web", 0, web, "", map[uint32]string{8080: "-", 9090: "DISABLE"})},
			want: map[string]string{"a/web": "any but 9090", "a/db": "any", "b/api": "any", "istio-system/gw": "any"}},
		{name: "port-level on a namespace-level policy is not read", pas: []*securityv1.PeerAuthentication{
			testPA("a", "default", 0, nil, "PERMISSIVE", map[uint32]string{8080: "STRICT"})}},
		{name: "selector in the root namespace is never used", pas: []*securityv1.PeerAuthentication{
			testPA("istio-system", "gw", 0, map[string]string{"app": "gw"}, "STRICT", nil),
			testPA("istio-system", "web", 0, web, "STRICT", nil)}},
		{name: "root namespace workloads: no-selector policy there is the mesh's", pas: []*securityv1.PeerAuthentication{
			testPA("istio-system", "default", 0, nil, "STRICT", nil), testPA("b", "default", 0, nil, "PERMISSIVE", nil)},
			want: map[string]string{"a/web": "any", "a/db": "any", "istio-system/gw": "any"}},
		{name: "other namespace's policy does not apply", pas: []*securityv1.PeerAuthentication{
			testPA("b", "web", 0, web, "STRICT", nil)},
			want: map[string]string{"b/api": "any"}},
		{name: "oldest namespace policy wins", pas: []*securityv1.PeerAuthentication{
			testPA("a", "a-new", 5, nil, "PERMISSIVE", nil), testPA("a", "z-old", 1, nil, "STRICT", nil)},
			want: map[string]string{"a/web": "any", "a/db": "any"}},
		{name: "same age: name order wins", pas: []*securityv1.PeerAuthentication{
			testPA("a", "b", 0, nil, "STRICT", nil), testPA("a", "a", 0, nil, "PERMISSIVE", nil)}},
		{name: "oldest workload policy wins, its ports only", pas: []*securityv1.PeerAuthentication{
			testPA("a", "new", 9, web, "STRICT", nil),
			testPA("a", "old", 3, web, "PERMISSIVE", map[uint32]string{7070: "STRICT"})},
			want: map[string]string{"a/web": "7070"}},
		{name: "selector not matching", pas: []*securityv1.PeerAuthentication{
			testPA("a", "x", 0, map[string]string{"app": "web", "v": "2"}, "STRICT", nil)}},
		{name: "empty matchLabels is namespace-wide", pas: []*securityv1.PeerAuthentication{
			testPA("a", "x", 0, map[string]string{}, "STRICT", nil)},
			want: map[string]string{"a/web": "any", "a/db": "any"}},
		{name: "labels unknown: a workload policy that may apply is honoured both ways", unknownLabels: true,
			pas: []*securityv1.PeerAuthentication{
				testPA("a", "default", 0, nil, "STRICT", nil),
				testPA("a", "web", 0, web, "STRICT", map[uint32]string{8080: "PERMISSIVE"}),
				testPA("a", "db", 0, map[string]string{"app": "db"}, "PERMISSIVE", map[uint32]string{5432: "STRICT"})},
			want: map[string]string{"a/web": "5432", "a/db": "5432"}},
		{name: "labels unknown: without workload policies nothing changes", unknownLabels: true,
			pas:  []*securityv1.PeerAuthentication{testPA("a", "default", 0, nil, "STRICT", nil)},
			want: map[string]string{"a/web": "any", "a/db": "any"}},
		{name: "port 0 leaves the workload to the sidecar", pas: []*securityv1.PeerAuthentication{
			testPA("a", "web", 0, web, "STRICT", map[uint32]string{0: "PERMISSIVE"})},
			warning: "portLevelMtls names port 0"},
		{name: "nil policy ignored", pas: []*securityv1.PeerAuthentication{nil, testPA("b", "default", 0, nil, "STRICT", nil)},
			want: map[string]string{"b/api": "any"}, warning: "a null PeerAuthentication"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			in := Input{PeerAuthentications: c.pas, Workloads: []Workload{
				{Namespace: "a", Name: "web", Labels: web, LabelsUnknown: c.unknownLabels, IPs: []netip.Addr{netip.MustParseAddr("10.0.0.1")}},
				{Namespace: "a", Name: "db", Labels: map[string]string{"app": "db"}, LabelsUnknown: c.unknownLabels, IPs: []netip.Addr{netip.MustParseAddr("10.0.0.2")}},
				{Namespace: "b", Name: "api", Labels: web, IPs: []netip.Addr{netip.MustParseAddr("10.0.1.1")}},
				{Namespace: "istio-system", Name: "gw", Labels: map[string]string{"app": "gw"}, IPs: []netip.Addr{netip.MustParseAddr("10.0.9.1")}},
			}}
			if c.unknownLabels {
				for i := range in.Workloads[:2] {
					in.Workloads[i].Labels = nil
				}
			}
			res, err := Compile(in, NewAllocator())
			if err != nil {
				t.Fatal(err)
			}
			for _, w := range in.Workloads {
				if got, want := strictPorts(res, w.Key()), c.want[w.Key()]; got != want {
					t.Errorf("%s: STRICT ports %q, want %q", w.Key(), got, want)
				}
			}
			warned := strings.Join(res.Warnings, "\n")
			if c.warning != "" && !strings.Contains(warned, c.warning) {
				t.Errorf("warnings %q, want one with %q", warned, c.warning)
			}
		})
	}
}

// TestPeerAuthenticationVerdict: the STRICT atom denies only a source known
// to have no sidecar, only on its ports; the same source is judged by the
// AuthorizationPolicies elsewhere, and an unknown or meshed source is never
// denied by it.
func TestPeerAuthenticationVerdict(t *testing.T) {
	allowAll := &securityv1.AuthorizationPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "a", Name: "allow"},
		Spec: securityv1beta1.AuthorizationPolicy{Rules: []*securityv1beta1.Rule{{To: []*securityv1beta1.Rule_To{{
			Operation: &securityv1beta1.Operation{Ports: []string{"8080", "9090"}}}}}}}}
	in := Input{
		Workloads: []Workload{
			{Namespace: "a", Name: "web", Labels: map[string]string{"app": "web"}, IPs: []netip.Addr{netip.MustParseAddr("10.0.0.1")}},
			{Namespace: "a", Name: "client", IPs: []netip.Addr{netip.MustParseAddr("10.0.0.2")}},
		},
		Policies: []*securityv1.AuthorizationPolicy{allowAll},
		PeerAuthentications: []*securityv1.PeerAuthentication{
			testPA("a", "web", 0, map[string]string{"app": "web"}, "STRICT", map[uint32]string{9090: "PERMISSIVE"})},
	}
	res, err := Compile(in, NewAllocator())
	if err != nil {
		t.Fatal(err)
	}
	set := &res.Sets[res.WorkloadSet["a/web"]]
	client := res.IPIdentity[netip.MustParseAddr("10.0.0.2")]
	for _, c := range []struct {
		name      string
		id        IdentityID
		ip        string
		port      uint16
		plaintext bool
		allow     bool
	}{
		{"known plaintext, STRICT port", UnknownIdentity, "10.9.0.1", 8080, true, false},
		{"known plaintext, port-level PERMISSIVE", UnknownIdentity, "10.9.0.1", 9090, true, true},
		{"known plaintext, port no ALLOW names", UnknownIdentity, "10.9.0.1", 7070, true, false},
		{"unknown source, STRICT port", UnknownIdentity, "10.9.0.1", 8080, false, true},
		{"meshed source, STRICT port", client, "10.0.0.2", 8080, false, true},
		{"known identity without sidecar, STRICT port", client, "10.0.0.2", 8080, true, false},
		{"known identity without sidecar, PERMISSIVE port", client, "10.0.0.2", 9090, true, true},
	} {
		if allow, _ := set.VerdictFrom(c.id, netip.MustParseAddr(c.ip), c.port, c.plaintext); allow != c.allow {
			t.Errorf("%s: allow = %v, want %v", c.name, allow, c.allow)
		}
	}
	if set.PlaintextMask == 0 || set.PlaintextMask&set.DenyMask != set.PlaintextMask {
		t.Errorf("PlaintextMask %b must be DENY bits (deny %b)", set.PlaintextMask, set.DenyMask)
	}
	for id, m := range set.IdentityMasks {
		if m&set.PlaintextMask != 0 {
			t.Errorf("identity %d has a plaintext bit: only the plaintext flag may set it", id)
		}
	}
	if set.DefaultIdentityMask&set.PlaintextMask != 0 {
		t.Errorf("the unknown source's mask has a plaintext bit")
	}
}

// TestPeerAuthenticationSharesSets: workloads with the same policies and
// the same STRICT ports share a set; a different STRICT makes another.
func TestPeerAuthenticationSharesSets(t *testing.T) {
	in := Input{
		Workloads: []Workload{
			{Namespace: "a", Name: "one", IPs: []netip.Addr{netip.MustParseAddr("10.0.0.1")}},
			{Namespace: "a", Name: "two", IPs: []netip.Addr{netip.MustParseAddr("10.0.0.2")}},
			{Namespace: "a", Name: "three", Labels: map[string]string{"x": "y"}, IPs: []netip.Addr{netip.MustParseAddr("10.0.0.3")}},
		},
		PeerAuthentications: []*securityv1.PeerAuthentication{
			testPA("a", "default", 0, nil, "STRICT", nil),
			testPA("a", "three", 0, map[string]string{"x": "y"}, "", map[uint32]string{80: "PERMISSIVE"})},
	}
	res, err := Compile(in, NewAllocator())
	if err != nil {
		t.Fatal(err)
	}
	if res.WorkloadSet["a/one"] != res.WorkloadSet["a/two"] || res.WorkloadSet["a/one"] < 0 {
		t.Errorf("one and two: sets %d and %d, want one shared set", res.WorkloadSet["a/one"], res.WorkloadSet["a/two"])
	}
	if res.WorkloadSet["a/three"] == res.WorkloadSet["a/one"] {
		t.Errorf("three shares one's set, but its port 80 is PERMISSIVE")
	}
}
