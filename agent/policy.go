package agent

import (
	"bytes"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"

	"github.com/meshsplice/meshsplice/agent/api"
	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/istio"
	"github.com/meshsplice/meshsplice/policy"
)

// The identity policy safety net, agent side: compile the Istio
// AuthorizationPolicies and PeerAuthentications for every known workload (the node's pods, the
// WorkloadEntries of the config and, on Kubernetes, the cluster's injected
// pods) and hand the result to the datapath, then close live connections
// the change now forbids.

// spiffeID is a workload's identity.
func spiffeID(trustDomain, namespace, serviceAccount string) string {
	if serviceAccount == "" {
		serviceAccount = "default"
	}
	return fmt.Sprintf("spiffe://%s/ns/%s/sa/%s", trustDomain, namespace, serviceAccount)
}

func podNamespace(r podReg) string {
	if r.PodNamespace != "" {
		return r.PodNamespace
	}
	return "default"
}

func podName(r podReg) string {
	if r.PodName != "" {
		return r.PodName
	}
	return r.ContainerID
}

func (a *Agent) identitiesPath() string { return filepath.Join(a.cfg.StateDir, "identities.json") }

// loadIdentities restores the identity numbers of an earlier agent, so
// that the kernel's identities stay stable across restarts.
func (a *Agent) loadIdentities() error {
	a.ids = policy.NewAllocator()
	b, err := os.ReadFile(a.identitiesPath())
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("load identities: %w", err)
	}
	if err := a.ids.Load(bytes.NewReader(b)); err != nil {
		// A corrupt file must not keep the agent down: move it aside and
		// number afresh, above what the kernel holds (loadState).
		aside, qerr := quarantine(a.identitiesPath())
		if qerr != nil {
			return fmt.Errorf("load identities from %s: %w (%w)", a.identitiesPath(), err, qerr)
		}
		a.log.Error("workload identities unreadable; moved aside, numbering them afresh (the next policy install uses the new numbers)",
			"error", err, "moved_to", aside)
		a.failed("load_identities", err)
		a.identitiesLost = true
	}
	return nil
}

func (a *Agent) saveIdentities() error {
	var buf bytes.Buffer
	if err := a.ids.Save(&buf); err != nil {
		return err
	}
	if err := writeFileSync(a.identitiesPath(), buf.Bytes()); err != nil {
		return fmt.Errorf("save identities: %w", err)
	}
	return nil
}

// podIdentity is the identity number of a registered pod.
func (a *Agent) podIdentity(p *pod) uint32 {
	return uint32(a.ids.ID(spiffeID(a.istio.TrustDomain(), podNamespace(p.Reg), p.Reg.ServiceAccount)))
}

// bypassPorts are never judged by the kernel: the sidecar's own ports,
// which Istio's authorization does not cover.
func bypassPorts() []uint16 {
	return slices.Clone(istio.ProxyPorts)
}

// policyInputs is what a compile needs, copied from the agent's state.
type policyInputs struct {
	in         policy.Input
	ipWorkload map[netip.Addr]string // address -> workload key
	plaintext  map[netip.Addr]bool   // addresses known to have no sidecar (PeerAuthentication STRICT)
}

// policyInputs takes the compile's inputs. Called with a.mu held.
func (a *Agent) policyInputs() policyInputs {
	in, ipWorkload := policyInput(a.istio, a.pods)
	return policyInputs{in: in, ipWorkload: ipWorkload, plaintext: plaintextIPs(a.istio, a.pods)}
}

// reconcilePolicy compiles and installs the policy, and when the kernel
// policy changed (a policy edit, or a registration that changes which
// identity an address has), closes the live connections it now forbids.
// Called by the policy worker only, without a.mu: a.applied is its own.
func (a *Agent) reconcilePolicy(pi policyInputs) error {
	in, ipWorkload := pi.in, pi.ipWorkload
	res, err := policy.Compile(in, a.ids)
	if err != nil {
		return fmt.Errorf("compile authorization policies: %w", err)
	}
	for _, w := range res.Warnings {
		a.log.Warn("authorization policy", "warning", w)
	}
	for _, ig := range res.Ignored {
		a.log.Info("authorization policy left to the sidecar", "why", ig)
	}
	for w, why := range res.Unenforced {
		a.log.Warn("no kernel policy for a workload; its sidecar still enforces", "workload", w, "why", why)
	}
	for w, why := range res.Partial {
		a.log.Info("part of a workload's policy left to its sidecar", "workload", w, "why", why)
	}
	dp := kernelPolicy(res, ipWorkload)
	markPlaintext(&dp, res, pi.plaintext)
	a.mu.Lock()
	a.policy = res
	a.mu.Unlock()
	if reflect.DeepEqual(dp, a.applied) {
		return a.saveIdentities()
	}
	if err := a.dp.SetPolicy(dp); err != nil {
		return err
	}
	a.applied = dp
	if err := a.saveIdentities(); err != nil {
		return err
	}
	{
		n, err := a.dp.TeardownForbidden()
		switch {
		case errors.Is(err, datapath.ErrTeardownUnsupported):
			a.log.Warn("live connections that the new policy forbids stay open until they close", "why", err)
		case err != nil:
			return err
		case n > 0:
			a.log.Info("closed live connections the new policy forbids", "connections", n)
		}
	}
	return nil
}

// policyInput is what the policy is compiled from: c's policies and
// services, and every known workload (the registered pods, the
// WorkloadEntries and, on Kubernetes, the cluster's injected pods), with
// each workload address's workload key.
func policyInput(c istio.Config, pods map[string]*pod) (policy.Input, map[netip.Addr]string) {
	in := policy.Input{
		TrustDomain:   c.TrustDomain(),
		RootNamespace: c.RootNamespace(),
		Policies:      c.AuthorizationPolicies,
		// PeerAuthentication STRICT: sources known to have no sidecar
		// (plaintextIPs) are refused on STRICT ports.
		PeerAuthentications: c.PeerAuthentications,
	}
	if m := c.Mesh; m != nil {
		in.TrustDomainAliases = m.GetTrustDomainAliases()
	}
	ipWorkload := map[netip.Addr]string{}
	for _, p := range pods {
		if p.Recovered {
			continue // namespace, account and labels unknown: left to its sidecar
		}
		if _, injected := p.Reg.Annotations[istio.AnnotationStatus]; !injected {
			// Not known to have a sidecar: it shows the destination's
			// sidecar no certificate, so no principal or namespace, and
			// has no sidecar of its own to enforce a policy. Attributing
			// its service account's identity could deny what the
			// sidecar allows (a DENY by that principal); it stays an
			// unknown source (ipBlocks still judge it) and, where it is
			// known to be plaintext, STRICT refuses it (plaintextIPs).
			continue
		}
		// No labels means the runtime passed none (the CNI capability is
		// unfilled): unknown, not "selected by nothing".
		w := policy.Workload{Namespace: podNamespace(p.Reg), Name: podName(p.Reg),
			ServiceAccount: p.Reg.ServiceAccount, Labels: p.Reg.Labels, LabelsUnknown: len(p.Reg.Labels) == 0,
			IPs: p.Reg.IPs}
		in.Workloads = append(in.Workloads, w)
		for _, ip := range p.Reg.IPs {
			ipWorkload[ip.Unmap()] = w.Key()
		}
	}
	for _, we := range c.WorkloadEntries {
		addr, err := netip.ParseAddr(we.Spec.GetAddress())
		if err != nil {
			continue // the source validated it; never here
		}
		w := policy.Workload{Namespace: we.Namespace, Name: "workloadentry/" + we.Name,
			ServiceAccount: we.Spec.GetServiceAccount(), Labels: we.Spec.GetLabels(), IPs: []netip.Addr{addr}}
		in.Workloads = append(in.Workloads, w)
		ipWorkload[addr.Unmap()] = w.Key()
	}
	for _, w := range clusterWorkloads(c, ipWorkload) { // Kubernetes: pods of other nodes
		in.Workloads = append(in.Workloads, w)
		for _, ip := range w.IPs {
			ipWorkload[ip] = w.Key()
		}
	}
	for _, s := range c.Services {
		in.Services = append(in.Services, policy.Service{Namespace: s.Namespace, Name: s.Name, Selector: s.Selector})
	}
	return in, ipWorkload
}

// kernelPolicy is the compiled policy in the datapath's form.
func kernelPolicy(res policy.Result, ipWorkload map[netip.Addr]string) datapath.Policy {
	dp := datapath.Policy{IPs: map[netip.Addr]datapath.IPPolicy{}}
	for _, s := range res.Sets {
		dp.Sets = append(dp.Sets, kernelSet(s))
	}
	for ip, id := range res.IPIdentity {
		set := -1
		if i, ok := res.WorkloadSet[ipWorkload[ip.Unmap()]]; ok {
			set = i
		}
		dp.IPs[ip] = datapath.IPPolicy{Identity: uint32(id), Set: set}
	}
	return dp
}

// kernelSet converts a compiled set to the datapath's form.
func kernelSet(s policy.PolicySet) datapath.PolicySet {
	k := datapath.PolicySet{
		HasAllow: s.HasAllow, AllowMask: s.AllowMask, DenyMask: s.DenyMask, PlaintextMask: s.PlaintextMask,
		DefaultIdentityMask: s.DefaultIdentityMask, DefaultPortMask: s.DefaultPortMask,
		IdentityMasks: make(map[uint32]uint64, len(s.IdentityMasks)),
		PrefixMasks:   s.PrefixMasks,
		PortMasks:     s.PortMasks,
		BypassPorts:   bypassPorts(),
	}
	for id, m := range s.IdentityMasks {
		k.IdentityMasks[uint32(id)] = m
	}
	for _, at := range s.Atoms {
		k.Atoms = append(k.Atoms, fmt.Sprintf("%s %s (rule %d)", at.Action, at.Policy, at.Rule))
	}
	return k
}

// podPolicy says whether the kernel enforces p's policy: the kernel's view
// (datapath.PodPolicy, what `meshsplice status` reads without the agent)
// with what only the agent knows. Called with a.mu held.
func (a *Agent) podPolicy(p *pod, kernel map[uint64]datapath.PodPolicy) *api.PolicyStatus {
	kp, ok := kernel[p.Cookie]
	if !ok {
		return &api.PolicyStatus{Reason: "the pod is not in the kernel tables"}
	}
	st := &api.PolicyStatus{Enforced: kp.Enforced, Reason: kp.Reason}
	key := podNamespace(p.Reg) + "/" + podName(p.Reg)
	var why []string
	if err := a.policy.Unenforced[key]; err != nil && kp.Reason != datapath.ReasonNoSidecar {
		why = append(why, err.Error())
	} else if kp.Reason != "" {
		why = append(why, kp.Reason)
	}
	if s, ok := a.policy.Partial[key]; ok {
		why = append(why, s)
	}
	if ps := a.dp.PolicyState(); ps.LastError != "" {
		why = append(why, "policy not applied, the previous one is in force: "+ps.LastError)
	}
	st.Reason = strings.Join(why, "; ")
	return st
}
