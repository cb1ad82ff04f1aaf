package agent

import (
	"net/netip"

	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/istio"
	"github.com/meshsplice/meshsplice/policy"
)

// plaintextIPs are the addresses of pods known to have no sidecar, whose
// connections a STRICT port refuses (PeerAuthentication). Never a guess:
//
//   - an address the Kubernetes source knows (istio.Config.PodIPs) is
//     plaintext when that pod is not injected, runs no istio-proxy
//     container and is not terminating (istio.PodIdentity.Plaintext);
//   - otherwise (standalone), a registered pod's, when the runtime passed
//     its annotations and they have no sidecar.istio.io/status;
//   - never a registered pod with a sidecar, a pod rebuilt from the kernel
//     (its annotations are unknown), a WorkloadEntry or an address no pod
//     owns: unknown is never denied.
func plaintextIPs(c istio.Config, pods map[string]*pod) map[netip.Addr]bool {
	out := map[netip.Addr]bool{}
	for ip, id := range c.PodIPs {
		if id.Plaintext() {
			out[ip.Unmap()] = true
		}
	}
	for _, p := range pods {
		_, injected := p.Reg.Annotations[istio.AnnotationStatus]
		for _, ip := range p.Reg.IPs {
			ip = ip.Unmap()
			if _, known := c.PodIPs[ip]; known && !injected {
				continue // the API server's answer stands
			}
			out[ip] = !injected && !p.Recovered && len(p.Reg.Annotations) > 0
		}
	}
	for _, we := range c.WorkloadEntries {
		if addr, err := netip.ParseAddr(we.Spec.GetAddress()); err == nil {
			out[addr.Unmap()] = false
		}
	}
	for ip, plain := range out {
		if !plain {
			delete(out, ip)
		}
	}
	return out
}

// markPlaintext flags the plaintext addresses in dp, adding an entry
// (unknown identity, no set) for those policy does not know, but only when
// a set has a STRICT atom: otherwise the flag changes no verdict and the
// entries would only fill ms_ip_info.
func markPlaintext(dp *datapath.Policy, res policy.Result, plain map[netip.Addr]bool) {
	strict := false
	for _, s := range res.Sets {
		strict = strict || s.PlaintextMask != 0
	}
	if !strict {
		return
	}
	for ip := range plain {
		v, ok := dp.IPs[ip]
		if !ok {
			v = datapath.IPPolicy{Set: -1}
		}
		v.Plaintext = true
		dp.IPs[ip] = v
	}
}
