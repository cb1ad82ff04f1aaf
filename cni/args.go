package cni

import (
	"fmt"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
)

// CNI_ARGS keys the plugin reads. The K8S_POD_* ones are what Kubernetes
// runtimes pass; K8S_POD_SERVICE_ACCOUNT is meshsplice's own, for
// standalone use (a Kubernetes runtime does not pass it).
const (
	ArgPodName        = "K8S_POD_NAME"
	ArgPodNamespace   = "K8S_POD_NAMESPACE"
	ArgPodUID         = "K8S_POD_UID"
	ArgServiceAccount = "K8S_POD_SERVICE_ACCOUNT"
)

// podArgs are the pod's identity from CNI_ARGS.
type podArgs struct {
	name, namespace, uid, serviceAccount string
}

// parseArgs reads CNI_ARGS ("K1=V1;K2=V2"). Unknown keys are ignored
// whatever IgnoreUnknown says: they belong to other plugins of the chain.
func parseArgs(s string) (podArgs, error) {
	var a podArgs
	if s == "" {
		return a, nil
	}
	for _, pair := range strings.Split(s, ";") {
		if pair == "" {
			continue
		}
		k, v, ok := strings.Cut(pair, "=")
		if !ok {
			return podArgs{}, types.NewError(types.ErrInvalidEnvironmentVariables,
				fmt.Sprintf("meshsplice-cni: CNI_ARGS: %q is not KEY=VALUE", pair), "")
		}
		switch k {
		case ArgPodName:
			a.name = v
		case ArgPodNamespace:
			a.namespace = v
		case ArgPodUID:
			a.uid = v
		case ArgServiceAccount:
			a.serviceAccount = v
		}
	}
	return a, nil
}

// podIPs returns the addresses the previous plugins gave the pod: those of
// the interfaces inside the pod's namespace (Sandbox is netns), or, when no
// interface says so, every address of the result.
func podIPs(res *current.Result, netns string) []netip.Addr {
	inPod := func(ipc *current.IPConfig) bool {
		if ipc.Interface == nil || *ipc.Interface < 0 || *ipc.Interface >= len(res.Interfaces) {
			return false
		}
		sb := res.Interfaces[*ipc.Interface].Sandbox
		return sb != "" && filepath.Clean(sb) == filepath.Clean(netns)
	}
	var own, all []netip.Addr
	for _, ipc := range res.IPs {
		if ipc == nil {
			continue
		}
		a, ok := netip.AddrFromSlice(ipc.Address.IP)
		if !ok {
			continue
		}
		a = a.Unmap()
		if !slices.Contains(all, a) {
			all = append(all, a)
		}
		if inPod(ipc) && !slices.Contains(own, a) {
			own = append(own, a)
		}
	}
	if len(own) > 0 {
		return own
	}
	return all
}

// sameAddrs reports whether a and b hold the same addresses, in any order.
func sameAddrs(a, b []netip.Addr) bool {
	a, b = slices.Clone(a), slices.Clone(b)
	slices.SortFunc(a, netip.Addr.Compare)
	slices.SortFunc(b, netip.Addr.Compare)
	return slices.Equal(slices.Compact(a), slices.Compact(b))
}
