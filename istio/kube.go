package istio

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"google.golang.org/protobuf/encoding/protojson"
	meshv1alpha1 "istio.io/api/mesh/v1alpha1"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	istioinformers "istio.io/client-go/pkg/informers/externalversions"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"
)

// KubeSource reads Istio's and Kubernetes' configuration from the API
// server with shared informers (watches, no polling):
//
//   - this node's pods (field selector spec.nodeName), whole, classified
//     by [ClassifyPod] into Config.Pods;
//   - every pod of the cluster, trimmed on arrival to its name, service
//     account, node, IPs and whether it has Istio's sidecar or an
//     istio-proxy container (a transform: the cache holds no labels, other
//     annotations or other containers), into Config.PodIPs, so that a
//     source on another node has its real identity, and a pod without a
//     sidecar is known as such (PeerAuthentication STRICT);
//   - namespaces, Services, WorkloadEntries, AuthorizationPolicies and
//     PeerAuthentications, cluster wide;
//   - the mesh config: data.mesh of the ConfigMap "istio" ("istio-REV" for
//     a named revision) in IstioNamespace; Istio's defaults while there is
//     none;
//   - the meshsplice ConfigMap (node switches) in SwitchesNamespace.
//
// Changes are batched (Batch) and sent as one whole Config. An invalid
// mesh config or meshsplice ConfigMap is reported and the last good one
// stays in force (Istio's defaults and both switches on before any);
// everything else the API server has validated already, except a
// WorkloadEntry whose address is a DNS name, which is skipped (it names
// no IP address for policy). Objects in a Config are the informers' own
// and must not be modified.
type KubeSource struct {
	Config   *rest.Config
	NodeName string
	// IstioNamespace is istiod's namespace (default istio-system).
	IstioNamespace string
	// Revision is the Istio revision this node follows ("": default):
	// its mesh config, and which injected pods are meshed.
	Revision string
	// SwitchesNamespace holds the meshsplice ConfigMap (default
	// IstioNamespace).
	SwitchesNamespace string
	// Batch is how long changes are gathered before a Config is sent
	// (default 100ms).
	Batch time.Duration
	Log   *slog.Logger

	lastMesh     []byte // the mesh config in force (protojson) and where from
	lastMeshFrom string
	lastSwitches *NodeSwitches
	reported     map[string]string // what was logged as rejected, so it is logged once

	lookup       atomic.Pointer[kubeLookup] // for LookupPod (kubelookup.go), set by Run
	lastDefaults atomic.Pointer[Defaults]
}

// KubeRESTConfig is the API server's address and credentials: from the
// kubeconfig file if one is named, else the pod's in-cluster service
// account.
func KubeRESTConfig(kubeconfig string) (*rest.Config, error) {
	if kubeconfig != "" {
		c, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
		if err != nil {
			return nil, fmt.Errorf("kubeconfig %s: %w", kubeconfig, err)
		}
		return c, nil
	}
	c, err := rest.InClusterConfig()
	if err != nil {
		return nil, fmt.Errorf("in-cluster Kubernetes config (or give --kubeconfig): %w", err)
	}
	return c, nil
}

func (s *KubeSource) revision() string {
	if s.Revision == "" {
		return DefaultRevision
	}
	return s.Revision
}

// MeshConfigMapName is the name of the istio ConfigMap of a revision.
func MeshConfigMapName(revision string) string {
	if revision == "" || revision == DefaultRevision {
		return "istio"
	}
	return "istio-" + revision
}

// PodIdentity is who owns a pod IP, for policy on sources of other nodes.
// Injected says the pod has Istio's sidecar (sidecar.istio.io/status):
// only then does the destination's sidecar see its identity (mTLS), so
// only then may policy use it. Proxy says it runs an istio-proxy container
// (regular or init), injected or not (a gateway deployed without
// injection, a waypoint); Terminating that it is being deleted (its IP may
// be handed to a new pod before the deletion is seen).
type PodIdentity struct {
	Namespace, Name, ServiceAccount, NodeName string
	Injected, Proxy, Terminating              bool
}

// Plaintext says the pod surely has no sidecar and no Istio proxy of its
// own: not injected, no istio-proxy container, not terminating. Its
// connections are plaintext, which a STRICT port refuses. Anything else
// might present an Istio certificate.
func (p PodIdentity) Plaintext() bool { return !p.Injected && !p.Proxy && !p.Terminating }

// hasProxyContainer: the pod runs istio-proxy, as a container or an init
// container (native sidecar), whoever put it there.
func hasProxyContainer(pod *corev1.Pod) bool {
	for _, cs := range [][]corev1.Container{pod.Spec.Containers, pod.Spec.InitContainers} {
		for _, c := range cs {
			if c.Name == ProxyContainer {
				return true
			}
		}
	}
	return false
}

// Namespace is a Kubernetes namespace's name and labels.
type Namespace struct {
	Name   string
	Labels map[string]string
}

// kubeInformers are the caches KubeSource reads a Config from.
type kubeInformers struct {
	localPods, allPods, namespaces, services, istioCMs, switchCMs cache.SharedIndexInformer
	policies, peerAuth, entries                                   cache.SharedIndexInformer
}

// Run implements Source.
func (s *KubeSource) Run(ctx context.Context, updates chan<- Config) error {
	if s.Config == nil {
		return errors.New("kubernetes source: no API server config")
	}
	if s.NodeName == "" {
		return errors.New("kubernetes source: no node name (--node-name, or NODE_NAME from the downward API)")
	}
	if s.IstioNamespace == "" {
		s.IstioNamespace = "istio-system"
	}
	if s.SwitchesNamespace == "" {
		s.SwitchesNamespace = s.IstioNamespace
	}
	if s.Batch <= 0 {
		s.Batch = 100 * time.Millisecond
	}
	if s.Log == nil {
		s.Log = slog.New(slog.DiscardHandler)
	}
	s.reported = map[string]string{}
	kc, err := kubernetes.NewForConfig(s.Config)
	if err != nil {
		return fmt.Errorf("kubernetes client: %w", err)
	}
	ic, err := istioclient.NewForConfig(s.Config)
	if err != nil {
		return fmt.Errorf("istio client: %w", err)
	}

	local := informers.NewSharedInformerFactoryWithOptions(kc, 0, informers.WithTweakListOptions(func(o *metav1.ListOptions) {
		o.FieldSelector = "spec.nodeName=" + s.NodeName
	}))
	cluster := informers.NewSharedInformerFactory(kc, 0)
	istioNS := informers.NewSharedInformerFactoryWithOptions(kc, 0, informers.WithNamespace(s.IstioNamespace))
	switchNS := istioNS
	if s.SwitchesNamespace != s.IstioNamespace {
		switchNS = informers.NewSharedInformerFactoryWithOptions(kc, 0, informers.WithNamespace(s.SwitchesNamespace))
	}
	istioF := istioinformers.NewSharedInformerFactory(ic, 0)

	inf := kubeInformers{
		localPods:  local.Core().V1().Pods().Informer(),
		allPods:    cluster.Core().V1().Pods().Informer(),
		namespaces: cluster.Core().V1().Namespaces().Informer(),
		services:   cluster.Core().V1().Services().Informer(),
		istioCMs:   istioNS.Core().V1().ConfigMaps().Informer(),
		switchCMs:  switchNS.Core().V1().ConfigMaps().Informer(),
		policies:   istioF.Security().V1().AuthorizationPolicies().Informer(),
		peerAuth:   istioF.Security().V1().PeerAuthentications().Informer(),
		entries:    istioF.Networking().V1().WorkloadEntries().Informer(),
	}
	s.lookup.Store(&kubeLookup{client: kc, local: inf.localPods.GetStore(), revision: s.Revision, defaults: &s.lastDefaults})
	if err := inf.allPods.SetTransform(trimPod); err != nil {
		return fmt.Errorf("pod transform: %w", err)
	}
	changed := make(chan struct{}, 1)
	poke := func() {
		select {
		case changed <- struct{}{}:
		default:
		}
	}
	always := cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { poke() },
		UpdateFunc: func(any, any) { poke() },
		DeleteFunc: func(any) { poke() },
	}
	for _, i := range []cache.SharedIndexInformer{inf.localPods, inf.namespaces, inf.services, inf.istioCMs,
		inf.switchCMs, inf.policies, inf.peerAuth, inf.entries} {
		if _, err := i.AddEventHandler(always); err != nil {
			return err
		}
	}
	// Pod status changes all the time; only identity changes matter here.
	if _, err := inf.allPods.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: func(any) { poke() },
		UpdateFunc: func(o, n any) {
			op, ok1 := o.(*corev1.Pod)
			np, ok2 := n.(*corev1.Pod)
			if !ok1 || !ok2 || !sameIdentity(op, np) {
				poke()
			}
		},
		DeleteFunc: func(any) { poke() },
	}); err != nil {
		return err
	}

	for _, f := range []interface{ Start(<-chan struct{}) }{local, cluster, istioNS, switchNS, istioF} {
		f.Start(ctx.Done())
	}
	defer func() {
		for _, f := range []interface{ Shutdown() }{local, cluster, istioNS, switchNS, istioF} {
			f.Shutdown()
		}
	}()
	s.Log.Info("kubernetes source: waiting for the API server's caches", "node", s.NodeName,
		"istio_namespace", s.IstioNamespace, "revision", s.revision())
	named := map[string]cache.SharedIndexInformer{"pods of this node": inf.localPods, "pods": inf.allPods,
		"namespaces": inf.namespaces, "services": inf.services, "configmaps of " + s.IstioNamespace: inf.istioCMs,
		"configmaps of " + s.SwitchesNamespace: inf.switchCMs, "authorizationpolicies": inf.policies,
		"peerauthentications": inf.peerAuth, "workloadentries": inf.entries}
	synced := make(chan struct{})
	go s.reportSync(ctx, synced, named)
	var hasSynced []cache.InformerSynced
	for _, i := range named {
		hasSynced = append(hasSynced, i.HasSynced)
	}
	ok := cache.WaitForCacheSync(ctx.Done(), hasSynced...)
	close(synced)
	if !ok {
		return nil // ctx ended
	}
	poke()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-changed:
		}
		// Gather the burst, then send one Config.
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(s.Batch):
		}
		select {
		case <-changed:
		default:
		}
		cfg := s.build(&inf)
		select {
		case updates <- cfg:
		case <-ctx.Done():
			return nil
		}
	}
}

// reportSync says every 30 s, until synced closes, which caches are not
// filled yet: an API server out of reach, or RBAC that forbids a list,
// keeps the agent waiting for its first Config.
func (s *KubeSource) reportSync(ctx context.Context, synced <-chan struct{}, named map[string]cache.SharedIndexInformer) {
	tick := time.NewTicker(30 * time.Second)
	defer tick.Stop()
	for {
		select {
		case <-synced:
			return
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		var waiting []string
		for name, i := range named {
			if !i.HasSynced() {
				waiting = append(waiting, name)
			}
		}
		slices.Sort(waiting)
		s.Log.Warn("kubernetes source: still waiting for the API server (reachable? RBAC lets this service account list and watch these?)",
			"waiting_for", waiting)
	}
}

// build makes a Config of the informers' caches.
func (s *KubeSource) build(inf *kubeInformers) Config {
	cfg := Config{Node: NodeSwitches{Capture: true, Splice: true}, Revision: s.revision()}
	s.buildMesh(&cfg, inf.istioCMs.GetStore())
	s.buildSwitches(&cfg, inf.switchCMs.GetStore())
	d := cfg.Defaults()
	s.lastDefaults.Store(&d)

	for _, o := range inf.policies.GetStore().List() {
		if ap, ok := o.(*securityAP); ok {
			cfg.AuthorizationPolicies = append(cfg.AuthorizationPolicies, ap)
		}
	}
	sortBy(cfg.AuthorizationPolicies, func(o *securityAP) string { return o.Namespace + "/" + o.Name })
	for _, o := range inf.peerAuth.GetStore().List() {
		if pa, ok := o.(*securityPA); ok {
			cfg.PeerAuthentications = append(cfg.PeerAuthentications, pa)
		}
	}
	sortBy(cfg.PeerAuthentications, func(o *securityPA) string { return o.Namespace + "/" + o.Name })
	for _, o := range inf.entries.GetStore().List() {
		we, ok := o.(*networkingWE)
		if !ok {
			continue
		}
		if _, err := netip.ParseAddr(we.Spec.GetAddress()); err != nil {
			s.Log.Debug("WorkloadEntry without an IP address skipped", "workloadentry", we.Namespace+"/"+we.Name,
				"address", we.Spec.GetAddress())
			continue
		}
		cfg.WorkloadEntries = append(cfg.WorkloadEntries, we)
	}
	sortBy(cfg.WorkloadEntries, func(o *networkingWE) string { return o.Namespace + "/" + o.Name })
	for _, o := range inf.services.GetStore().List() {
		if svc, ok := o.(*corev1.Service); ok {
			cfg.Services = append(cfg.Services, Service{Namespace: svc.Namespace, Name: svc.Name, Selector: svc.Spec.Selector})
		}
	}
	sortBy(cfg.Services, func(o Service) string { return o.Namespace + "/" + o.Name })
	for _, o := range inf.namespaces.GetStore().List() {
		if ns, ok := o.(*corev1.Namespace); ok {
			cfg.Namespaces = append(cfg.Namespaces, Namespace{Name: ns.Name, Labels: ns.Labels})
		}
	}
	sortBy(cfg.Namespaces, func(o Namespace) string { return o.Name })

	for _, o := range inf.localPods.GetStore().List() {
		pod, ok := o.(*corev1.Pod)
		// A pod that ran to completion has no network any more (its IPs
		// may be another pod's now), as in PodIPs below.
		if !ok || pod.Spec.NodeName != s.NodeName || terminal(pod) {
			continue
		}
		cfg.Pods = append(cfg.Pods, kubePod(pod, s.Revision, d))
	}
	sortBy(cfg.Pods, Pod.String)

	cfg.PodIPs = map[netip.Addr]PodIdentity{}
	shared := map[netip.Addr]bool{}
	for _, o := range inf.allPods.GetStore().List() {
		pod, ok := o.(*corev1.Pod)
		if !ok || pod.Spec.HostNetwork || pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed {
			continue
		}
		_, injected := pod.Annotations[AnnotationStatus]
		id := PodIdentity{Namespace: pod.Namespace, Name: pod.Name, ServiceAccount: serviceAccount(pod),
			NodeName: pod.Spec.NodeName, Injected: injected, Proxy: hasProxyContainer(pod),
			Terminating: pod.DeletionTimestamp != nil}
		for _, ip := range podIPs(pod) {
			if prev, ok := cfg.PodIPs[ip]; ok && prev != id {
				shared[ip] = true
			}
			cfg.PodIPs[ip] = id
		}
	}
	// Two live pods claim one IP (a deletion not seen yet): its identity
	// is unknown, and unknown is never denied.
	for ip := range shared {
		delete(cfg.PodIPs, ip)
	}
	cfg.Sources = append(cfg.Sources, fmt.Sprintf("kubernetes: node %s, %d local pods, %d pod IPs, %d policies",
		s.NodeName, len(cfg.Pods), len(cfg.PodIPs), len(cfg.AuthorizationPolicies)))
	return cfg
}

// sortBy sorts s by key.
func sortBy[T any](s []T, key func(T) string) {
	slices.SortFunc(s, func(a, b T) int { return strings.Compare(key(a), key(b)) })
}

// buildMesh sets cfg.Mesh from the revision's istio ConfigMap, keeping the
// last good one when it is invalid.
func (s *KubeSource) buildMesh(cfg *Config, store cache.Store) {
	name := MeshConfigMapName(s.revision())
	o, ok, _ := store.GetByKey(s.IstioNamespace + "/" + name)
	cm, _ := o.(*corev1.ConfigMap)
	if !ok || cm == nil {
		cfg.Mesh = DefaultMeshConfig()
		cfg.Sources = append(cfg.Sources, fmt.Sprintf("mesh config: Istio's defaults (no ConfigMap %s/%s)", s.IstioNamespace, name))
		s.lastMesh, s.lastMeshFrom = nil, ""
		return
	}
	where := fmt.Sprintf("ConfigMap %s/%s (resourceVersion %s)", cm.Namespace, cm.Name, cm.ResourceVersion)
	tmp := Config{}
	if err := loadConfigMap(&tmp, "istio", cm, where); err != nil {
		s.reject("mesh", where, err)
		cfg.Mesh = DefaultMeshConfig()
		if s.lastMesh != nil {
			var seen string
			setMesh(cfg, s.lastMesh, s.lastMeshFrom, &seen)
			cfg.Sources = append(cfg.Sources, "mesh config rejected, keeping the last good one: "+where)
		}
		return
	}
	cfg.Mesh = tmp.Mesh
	cfg.Sources = append(cfg.Sources, tmp.Sources...)
	s.lastMesh, _ = meshJSON(tmp.Mesh)
	s.lastMeshFrom = where
}

// buildSwitches sets cfg.Node from the meshsplice ConfigMap, keeping the
// last good switches when it is invalid.
func (s *KubeSource) buildSwitches(cfg *Config, store cache.Store) {
	o, ok, _ := store.GetByKey(s.SwitchesNamespace + "/meshsplice")
	cm, _ := o.(*corev1.ConfigMap)
	if !ok || cm == nil {
		s.lastSwitches = nil
		return
	}
	where := fmt.Sprintf("ConfigMap %s/%s (resourceVersion %s)", cm.Namespace, cm.Name, cm.ResourceVersion)
	tmp := Config{Node: NodeSwitches{Capture: true, Splice: true}}
	if err := loadConfigMap(&tmp, "meshsplice", cm, where); err != nil {
		s.reject("switches", where, err)
		if s.lastSwitches != nil {
			cfg.Node = *s.lastSwitches
		}
		cfg.Sources = append(cfg.Sources, "meshsplice ConfigMap rejected, keeping the last good switches: "+where)
		return
	}
	cfg.Node = tmp.Node
	cfg.Sources = append(cfg.Sources, tmp.Sources...)
	sw := tmp.Node
	s.lastSwitches = &sw
}

// reject logs a rejected object once per version.
func (s *KubeSource) reject(what, where string, err error) {
	if s.reported[what] == where {
		return
	}
	s.reported[what] = where
	s.Log.Error("istio config rejected; keeping the last good one", "object", where, "error", err)
}

// loadConfigMap reads the istio (as "istio", whatever its revision) or
// meshsplice ConfigMap with the file source's parser, so both modes accept
// exactly the same data.
func loadConfigMap(cfg *Config, as string, cm *corev1.ConfigMap, where string) error {
	doc, err := json.Marshal(map[string]any{
		"apiVersion": "v1", "kind": "ConfigMap",
		"metadata": map[string]string{"name": as, "namespace": cm.Namespace},
		"data":     cm.Data,
	})
	if err != nil {
		return err
	}
	var seen string
	return loadDoc(cfg, doc, where, &seen)
}

// serviceAccount is the pod's service account ("default" when unset, as
// the admission plugin sets it).
func serviceAccount(pod *corev1.Pod) string {
	if pod.Spec.ServiceAccountName != "" {
		return pod.Spec.ServiceAccountName
	}
	return "default"
}

// trimPod keeps of a pod only what Config.PodIPs needs, so that a cache of
// every pod of a large cluster stays small: of the annotations, only
// whether sidecar.istio.io/status is there (with an empty value); of the
// containers, only an istio-proxy one (its name).
func trimPod(obj any) (any, error) {
	pod, ok := obj.(*corev1.Pod)
	if !ok {
		return obj, nil // a tombstone
	}
	var ann map[string]string
	if _, ok := pod.Annotations[AnnotationStatus]; ok {
		ann = injectedMark
	}
	var containers []corev1.Container
	if hasProxyContainer(pod) {
		containers = proxyMark
	}
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: pod.Name, Namespace: pod.Namespace, UID: pod.UID, Annotations: ann,
			ResourceVersion: pod.ResourceVersion, DeletionTimestamp: pod.DeletionTimestamp},
		Spec: corev1.PodSpec{NodeName: pod.Spec.NodeName, ServiceAccountName: pod.Spec.ServiceAccountName,
			HostNetwork: pod.Spec.HostNetwork, Containers: containers},
		Status: corev1.PodStatus{Phase: pod.Status.Phase, PodIP: pod.Status.PodIP, PodIPs: pod.Status.PodIPs},
	}, nil
}

// injectedMark is the annotations of every trimmed injected pod, and
// proxyMark the containers of every trimmed pod with an istio-proxy
// (shared, read-only).
var (
	injectedMark = map[string]string{AnnotationStatus: ""}
	proxyMark    = []corev1.Container{{Name: ProxyContainer}}
)

// sameIdentity: nothing Config.PodIPs reads changed.
func sameIdentity(a, b *corev1.Pod) bool {
	_, ia := a.Annotations[AnnotationStatus]
	_, ib := b.Annotations[AnnotationStatus]
	if ia != ib || hasProxyContainer(a) != hasProxyContainer(b) || (a.DeletionTimestamp == nil) != (b.DeletionTimestamp == nil) ||
		a.Spec.NodeName != b.Spec.NodeName || a.Spec.ServiceAccountName != b.Spec.ServiceAccountName ||
		a.Spec.HostNetwork != b.Spec.HostNetwork || a.Status.PodIP != b.Status.PodIP ||
		len(a.Status.PodIPs) != len(b.Status.PodIPs) || terminal(a) != terminal(b) {
		return false
	}
	for i := range a.Status.PodIPs {
		if a.Status.PodIPs[i].IP != b.Status.PodIPs[i].IP {
			return false
		}
	}
	return true
}

func terminal(p *corev1.Pod) bool {
	return p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed
}

// InjectionEnabled says whether Istio's injector injects new pods of a
// namespace for revision ("" default): istio-injection=enabled selects
// the default revision, istio.io/rev=REV selects REV; istio-injection wins.
func InjectionEnabled(ns Namespace, revision string) bool {
	if revision == "" {
		revision = DefaultRevision
	}
	if v, ok := ns.Labels[LabelInjection]; ok {
		return v == "enabled" && revision == DefaultRevision
	}
	r, ok := ns.Labels[LabelRevision]
	return ok && r == revision
}

// meshJSON is the protojson of a mesh config, as setMesh reads it.
func meshJSON(m *meshv1alpha1.MeshConfig) ([]byte, error) { return protojson.Marshal(m) }

type (
	securityAP   = securityv1.AuthorizationPolicy
	securityPA   = securityv1.PeerAuthentication
	networkingWE = networkingv1.WorkloadEntry
)
