package policy

import (
	"math/rand/v2"
	"net/netip"
	"slices"
	"sort"
	"testing"
	"time"

	securityv1beta1 "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// sidecarMTLS is the sidecar's inbound mTLS mode for one port, written the
// way istiod computes it: getConfigsForWorkload (the workload's namespace,
// then the root namespace; a policy is a candidate when its selector is
// empty or matches the pod's real labels), sorted by creation time then
// "name.namespace", then ComposePeerAuthentication, then
// GetMutualTLSModeForPort (the per-port chain of a container port, or the
// passthrough chains for a port no Service names: the same mode).
func sidecarMTLS(root string, pas []*securityv1.PeerAuthentication, w Workload, port uint16) MTLSMode {
	lookup := []string{w.Namespace}
	if w.Namespace != root {
		lookup = append(lookup, root)
	}
	var configs []*securityv1.PeerAuthentication
	for _, ns := range lookup {
		for _, p := range pas {
			if p == nil || p.Namespace != ns {
				continue
			}
			sel := p.Spec.GetSelector().GetMatchLabels()
			match := true
			for k, v := range sel {
				if w.Labels[k] != v {
					match = false
				}
			}
			if match {
				configs = append(configs, p)
			}
		}
	}
	sort.SliceStable(configs, func(i, j int) bool {
		a, b := configs[i], configs[j]
		if a.CreationTimestamp.Equal(&b.CreationTimestamp) {
			return a.Name+"."+a.Namespace < b.Name+"."+b.Namespace
		}
		return a.CreationTimestamp.Before(&b.CreationTimestamp)
	})
	var meshCfg, nsCfg, wlCfg *securityv1.PeerAuthentication
	for _, p := range configs {
		// configs is sorted: the first of a level is the oldest.
		if len(p.Spec.GetSelector().GetMatchLabels()) == 0 {
			if p.Namespace == root {
				if meshCfg == nil {
					meshCfg = p
				}
			} else if nsCfg == nil {
				nsCfg = p
			}
		} else if p.Namespace != root && wlCfg == nil {
			wlCfg = p
		}
	}
	mode := MTLSPermissive
	set := func(m *securityv1beta1.PeerAuthentication_MutualTLS) {
		switch m.GetMode() {
		case securityv1beta1.PeerAuthentication_MutualTLS_STRICT:
			mode = MTLSStrict
		case securityv1beta1.PeerAuthentication_MutualTLS_PERMISSIVE:
			mode = MTLSPermissive
		case securityv1beta1.PeerAuthentication_MutualTLS_DISABLE:
			mode = MTLSDisable
		}
	}
	for _, p := range []*securityv1.PeerAuthentication{meshCfg, nsCfg, wlCfg} {
		if p != nil {
			set(p.Spec.GetMtls())
		}
	}
	if wlCfg != nil {
		if m, ok := wlCfg.Spec.GetPortLevelMtls()[uint32(port)]; ok {
			set(m) // UNSET keeps the workload's mode
		}
	}
	return mode
}

// checkPlaintextDenials probes sources known to have no sidecar: addresses
// of no workload (the kernel's identity 0, as the agent gives non-injected
// pods) and every workload address, with the plaintext flag set. The
// sidecar sees no certificate from them, and refuses them on a STRICT
// port. For an unknown identity every kernel denial must be the sidecar's
// (STRICT, or its authorization policies for a request without a
// certificate); for a known identity, which the kernel judges by address
// (see Limits), every denial the plaintext flag adds must be on a port
// the sidecar makes STRICT.
func checkPlaintextDenials(tb testing.TB, in Input, res Result, model sidecarModel, vals []l7Valuation, ports []uint16, unknownAddrs []netip.Addr) int {
	tb.Helper()
	root := in.RootNamespace
	if root == "" {
		root = DefaultRootNamespace
	}
	denials := 0
	for _, w := range in.Workloads {
		idx := res.WorkloadSet[w.Key()]
		if idx < 0 {
			continue
		}
		set := &res.Sets[idx]
		for _, port := range ports {
			strict := sidecarMTLS(root, in.PeerAuthentications, w, port) == MTLSStrict
			for _, ip := range unknownAddrs {
				if allow, _ := set.VerdictFrom(UnknownIdentity, ip, port, true); allow {
					continue
				}
				denials++
				if strict {
					continue
				}
				for _, v := range vals {
					if model.allows(w, sidecarRequest{peer: "", ip: ip, port: port, l7: v}) {
						tb.Errorf("to %s port %d (sidecar mTLS %v) from %s, known without sidecar: the kernel denies, the sidecar allows plaintext (L7 %+v)",
							w.Key(), port, sidecarMTLS(root, in.PeerAuthentications, w, port), ip, v)
						break
					}
				}
			}
			for ip, id := range res.IPIdentity {
				allow, _ := set.VerdictFrom(id, ip, port, true)
				if was, _ := set.Verdict(id, ip, port); allow || !was {
					continue
				}
				denials++
				if !strict {
					tb.Errorf("to %s port %d (sidecar mTLS %v) from %s (identity %d), known without sidecar: the kernel denies for plaintext where the sidecar accepts it",
						w.Key(), port, sidecarMTLS(root, in.PeerAuthentications, w, port), ip, id)
				}
			}
		}
	}
	return denials
}

// generatedPeerAuths are random PeerAuthentications over the namespaces
// and labels of in's workloads and the root namespace: every mode and
// UNSET, no mtls at all, selectors that match, that match nothing and
// empty ones, port-level settings on ports of portPool and others, and
// creation times that tie.
func generatedPeerAuths(rng *rand.Rand, in Input) []*securityv1.PeerAuthentication {
	root := in.RootNamespace
	if root == "" {
		root = DefaultRootNamespace
	}
	nss := []string{root}
	var labels []map[string]string
	for _, w := range in.Workloads {
		nss = append(nss, w.Namespace)
		labels = append(labels, w.Labels)
	}
	modes := []securityv1beta1.PeerAuthentication_MutualTLS_Mode{
		securityv1beta1.PeerAuthentication_MutualTLS_UNSET, securityv1beta1.PeerAuthentication_MutualTLS_DISABLE,
		securityv1beta1.PeerAuthentication_MutualTLS_PERMISSIVE, securityv1beta1.PeerAuthentication_MutualTLS_STRICT,
		securityv1beta1.PeerAuthentication_MutualTLS_STRICT,
	}
	mtls := func() *securityv1beta1.PeerAuthentication_MutualTLS {
		if rng.IntN(8) == 0 {
			return nil
		}
		return &securityv1beta1.PeerAuthentication_MutualTLS{Mode: modes[rng.IntN(len(modes))]}
	}
	ports := []uint32{80, 443, 5432, 8080, 9090, 15006, 65535}
	var out []*securityv1.PeerAuthentication
	for i := range 1 + rng.IntN(6) {
		p := &securityv1.PeerAuthentication{ObjectMeta: metav1.ObjectMeta{
			Namespace:         nss[rng.IntN(len(nss))],
			Name:              string(rune('a' + rng.IntN(4))),
			CreationTimestamp: metav1.NewTime(time.Date(2026, 1, 1, 0, 0, rng.IntN(3), 0, time.UTC)),
		}}
		p.Name += string(rune('0' + i))
		switch rng.IntN(4) {
		case 0: // namespace- or mesh-wide
		case 1:
			p.Spec.Selector = &typev1beta1.WorkloadSelector{MatchLabels: map[string]string{}}
		case 2: // a workload's labels, mostly in its own namespace
			j := rng.IntN(len(labels))
			if rng.IntN(4) > 0 {
				p.Namespace = in.Workloads[j].Namespace
			}
			if len(labels[j]) > 0 {
				p.Spec.Selector = &typev1beta1.WorkloadSelector{MatchLabels: labels[j]}
			}
		case 3:
			p.Spec.Selector = &typev1beta1.WorkloadSelector{MatchLabels: map[string]string{"app": "nothing"}}
		}
		p.Spec.Mtls = mtls()
		if rng.IntN(2) == 0 {
			p.Spec.PortLevelMtls = map[uint32]*securityv1beta1.PeerAuthentication_MutualTLS{}
			for range 1 + rng.IntN(3) {
				p.Spec.PortLevelMtls[ports[rng.IntN(len(ports))]] = mtls()
			}
		}
		out = append(out, p)
	}
	return out
}

// TestKernelDenyImpliesSidecarDenyPeerAuth is TestKernelDenyImpliesSidecarDeny
// with PeerAuthentications: over the golden cases and generated policies,
// with random PeerAuthentications (every level, mode and port-level
// override, ties, labels unknown to the kernel), whatever the kernel denies
// the sidecar denies too, for meshed, unknown and known-plaintext sources.
func TestKernelDenyImpliesSidecarDenyPeerAuth(t *testing.T) {
	denials := 0
	for _, c := range goldenCases {
		in := caseInput(t, c)
		if in.ServiceTargetRefs {
			continue
		}
		rng := rand.New(rand.NewPCG(seedOf(c.name), 7))
		in.PeerAuthentications = generatedPeerAuths(rng, in)
		denials += checkKernelDenyImpliesSidecarDeny(t, in, seedOf(c.name))
		for i := range in.Workloads {
			in.Workloads[i].LabelsUnknown = true
		}
		denials += checkKernelDenyImpliesSidecarDeny(t, in, seedOf(c.name))
	}
	n := 150
	if testing.Short() {
		n = 30
	}
	rng := rand.New(rand.NewPCG(5, 6))
	strictDenials := 0
	for i := range n {
		in, data := generatedInput(rng, i)
		in.PeerAuthentications = generatedPeerAuths(rng, in)
		if i%3 == 0 {
			in.Policies = nil // STRICT alone
		}
		d := checkKernelDenyImpliesSidecarDeny(t, in, uint64(i))
		denials += d
		if i%3 == 0 {
			strictDenials += d
		}
		if t.Failed() {
			t.Fatalf("generated input %d: %x, peer authentications %v", i, data, describePAs(in.PeerAuthentications))
		}
	}
	if strictDenials < 200 {
		t.Errorf("only %d denials by STRICT alone: the generator no longer exercises it", strictDenials)
	}
	t.Logf("%d kernel denials (%d with STRICT alone), each denied by the sidecar model too", denials, strictDenials)
}

func describePAs(pas []*securityv1.PeerAuthentication) []string {
	var out []string
	for _, p := range pas {
		out = append(out, p.Namespace+"/"+p.Name+" "+p.CreationTimestamp.String()+" "+p.Spec.String())
	}
	return slices.Clip(out)
}
