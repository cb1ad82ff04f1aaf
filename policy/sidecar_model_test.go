package policy

import (
	"hash/fnv"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strconv"
	"testing"

	securityv1beta1 "istio.io/api/security/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
)

// sidecarModel is what an Istio sidecar decides for one request, written
// from Istio's semantics with nothing projected away: CUSTOM (its external
// authorizer may allow), AUDIT and dry-run policies never deny; DENY before
// ALLOW; L7 fields and when keys are judged on the request; the peer
// identity is the certificate the source presents ("" on plaintext), which
// for a source the kernel does not know can be anything. Workload labels
// are the real ones, whatever the kernel was told.
//
// It shares the identity matchers with the reference evaluator (refField
// and the regular expressions istiod generates) and validate.
type sidecarModel struct {
	ref *refEvaluator
}

// sidecarRequest is one request: the connection as the sidecar sees it
// (peer certificate, source address, destination port) and a valuation of
// its L7 attributes.
type sidecarRequest struct {
	peer string
	ip   netip.Addr
	port uint16
	l7   l7Valuation
}

// l7Valuation says which L7 values (method, path, host, request principal,
// remote address, L7 when key) a request matches. Values are judged
// independently of each other: a sound kernel never denies because of an
// L7 value, so any valuation, realizable or not, must agree with it.
type l7Valuation struct {
	seed  uint64
	all   int8 // 1: every value matches, -1: none, 0: by seed
	force map[string]bool
}

func (v l7Valuation) matches(field, value string) bool {
	key := field + "\x00" + value
	if b, ok := v.force[key]; ok {
		return b
	}
	switch v.all {
	case 1:
		return true
	case -1:
		return false
	}
	h := fnv.New64a()
	h.Write([]byte(key))
	return (h.Sum64()^v.seed)&1 == 1
}

// allows is the sidecar's verdict.
func (m sidecarModel) allows(dst Workload, req sidecarRequest) bool {
	var allow, deny []*securityv1.AuthorizationPolicy
	for _, p := range m.ref.in.Policies {
		if p == nil || !m.inScope(p, dst) {
			continue
		}
		if v, err := strconv.ParseBool(p.Annotations["istio.io/dry-run"]); err == nil && v {
			continue
		}
		if validate(&p.Spec) != nil {
			// The webhook rejects it: it never reaches a sidecar.
			continue
		}
		switch p.Spec.GetAction() {
		case securityv1beta1.AuthorizationPolicy_ALLOW:
			allow = append(allow, p)
		case securityv1beta1.AuthorizationPolicy_DENY:
			deny = append(deny, p)
		}
	}
	for _, p := range deny {
		for _, r := range p.Spec.GetRules() {
			if m.ruleMatches(p.Namespace, r, req) {
				return false
			}
		}
	}
	if len(allow) == 0 {
		return true
	}
	for _, p := range allow {
		for _, r := range p.Spec.GetRules() {
			if m.ruleMatches(p.Namespace, r, req) {
				return true
			}
		}
	}
	return false
}

// inScope: a sidecar never applies a policy with targetRefs.
func (m sidecarModel) inScope(p *securityv1.AuthorizationPolicy, w Workload) bool {
	if len(p.Spec.GetTargetRefs()) > 0 || p.Spec.GetTargetRef() != nil {
		return false
	}
	in := *m.ref
	in.in.ServiceTargetRefs = false
	w.LabelsUnknown = false // the sidecar knows its pod's labels
	return in.inScope(p, w)
}

func (m sidecarModel) ruleMatches(ns string, rule *securityv1beta1.Rule, req sidecarRequest) bool {
	if rule == nil {
		return false
	}
	r := m.ref
	for _, w := range rule.GetWhen() {
		key, vs, nvs := w.GetKey(), w.GetValues(), w.GetNotValues()
		switch key {
		case "source.ip", "destination.port", "source.namespace", "source.principal", "source.serviceAccount", "source.trustDomain":
			if !r.whenHolds(ns, w, false, refRequest{spiffe: req.peer, ip: req.ip, port: req.port}) {
				return false
			}
		default:
			if !l7Field(req.l7, "when:"+key, vs, nvs) {
				return false
			}
		}
	}
	return anyPart(rule.GetFrom(), func(f *securityv1beta1.Rule_From) bool {
		s := f.GetSource()
		if req.peer == "" {
			// Plaintext: no principal, every identity value fails and
			// every not- value holds (Envoy's matchers on a missing peer
			// certificate).
			if len(s.Principals)+len(s.Namespaces)+len(s.ServiceAccounts)+len(s.TrustDomains) > 0 {
				return false
			}
		} else if !refField(r.tds.rewritePrincipals(s.Principals), r.tds.rewritePrincipals(s.NotPrincipals), req.peer, refPrincipalRegex) ||
			!refField(s.Namespaces, s.NotNamespaces, req.peer, refNamespaceRegex) ||
			!refField(s.ServiceAccounts, s.NotServiceAccounts, req.peer, func(v string) string { return refServiceAccountRegex(ns, v) }) ||
			!refField(r.tds.expandTrustDomains(s.TrustDomains), r.tds.expandTrustDomains(s.NotTrustDomains), req.peer, refTrustDomainRegex) {
			return false
		}
		return refIPIn(s.IpBlocks, req.ip, true) && !refIPIn(s.NotIpBlocks, req.ip, false) &&
			l7Field(req.l7, "requestPrincipals", s.RequestPrincipals, s.NotRequestPrincipals) &&
			l7Field(req.l7, "remoteIpBlocks", s.RemoteIpBlocks, s.NotRemoteIpBlocks)
	}) && anyPart(rule.GetTo(), func(t *securityv1beta1.Rule_To) bool {
		o := t.GetOperation()
		return refPortIn(o.Ports, req.port, true) && !refPortIn(o.NotPorts, req.port, false) &&
			l7Field(req.l7, "hosts", o.Hosts, o.NotHosts) && l7Field(req.l7, "methods", o.Methods, o.NotMethods) &&
			l7Field(req.l7, "paths", o.Paths, o.NotPaths)
	})
}

// l7Field: one of values matches (when there are values) and none of
// notValues does.
func l7Field(v l7Valuation, field string, values, notValues []string) bool {
	if len(values) > 0 && !slices.ContainsFunc(values, func(s string) bool { return v.matches(field, s) }) {
		return false
	}
	return !slices.ContainsFunc(notValues, func(s string) bool { return v.matches(field, s) })
}

// valuations are the L7 valuations a connection is probed with: none
// matching, all matching, some at random, and for every ALLOW rule one that
// satisfies its L7 parts (so that a request the sidecar allows is found
// when there is one).
func valuations(in Input, rng *rand.Rand) []l7Valuation {
	out := []l7Valuation{{all: -1}, {all: 1}}
	for range 4 {
		out = append(out, l7Valuation{seed: rng.Uint64()})
	}
	for _, p := range in.Policies {
		if p == nil || p.Spec.GetAction() != securityv1beta1.AuthorizationPolicy_ALLOW {
			continue
		}
		for _, r := range p.Spec.GetRules() {
			force := map[string]bool{}
			set := func(field string, values, notValues []string) {
				if len(values) > 0 {
					force[field+"\x00"+values[0]] = true
				}
				for _, n := range notValues {
					force[field+"\x00"+n] = false
				}
			}
			for _, w := range r.GetWhen() {
				set("when:"+w.GetKey(), w.GetValues(), w.GetNotValues())
			}
			for _, f := range r.GetFrom() {
				s := f.GetSource()
				set("requestPrincipals", s.GetRequestPrincipals(), s.GetNotRequestPrincipals())
				set("remoteIpBlocks", s.GetRemoteIpBlocks(), s.GetNotRemoteIpBlocks())
			}
			for _, t := range r.GetTo() {
				o := t.GetOperation()
				set("hosts", o.GetHosts(), o.GetNotHosts())
				set("methods", o.GetMethods(), o.GetNotMethods())
				set("paths", o.GetPaths(), o.GetNotPaths())
			}
			out = append(out, l7Valuation{all: -1, force: force})
		}
	}
	return out
}

// foreignPeers are certificates of workloads the kernel does not know:
// pods of other nodes or clusters, in namespaces and trust domains the
// policies name and in others.
var foreignPeers = []string{"",
	"spiffe://cluster.local/ns/default/sa/frontend", "spiffe://cluster.local/ns/default/sa/backend",
	"spiffe://cluster.local/ns/prod/sa/api", "spiffe://cluster.local/ns/prod/sa/default",
	"spiffe://cluster.local/ns/legacy/sa/client", "spiffe://cluster.local/ns/default/sa/db",
	"spiffe://cluster.local/ns/remote/sa/x", "spiffe://old.org/ns/default/sa/frontend",
	"spiffe://example.org/ns/prod/sa/api", "spiffe://other.org/ns/istio-system/sa/istio-ingressgateway",
}

// checkKernelDenyImpliesSidecarDeny compiles in and, for every destination
// workload, source and port probed, checks that a connection the kernel
// denies is one the sidecar denies for every request on it. Known sources
// present their own identity (the kernel's documented trust in addresses);
// unknown ones every certificate of foreignPeers and the known identities.
// It returns the number of kernel denials checked.
func checkKernelDenyImpliesSidecarDeny(tb testing.TB, in Input, seed uint64) int {
	tb.Helper()
	// The kernel is not told the labels of a workload whose labels are
	// unknown; the sidecar has them.
	kernelIn := in
	kernelIn.Workloads = slices.Clone(in.Workloads)
	for i, w := range kernelIn.Workloads {
		if w.LabelsUnknown {
			kernelIn.Workloads[i].Labels = nil
		}
	}
	res, err := Compile(kernelIn, NewAllocator())
	if err != nil {
		tb.Fatalf("Compile: %v", err)
	}
	rng := rand.New(rand.NewPCG(seed, seed>>1|1))
	model := sidecarModel{ref: newRefEvaluator(in)}
	vals := valuations(in, rng)
	ports := portPool(in, rng)
	var unknownAddrs []netip.Addr
	for _, a := range addressPool(in, rng) {
		if _, known := res.IPIdentity[a]; !known {
			unknownAddrs = append(unknownAddrs, a)
		}
	}
	peers := slices.Clone(foreignPeers)
	for _, s := range res.Identities {
		peers = append(peers, s)
	}
	denials := 0
	check := func(w Workload, id IdentityID, ip netip.Addr, port uint16, peers []string) {
		idx := res.WorkloadSet[w.Key()]
		if idx < 0 {
			return
		}
		if allow, _ := res.Sets[idx].Verdict(id, ip, port); allow {
			return
		}
		denials++
		for _, peer := range peers {
			for _, v := range vals {
				if model.allows(w, sidecarRequest{peer: peer, ip: ip, port: port, l7: v}) {
					tb.Errorf("to %s from %s (kernel identity %d, certificate %q) port %d: the kernel denies, the sidecar allows (L7 valuation %+v)",
						w.Key(), ip, id, peer, port, v)
					return
				}
			}
		}
	}
	for _, w := range in.Workloads {
		for ip, id := range res.IPIdentity {
			for _, port := range ports {
				check(w, id, ip, port, []string{res.Identities[id]})
			}
		}
		for range 24 {
			check(w, UnknownIdentity, unknownAddrs[rng.IntN(len(unknownAddrs))], ports[rng.IntN(len(ports))], peers)
		}
	}
	if len(in.PeerAuthentications) > 0 {
		denials += checkPlaintextDenials(tb, in, res, model, vals, ports, unknownAddrs)
	}
	return denials
}

// TestKernelDenyImpliesSidecarDeny is the safety net's one rule as a
// property: over the golden cases and generated policies (every action,
// L4 and L7 fields, when keys, selectors, invalid and dry-run policies),
// workloads whose labels the kernel was not told, known and unknown sources
// and every port the policies name, whatever the kernel denies the sidecar
// denies too, for every request.
func TestKernelDenyImpliesSidecarDeny(t *testing.T) {
	denials := 0
	for _, c := range goldenCases {
		in := caseInput(t, c)
		if in.ServiceTargetRefs {
			continue // waypoint semantics on purpose: stricter than a sidecar
		}
		denials += checkKernelDenyImpliesSidecarDeny(t, in, seedOf(c.name))
		// Again with every workload's labels unknown to the kernel.
		for i := range in.Workloads {
			in.Workloads[i].LabelsUnknown = true
		}
		denials += checkKernelDenyImpliesSidecarDeny(t, in, seedOf(c.name))
	}
	n := 300
	if testing.Short() {
		n = 40
	}
	rng := rand.New(rand.NewPCG(3, 4))
	inputs := 0
	for i := range n {
		in, data := generatedInput(rng, i)
		denials += checkKernelDenyImpliesSidecarDeny(t, in, uint64(i))
		inputs++
		if t.Failed() {
			t.Fatalf("generated input %d: %x", i, data)
		}
	}
	if denials < 1000 {
		t.Errorf("only %d kernel denials were checked: the generator no longer exercises the rule", denials)
	}
	t.Logf("%d golden and %d generated inputs: %d kernel denials, each denied by the sidecar model too", len(goldenCases), inputs, denials)
}
