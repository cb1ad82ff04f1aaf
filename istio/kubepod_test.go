package istio

import (
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// statusAnnotation is what Istio's injector writes (istio-cni mode).
const statusAnnotation = `{"initContainers":["istio-validation"],"containers":["istio-proxy"],"volumes":["istio-envoy"],"imagePullSecrets":null,"revision":"default"}`

func TestClassifyPod(t *testing.T) {
	always := corev1.ContainerRestartPolicyAlways
	proxy := corev1.Container{Name: ProxyContainer}
	native := corev1.Container{Name: ProxyContainer, RestartPolicy: &always}
	app := corev1.Container{Name: "app"}
	for _, tc := range []struct {
		name        string
		ann, labels map[string]string
		containers  []corev1.Container
		inits       []corev1.Container
		revision    string
		defaults    func(*Defaults)
		wantReason  string // "" meshed
		wantProxy   string
		wantRev     string
	}{
		{name: "injected sidecar", ann: map[string]string{AnnotationStatus: statusAnnotation},
			containers: []corev1.Container{app, proxy}, wantProxy: ProxySidecar, wantRev: "default"},
		{name: "native sidecar", ann: map[string]string{AnnotationStatus: statusAnnotation},
			containers: []corev1.Container{app}, inits: []corev1.Container{{Name: "istio-validation"}, native},
			wantProxy: ProxyNativeSidecar, wantRev: "default"},
		{name: "istio-proxy init container that is not a sidecar", ann: map[string]string{AnnotationStatus: statusAnnotation},
			containers: []corev1.Container{app}, inits: []corev1.Container{proxy}, wantReason: "no istio-proxy sidecar", wantRev: "default"},
		{name: "not injected", containers: []corev1.Container{app}, wantReason: "not injected", wantRev: "default"},
		{name: "a container named istio-proxy without injection", containers: []corev1.Container{app, proxy},
			wantReason: "not injected", wantProxy: ProxySidecar, wantRev: "default"},
		{name: "injected, sidecar removed", ann: map[string]string{AnnotationStatus: statusAnnotation},
			containers: []corev1.Container{app}, wantReason: "no istio-proxy", wantRev: "default"},
		{name: "revision from the status annotation", revision: "canary",
			ann:        map[string]string{AnnotationStatus: strings.Replace(statusAnnotation, `"default"`, `"canary"`, 1)},
			containers: []corev1.Container{app, proxy}, wantProxy: ProxySidecar, wantRev: "canary"},
		{name: "another revision", revision: "canary", ann: map[string]string{AnnotationStatus: statusAnnotation},
			containers: []corev1.Container{app, proxy}, wantReason: `injected by revision "default"; this agent follows "canary"`,
			wantProxy: ProxySidecar, wantRev: "default"},
		{name: "revision from the label when the status has none", revision: "canary",
			ann: map[string]string{AnnotationStatus: `{"containers":["istio-proxy"]}`}, labels: map[string]string{LabelRevision: "canary"},
			containers: []corev1.Container{app, proxy}, wantProxy: ProxySidecar, wantRev: "canary"},
		{name: "istio-init: Istio's iptables", ann: map[string]string{AnnotationStatus: statusAnnotation},
			containers: []corev1.Container{app, proxy}, inits: []corev1.Container{{Name: InitContainer}},
			wantReason: "Istio's own iptables", wantProxy: ProxySidecar, wantRev: "default"},
		{name: "TPROXY annotation", ann: map[string]string{AnnotationStatus: statusAnnotation, AnnotationInterceptionMode: "TPROXY"},
			containers: []corev1.Container{app, proxy}, wantReason: "interceptionMode TPROXY", wantProxy: ProxySidecar, wantRev: "default"},
		{name: "TPROXY mesh default", ann: map[string]string{AnnotationStatus: statusAnnotation},
			defaults:   func(d *Defaults) { d.InterceptionMode = "TPROXY" },
			containers: []corev1.Container{app, proxy}, wantReason: "interceptionMode TPROXY", wantProxy: ProxySidecar, wantRev: "default"},
		{name: "REDIRECT annotation over a TPROXY default", ann: map[string]string{AnnotationStatus: statusAnnotation, AnnotationInterceptionMode: "REDIRECT"},
			defaults:   func(d *Defaults) { d.InterceptionMode = "TPROXY" },
			containers: []corev1.Container{app, proxy}, wantProxy: ProxySidecar, wantRev: "default"},
		{name: "NONE", ann: map[string]string{AnnotationStatus: statusAnnotation, AnnotationInterceptionMode: "NONE"},
			containers: []corev1.Container{app, proxy}, wantReason: "interceptionMode NONE", wantProxy: ProxySidecar, wantRev: "default"},
		{name: "invalid annotation", ann: map[string]string{AnnotationStatus: statusAnnotation, AnnotationExcludeInboundPorts: "http"},
			containers: []corev1.Container{app, proxy}, wantReason: "invalid annotations", wantProxy: ProxySidecar, wantRev: "default"},
		{name: "meshsplice capture disabled", ann: map[string]string{AnnotationStatus: statusAnnotation, AnnotationCapture: "disabled"},
			containers: []corev1.Container{app, proxy}, wantReason: "capture turned off", wantProxy: ProxySidecar, wantRev: "default"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Annotations: tc.ann, Labels: tc.labels},
				Spec: corev1.PodSpec{Containers: tc.containers, InitContainers: tc.inits}}
			d := DefaultDefaults()
			if tc.defaults != nil {
				tc.defaults(&d)
			}
			m := ClassifyPod(pod, tc.revision, d)
			if m.Meshed != (tc.wantReason == "") || !strings.Contains(m.Reason, tc.wantReason) {
				t.Errorf("meshed %v, reason %q; want meshed %v, reason containing %q", m.Meshed, m.Reason, tc.wantReason == "", tc.wantReason)
			}
			if m.Proxy != tc.wantProxy || m.Revision != tc.wantRev {
				t.Errorf("proxy %q revision %q, want %q %q", m.Proxy, m.Revision, tc.wantProxy, tc.wantRev)
			}
			if m.Meshed && !m.Traffic.Capture {
				t.Errorf("meshed but Traffic.Capture is false")
			}
		})
	}
}

func TestInjectionEnabled(t *testing.T) {
	for _, tc := range []struct {
		labels   map[string]string
		revision string
		want     bool
	}{
		{labels: map[string]string{LabelInjection: "enabled"}, want: true},
		{labels: map[string]string{LabelInjection: "enabled"}, revision: "canary", want: false},
		{labels: map[string]string{LabelInjection: "disabled", LabelRevision: "default"}, want: false},
		{labels: map[string]string{LabelRevision: "canary"}, revision: "canary", want: true},
		{labels: map[string]string{LabelRevision: "default"}, want: true},
		{labels: nil, want: false},
	} {
		if got := InjectionEnabled(Namespace{Name: "ns", Labels: tc.labels}, tc.revision); got != tc.want {
			t.Errorf("InjectionEnabled(%v, %q) = %v, want %v", tc.labels, tc.revision, got, tc.want)
		}
	}
}

// TestTrimPod: the cluster-wide pod cache keeps only identity fields.
func TestTrimPod(t *testing.T) {
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "p", Namespace: "ns", Labels: map[string]string{"a": "b"},
			Annotations:   map[string]string{AnnotationStatus: statusAnnotation},
			ManagedFields: []metav1.ManagedFieldsEntry{{Manager: "kubelet"}}},
		Spec:   corev1.PodSpec{NodeName: "n", ServiceAccountName: "sa", Containers: []corev1.Container{{Name: "app"}}},
		Status: corev1.PodStatus{PodIP: "10.0.0.1", PodIPs: []corev1.PodIP{{IP: "10.0.0.1"}}, Phase: corev1.PodRunning},
	}
	o, err := trimPod(pod)
	if err != nil {
		t.Fatal(err)
	}
	tp := o.(*corev1.Pod)
	if tp.Labels != nil || len(tp.Annotations) != 1 || tp.Annotations[AnnotationStatus] != "" || tp.ManagedFields != nil || tp.Spec.Containers != nil {
		t.Errorf("trimmed pod keeps more than identity: %+v", tp)
	}
	if tp.Name != "p" || tp.Namespace != "ns" || tp.Spec.NodeName != "n" || tp.Spec.ServiceAccountName != "sa" ||
		tp.Status.PodIP != "10.0.0.1" || len(tp.Status.PodIPs) != 1 || tp.Status.Phase != corev1.PodRunning {
		t.Errorf("trimmed pod lost identity: %+v", tp)
	}
	if !sameIdentity(pod, tp) {
		t.Errorf("sameIdentity(pod, trimmed) is false")
	}
	moved := tp.DeepCopy()
	moved.Status.PodIPs = []corev1.PodIP{{IP: "10.0.0.2"}}
	if sameIdentity(tp, moved) {
		t.Errorf("sameIdentity misses an IP change")
	}
	plain := tp.DeepCopy()
	plain.Annotations = nil
	if sameIdentity(tp, plain) {
		t.Errorf("sameIdentity misses the sidecar's removal")
	}
}
