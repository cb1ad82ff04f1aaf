package istio

import (
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// istioInitStatus is the status annotation of a pod injected without
// istio-cni: istio-init runs istio-iptables in the pod.
const istioInitStatus = `{"initContainers":["istio-init"],"containers":["istio-proxy"],"volumes":["istio-envoy"],"imagePullSecrets":null,"revision":"default"}`

// TestIPTablesMode: which pods are under Istio's own iptables (gradual
// adoption), from the annotations alone (ParseTraffic: the CNI and the
// standalone agent) and from the pod spec (ClassifyPod: Kubernetes). Such a
// pod is never captured by meshsplice, and spliced unless splice is off.
func TestIPTablesMode(t *testing.T) {
	proxy := corev1.Container{Name: ProxyContainer}
	app := corev1.Container{Name: "app"}
	for _, tc := range []struct {
		name        string
		ann         map[string]string
		inits       []string
		wantMode    string
		wantSplice  bool
		wantWarning string
	}{
		{name: "istio-init in the status list", ann: map[string]string{AnnotationStatus: istioInitStatus},
			inits: []string{InitContainer}, wantMode: ModeIPTables, wantSplice: true},
		{name: "istio-init in the spec only", ann: map[string]string{AnnotationStatus: statusAnnotation},
			inits: []string{InitContainer}, wantMode: ModeIPTables, wantSplice: true},
		{name: "istio-validation is istio-cni's check: meshsplice captures", ann: map[string]string{AnnotationStatus: statusAnnotation},
			inits: []string{"istio-validation"}, wantMode: ModeMeshsplice, wantSplice: true},
		{name: "annotation iptables", ann: map[string]string{AnnotationStatus: statusAnnotation, AnnotationCapture: "iptables"},
			wantMode: ModeIPTables, wantSplice: true},
		{name: "iptables, splice disabled", ann: map[string]string{AnnotationStatus: statusAnnotation, AnnotationCapture: "iptables", AnnotationSplice: "disabled"},
			wantMode: ModeIPTables},
		{name: "iptables, app-splice has no effect", ann: map[string]string{AnnotationStatus: statusAnnotation, AnnotationCapture: "iptables", AnnotationAppSplice: "true"},
			wantMode: ModeIPTables, wantSplice: true, wantWarning: "no effect on a pod under Istio's iptables"},
		{name: "istio-init wins over capture enabled", ann: map[string]string{AnnotationStatus: istioInitStatus, AnnotationCapture: "enabled"},
			inits: []string{InitContainer}, wantMode: ModeIPTables, wantSplice: true, wantWarning: "does not capture it"},
		{name: "istio-init, capture disabled: off", ann: map[string]string{AnnotationStatus: istioInitStatus, AnnotationCapture: "disabled"},
			inits: []string{InitContainer}, wantMode: ModeOff},
		{name: "istio-init with TPROXY: off (REDIRECT only)", ann: map[string]string{AnnotationStatus: istioInitStatus, AnnotationInterceptionMode: "TPROXY"},
			inits: []string{InitContainer}, wantMode: ModeOff},
		{name: "capture disabled stays off", ann: map[string]string{AnnotationStatus: statusAnnotation, AnnotationCapture: "disabled"},
			wantMode: ModeOff},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Annotations: tc.ann},
				Spec: corev1.PodSpec{Containers: []corev1.Container{app, proxy}}}
			for _, n := range tc.inits {
				pod.Spec.InitContainers = append(pod.Spec.InitContainers, corev1.Container{Name: n})
			}
			m := ClassifyPod(pod, "", DefaultDefaults())
			if m.Mode != tc.wantMode {
				t.Errorf("ClassifyPod mode %q (reason %q), want %q", m.Mode, m.Reason, tc.wantMode)
			}
			tr := m.Traffic
			if tr.Capture && tr.IPTables {
				t.Errorf("captured by meshsplice and by iptables: %+v", tr)
			}
			if got := tr.IPTables; got != (tc.wantMode == ModeIPTables) {
				t.Errorf("Traffic.IPTables = %v for mode %q", got, tc.wantMode)
			}
			if tr.Splice != tc.wantSplice || (tr.IPTables && tr.AppSplice) {
				t.Errorf("splice %v app-splice %v, want %v false", tr.Splice, tr.AppSplice, tc.wantSplice)
			}
			if !tr.Sidecar && tc.wantMode != ModeOff {
				t.Errorf("no sidecar (policy) for mode %q", tc.wantMode)
			}
			if tc.wantWarning != "" && !strings.Contains(strings.Join(m.Warnings, "\n"), tc.wantWarning) {
				t.Errorf("warnings %q, want one containing %q", m.Warnings, tc.wantWarning)
			}
			// The annotations alone (CNI, standalone) agree whenever the
			// status annotation tells.
			if strings.Contains(tc.ann[AnnotationStatus], InitContainer) || len(tc.inits) == 0 {
				pt, _, err := ParseTraffic(tc.ann, DefaultDefaults())
				if err != nil {
					t.Fatal(err)
				}
				if pt.IPTables != tr.IPTables || pt.Capture != tr.Capture || pt.Splice != tr.Splice {
					t.Errorf("ParseTraffic %+v disagrees with ClassifyPod %+v", pt, tr)
				}
			}
		})
	}
}
