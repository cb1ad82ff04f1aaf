package agent

import (
	"net/netip"
	"sort"

	"github.com/meshsplice/meshsplice/istio"
	"github.com/meshsplice/meshsplice/policy"
)

// clusterWorkloads are the pods of the cluster that the Kubernetes source
// knows (istio.Config.PodIPs) and that neither a registered pod nor a
// WorkloadEntry covers (known: IP -> workload key), as policy workloads,
// so that a source on another node has its real identity in this node's
// policy decisions. Only injected pods: a pod without a sidecar shows the
// destination's sidecar no identity, so the kernel must not attribute one
// to it (it could deny what the sidecar allows); its IP stays unknown, and
// unknown is never denied. A pod with an IP already known is skipped
// whole.
func clusterWorkloads(c istio.Config, known map[netip.Addr]string) []policy.Workload {
	byPod := map[string]*policy.Workload{}
	skip := map[string]bool{}
	for ip, id := range c.PodIPs {
		if !id.Injected {
			continue
		}
		key := id.Namespace + "/" + id.Name
		if _, ok := known[ip.Unmap()]; ok {
			skip[key] = true
			continue
		}
		w := byPod[key]
		if w == nil {
			w = &policy.Workload{Namespace: id.Namespace, Name: id.Name, ServiceAccount: id.ServiceAccount}
			byPod[key] = w
		}
		w.IPs = append(w.IPs, ip.Unmap())
	}
	var out []policy.Workload
	for key, w := range byPod {
		if skip[key] {
			continue
		}
		sort.Slice(w.IPs, func(i, j int) bool { return w.IPs[i].Less(w.IPs[j]) })
		out = append(out, *w)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Key() < out[j].Key() })
	return out
}
