package istio

import (
	"encoding/json"
	"fmt"
	"maps"
	"net/netip"
	"strings"

	corev1 "k8s.io/api/core/v1"
)

// Names Istio's injector gives what it adds to a pod.
const (
	// ProxyContainer is the sidecar: a container, or (native sidecar) an
	// init container with restartPolicy: Always.
	ProxyContainer = "istio-proxy"
	// InitContainer is istio-init, which runs istio-iptables: Istio then
	// captures the pod itself (no istio-cni, no meshsplice).
	InitContainer = "istio-init"
	// LabelRevision is the revision label of namespaces and pods.
	LabelRevision = "istio.io/rev"
	// LabelInjection is the namespace label istio-injection=enabled.
	LabelInjection = "istio-injection"
	// DefaultRevision names Istio's unnamed revision.
	DefaultRevision = "default"
)

// Proxy kinds of PodMesh.Proxy.
const (
	ProxySidecar       = "sidecar"        // istio-proxy is a regular container
	ProxyNativeSidecar = "native-sidecar" // istio-proxy is an init container with restartPolicy: Always
)

// Pod is a Kubernetes pod of this node as meshsplice needs it, with
// Istio's answer to whether and how it is meshed.
type Pod struct {
	Namespace, Name, UID string
	NodeName             string
	ServiceAccount       string
	Labels, Annotations  map[string]string
	IPs                  []netip.Addr // status.podIPs; empty until the pod has its network
	Mesh                 PodMesh
}

func (p Pod) String() string { return p.Namespace + "/" + p.Name }

// PodMesh is whether meshsplice captures a pod, as Istio decides it: the
// pod was injected (sidecar.istio.io/status) by the revision the agent
// follows, runs the istio-proxy sidecar (regular or native), its
// interception mode is REDIRECT, it is not captured by Istio's own
// istio-init iptables, and its annotations (parsed by [ParseTraffic], as
// Istio parses them) are valid and do not turn capture off.
type PodMesh struct {
	Meshed bool
	// Mode is who captures the pod: ModeMeshsplice (Meshed), ModeIPTables
	// (Istio's istio-init iptables: meshsplice splices its sidecar only)
	// or ModeOff.
	Mode string
	// Reason says why not, when Meshed is false.
	Reason           string
	Injected         bool
	Revision         string // the injecting revision ("default" for the unnamed one)
	Proxy            string // ProxySidecar, ProxyNativeSidecar or "" (none)
	IstioInit        bool   // an istio-init container: Istio's iptables capture the pod
	InterceptionMode string // REDIRECT, TPROXY or NONE, annotation or mesh default
	// Traffic is the pod's capture configuration (zero if the annotations
	// are invalid); Warnings and Err are ParseTraffic's.
	Traffic  Traffic
	Warnings []string
	Err      error
}

// Capture modes of PodMesh.Mode (and of `meshsplice status`).
const (
	ModeMeshsplice = "meshsplice"
	ModeIPTables   = "iptables"
	ModeOff        = "off"
)

// ClassifyPod gives Istio's answer for pod: injected by the revision the
// agent follows ("" is the default revision), with its traffic settings
// resolved against d.
func ClassifyPod(pod *corev1.Pod, revision string, d Defaults) PodMesh {
	if revision == "" {
		revision = DefaultRevision
	}
	var m PodMesh
	status, injected := pod.Annotations[AnnotationStatus]
	m.Injected = injected
	m.Revision = PodRevision(pod.Annotations, pod.Labels)
	for _, c := range pod.Spec.Containers {
		if c.Name == ProxyContainer {
			m.Proxy = ProxySidecar
		}
	}
	for _, c := range pod.Spec.InitContainers {
		switch {
		case c.Name == ProxyContainer && c.RestartPolicy != nil && *c.RestartPolicy == corev1.ContainerRestartPolicyAlways:
			m.Proxy = ProxyNativeSidecar
		case c.Name == InitContainer:
			m.IstioInit = true
		}
	}
	m.InterceptionMode = d.InterceptionMode
	if v, ok := pod.Annotations[AnnotationInterceptionMode]; ok {
		m.InterceptionMode = strings.TrimSpace(v)
	}
	listed := istioInitListed(status)
	ann := pod.Annotations
	if m.IstioInit && !listed && strings.TrimSpace(ann[AnnotationCapture]) != "disabled" {
		// istio-init in the spec but not in the status list: the pod
		// is under Istio's iptables all the same.
		ann = maps.Clone(ann)
		ann[AnnotationCapture] = "iptables"
	}
	m.IstioInit = m.IstioInit || listed
	m.Traffic, m.Warnings, m.Err = ParseTraffic(ann, d)
	m.Mode = ModeOff
	switch {
	case !injected:
		m.Reason = "not injected by Istio (no " + AnnotationStatus + " annotation)"
	case m.Proxy == "":
		m.Reason = "no " + ProxyContainer + " sidecar (container, or init container with restartPolicy: Always)"
	case m.Revision != revision:
		m.Reason = otherRevision(m.Revision, revision)
	case m.Err != nil:
		m.Reason = "invalid annotations: " + m.Err.Error()
	case m.InterceptionMode != "REDIRECT":
		m.Reason = "interceptionMode " + m.InterceptionMode + " (meshsplice captures REDIRECT only)"
	case m.IstioInit:
		m.Reason = "captured by Istio's own iptables (" + InitContainer + " container)"
		if m.Traffic.IPTables {
			m.Mode = ModeIPTables
		}
	case m.Traffic.IPTables:
		m.Reason = "left on Istio's own iptables (pod annotation " + AnnotationCapture + ": iptables)"
		m.Mode = ModeIPTables
	case !m.Traffic.Capture:
		m.Reason = "capture turned off by annotation (" + AnnotationInject + " or " + AnnotationCapture + ")"
	default:
		m.Meshed = true
		m.Mode = ModeMeshsplice
	}
	return m
}

// istioInitListed: the injector's status annotation lists istio-init.
func istioInitListed(status string) bool {
	var st map[string]json.RawMessage
	if json.Unmarshal([]byte(status), &st) != nil {
		return false
	}
	return statusHasIstioInit(st)
}

// PodRevision is the revision that injected a pod with these annotations
// and labels: the "revision" of the sidecar.istio.io/status annotation,
// else the istio.io/rev label, else the default revision.
func PodRevision(annotations, labels map[string]string) string {
	var st struct {
		Revision string `json:"revision"`
	}
	if status := annotations[AnnotationStatus]; status != "" && json.Unmarshal([]byte(status), &st) == nil && st.Revision != "" {
		return st.Revision
	}
	if r := labels[LabelRevision]; r != "" {
		return r
	}
	return DefaultRevision
}

// ForRevision is t, what [ParseTraffic] resolved for an injected pod with
// these annotations and labels, on a node that follows revision
// ([Config.Revision]; "" follows every revision). A pod another revision
// injected is left alone, as [ClassifyPod] says: nothing of it is
// captured, spliced or enforced, and why is returned.
func ForRevision(t Traffic, annotations, labels map[string]string, revision string) (Traffic, string) {
	if _, injected := annotations[AnnotationStatus]; !injected || revision == "" {
		return t, ""
	}
	r := PodRevision(annotations, labels)
	if r == revision {
		return t, ""
	}
	t.Capture, t.Sidecar, t.IPTables, t.Splice, t.AppSplice = false, false, false, false, false
	return t, otherRevision(r, revision)
}

func otherRevision(pod, followed string) string {
	return fmt.Sprintf("injected by revision %q; this agent follows %q", pod, followed)
}

// podIPs parses status.podIPs (status.podIP if the list is empty); bad
// entries are skipped.
func podIPs(pod *corev1.Pod) []netip.Addr {
	var out []netip.Addr
	add := func(s string) {
		if a, err := netip.ParseAddr(s); err == nil {
			out = append(out, a.Unmap())
		}
	}
	for _, ip := range pod.Status.PodIPs {
		add(ip.IP)
	}
	if len(out) == 0 && pod.Status.PodIP != "" {
		add(pod.Status.PodIP)
	}
	return out
}
