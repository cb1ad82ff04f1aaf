package istio

import (
	"context"
	"fmt"
	"net/netip"
	"strconv"

	meshv1alpha1 "istio.io/api/mesh/v1alpha1"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
)

// Config is everything meshsplice reads from Istio's configuration: what a
// config Source delivers, whole, each time something changes.
type Config struct {
	// Mesh is the mesh config (the "mesh" key of the istio ConfigMap), with
	// Istio's defaults for what it does not set.
	Mesh *meshv1alpha1.MeshConfig
	// Node holds meshsplice's switches from the meshsplice ConfigMap.
	Node NodeSwitches
	// AuthorizationPolicies are the security.istio.io/v1 policies.
	AuthorizationPolicies []*securityv1.AuthorizationPolicy
	// WorkloadEntries are workloads outside this node's pods (VMs, pods of
	// other nodes in standalone mode): their addresses, identities and
	// labels, for policy.
	WorkloadEntries []*networkingv1.WorkloadEntry
	// Services are Kubernetes Services (name and selector), for policy
	// targetRefs.
	Services []Service
	// PeerAuthentications are the security.istio.io/v1 ones (mTLS modes:
	// the kernel refuses, on STRICT ports, pods known to have no sidecar).
	PeerAuthentications []*securityv1.PeerAuthentication
	// Sources names where each part came from, for status and logs.
	Sources []string
	// Revision is the Istio revision the source follows (KubeSource:
	// "default" or its Revision); the pods another revision injected are
	// left alone ([ForRevision]). Empty (FileSource): every revision's.
	Revision string

	// The Kubernetes source's only (KubeSource; empty from FileSource):
	// Pods are this node's pods that have not terminated (Succeeded or
	// Failed), each with Istio's answer (ClassifyPod);
	// PodIPs maps the IP of every live pod of the cluster to its identity
	// and whether it has a sidecar; Namespaces have their labels
	// (istio-injection, istio.io/rev).
	Pods       []Pod
	PodIPs     map[netip.Addr]PodIdentity
	Namespaces []Namespace
}

// Service is a Kubernetes Service as policy needs it.
type Service struct {
	Namespace, Name string
	Selector        map[string]string
}

// NodeSwitches are meshsplice's own switches, from the data of a ConfigMap
// named "meshsplice" (keys "capture", "splice" and "app-splice": "enabled"
// or "disabled"; all default to enabled).
type NodeSwitches struct {
	Capture bool
	Splice  bool
	// AppSpliceOff is app-splice: disabled: no app socket of the node is
	// spliced, whatever its pod's meshsplice.io/app-splice says; sidecar
	// <-> sidecar splicing goes on. The zero value is enabled.
	AppSpliceOff bool
}

// Defaults turns the mesh config into the defaults a pod's annotations are
// resolved against.
func (c Config) Defaults() Defaults {
	d := DefaultDefaults()
	if c.Mesh == nil {
		return d
	}
	if p := c.Mesh.GetProxyListenPort(); p > 0 && p < 65536 {
		d.OutboundPort = uint16(p)
	}
	if p := c.Mesh.GetProxyInboundListenPort(); p > 0 && p < 65536 {
		d.InboundPort = uint16(p)
	}
	if dc := c.Mesh.GetDefaultConfig(); dc != nil {
		if dc.GetInterceptionMode() == meshv1alpha1.ProxyConfig_TPROXY {
			d.InterceptionMode = "TPROXY"
		}
		if p := dc.GetStatusPort(); p > 0 && p < 65536 {
			d.StatusPort = uint16(p)
		}
		// The proxy's environment, where istio-cni reads it from
		// (ProxyEnvironments["ISTIO_DUAL_STACK"]).
		if b, err := strconv.ParseBool(dc.GetProxyMetadata()["ISTIO_DUAL_STACK"]); err == nil {
			d.DualStack = b
		}
	}
	return d
}

// TrustDomain is the mesh's SPIFFE trust domain (default cluster.local).
func (c Config) TrustDomain() string {
	if td := c.Mesh.GetTrustDomain(); td != "" {
		return td
	}
	return "cluster.local"
}

// Source delivers Istio configuration: the standalone folder of YAML
// (FileSource) or, on Kubernetes, the API server. Run sends the current
// Config as soon as it has one and then a new one after every change, until
// ctx ends. A source never sends a half-read state: when a change is
// invalid it reports the error and keeps the last good Config; when there
// is none yet (the first read is invalid), Run returns the error.
type Source interface {
	Run(ctx context.Context, updates chan<- Config) error
}

// RootNamespace is the mesh's root namespace (policies there apply
// mesh-wide; default istio-system).
func (c Config) RootNamespace() string {
	if ns := c.Mesh.GetRootNamespace(); ns != "" {
		return ns
	}
	return "istio-system"
}

// DefaultMeshConfig returns Istio's defaults for the fields meshsplice
// reads.
func DefaultMeshConfig() *meshv1alpha1.MeshConfig {
	return &meshv1alpha1.MeshConfig{
		ProxyListenPort:        15001,
		ProxyInboundListenPort: 15006,
		TrustDomain:            "cluster.local",
		DefaultConfig:          &meshv1alpha1.ProxyConfig{StatusPort: 15020},
	}
}

func (s NodeSwitches) String() string {
	return fmt.Sprintf("capture=%v splice=%v app-splice=%v", s.Capture, s.Splice, !s.AppSpliceOff)
}
