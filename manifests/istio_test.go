package manifests

import (
	"context"
	"encoding/json"
	"os"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/meshsplice/meshsplice/internal/istioctl"
	"github.com/meshsplice/meshsplice/internal/kubetest"
	"github.com/meshsplice/meshsplice/istio"
)

// The overlays, as a user passes them to istioctl install.
var (
	overlayOptIn   = []string{"istio-overlay.yaml"}
	overlayAllPods = []string{"istio-overlay.yaml", "istio-overlay-all-pods.yaml"}
)

// injectedPod runs kube-inject of the Deployment YAML with the injection
// configuration of manifest and returns its pod.
func injectedPod(t *testing.T, s *kubetest.Server, manifest, deployment []byte, native bool) *corev1.Pod {
	t.Helper()
	cfg, err := istioctl.ConfigOf(manifest, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	cfg.NativeSidecars = native
	out, err := istioctl.Inject(t, s.Kubeconfig, cfg, deployment)
	if err != nil {
		t.Fatal(err)
	}
	pod, err := istioctl.PodOf(out)
	if err != nil {
		t.Fatal(err)
	}
	return pod
}

// withoutTemplateChoice is the sample Deployment without its
// inject.istio.io/templates annotation.
func withoutTemplateChoice(tb testing.TB, deployment []byte) []byte {
	tb.Helper()
	out := strings.Replace(string(deployment), "        inject.istio.io/templates: sidecar,meshsplice\n", "", 1)
	if out == string(deployment) {
		tb.Fatal("the sample has no inject.istio.io/templates line")
	}
	return []byte(out)
}

// initContainers names a pod's init containers.
func initContainers(pod *corev1.Pod) []string {
	var names []string
	for _, c := range pod.Spec.InitContainers {
		names = append(names, c.Name)
	}
	return names
}

// TestIstioOverlay: istioctl manifest generate with the overlay succeeds
// offline, and the sidecar injector it configures (istioctl kube-inject
// with its ConfigMaps) gives a pod that chose the meshsplice template the
// istio-proxy sidecar (a container, or a native sidecar as on Kubernetes
// 1.33 and later) in REDIRECT mode and no istio-init: a pod meshsplice
// captures (istio.ClassifyPod). A pod that did not choose keeps Istio's
// istio-init.
func TestIstioOverlay(t *testing.T) {
	s := kubetest.Shared(t)
	sample := must(os.ReadFile("testdata/sample-deployment.yaml"))
	optIn := istioctl.Generate(t, overlayOptIn...)
	for _, tc := range []struct {
		name           string
		manifest       []byte
		deployment     []byte
		native         bool
		wantMeshsplice bool
		wantInit       string // the init container in place of istio-init, if any
	}{
		{"pod chose meshsplice", optIn, sample, false, true, "istio-validation"},
		{"pod chose meshsplice, native sidecar", optIn, sample, true, true, "istio-validation"},
		{"pod did not choose", optIn, withoutTemplateChoice(t, sample), false, false, istio.InitContainer},
		{"pod did not choose, native sidecar", optIn, withoutTemplateChoice(t, sample), true, false, istio.InitContainer},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pod := injectedPod(t, s, tc.manifest, tc.deployment, tc.native)
			m := istio.ClassifyPod(pod, "", istio.DefaultDefaults())
			t.Logf("init containers %v, proxy %q, meshsplice: %v (%s)", initContainers(pod), m.Proxy, m.Meshed, m.Reason)
			wantProxy := istio.ProxySidecar
			if tc.native {
				wantProxy = istio.ProxyNativeSidecar
			}
			if !m.Injected || m.Proxy != wantProxy {
				t.Fatalf("not injected with istio-proxy as a %s: %+v", wantProxy, m)
			}
			if m.InterceptionMode != "REDIRECT" {
				t.Errorf("interception mode %q, want REDIRECT (Envoy's capture listeners on)", m.InterceptionMode)
			}
			// What Envoy's pilot-agent is told.
			if got := proxyEnv(pod, "ISTIO_META_INTERCEPTION_MODE"); got != "REDIRECT" {
				t.Errorf("istio-proxy's ISTIO_META_INTERCEPTION_MODE = %q, want REDIRECT", got)
			}
			if !tc.wantMeshsplice {
				if !m.IstioInit || m.Meshed {
					t.Errorf("want Istio's own istio-init capture, got %+v", m)
				}
				return
			}
			if m.IstioInit {
				t.Errorf("istio-init is there: %v", initContainers(pod))
			}
			if tc.wantInit != "" && !slices.Contains(initContainers(pod), tc.wantInit) {
				t.Errorf("no %s: %v", tc.wantInit, initContainers(pod))
			}
			if got := pod.Annotations[istio.AnnotationInterceptionMode]; got != "REDIRECT" {
				t.Errorf("annotation %s = %q, want REDIRECT", istio.AnnotationInterceptionMode, got)
			}
			if !m.Meshed {
				t.Errorf("not meshed: %s", m.Reason)
			}
			if got := pod.Labels["meshsplice.io/template"]; got != "meshsplice" {
				t.Errorf("label meshsplice.io/template = %q", got)
			}
		})
	}
}

// proxyEnv is the value of istio-proxy's environment variable name.
func proxyEnv(pod *corev1.Pod, name string) string {
	for _, c := range append(pod.Spec.InitContainers, pod.Spec.Containers...) {
		if c.Name != istio.ProxyContainer {
			continue
		}
		for _, e := range c.Env {
			if e.Name == name {
				return e.Value
			}
		}
	}
	return ""
}

// TestIstioOverlayAllPods: with istio-overlay-all-pods.yaml the injector's
// default templates are sidecar and meshsplice, so a pod that names no
// template gets the meshsplice one; without it, Istio's default (sidecar)
// stays. (kube-inject always injects "sidecar" by default, whatever the
// configuration says: only the webhook reads defaultTemplates, so the
// rendered configuration is what is checked here.)
func TestIstioOverlayAllPods(t *testing.T) {
	for _, tc := range []struct {
		name     string
		overlays []string
		want     []string
	}{
		{"opt-in", overlayOptIn, []string{"sidecar"}},
		{"all pods", overlayAllPods, []string{"sidecar", "meshsplice"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg, err := istioctl.ConfigOf(istioctl.Generate(t, tc.overlays...), t.TempDir())
			if err != nil {
				t.Fatal(err)
			}
			var inj struct {
				DefaultTemplates []string          `json:"defaultTemplates"`
				Templates        map[string]string `json:"templates"`
			}
			if err := yaml.Unmarshal(must(os.ReadFile(cfg.Config)), &inj); err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(inj.DefaultTemplates, tc.want) {
				t.Errorf("defaultTemplates %v, want %v", inj.DefaultTemplates, tc.want)
			}
			if inj.Templates["meshsplice"] == "" || inj.Templates["sidecar"] == "" {
				t.Errorf("templates: want sidecar and meshsplice, have %v", len(inj.Templates))
			}
		})
	}
}

// TestIstioWithoutOverlayRefusesTemplatePods: once Istio is installed
// without the overlay, its injector refuses a pod that still names the
// meshsplice template (and the webhook's failurePolicy is Fail: the pod is
// not created). Hence the README's order: workloads first, Istio after.
func TestIstioWithoutOverlayRefusesTemplatePods(t *testing.T) {
	s := kubetest.Shared(t)
	manifest := istioctl.Generate(t)
	if !strings.Contains(string(manifest), "failurePolicy: Fail") {
		t.Error("the injector webhook's failurePolicy is no longer Fail: revisit the README's uninstall order")
	}
	cfg, err := istioctl.ConfigOf(manifest, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	out, err := istioctl.Inject(t, s.Kubeconfig, cfg, must(os.ReadFile("testdata/sample-deployment.yaml")))
	if err == nil || !strings.Contains(err.Error(), `requested template "meshsplice" not found`) {
		t.Fatalf("kube-inject without the overlay: %v\n%s", err, out)
	}
}

// TestIstioOverlayCapturesAsIstioInit: a pod of the meshsplice template
// is captured by meshsplice exactly as Istio's istio-init would have
// captured the same pod: the traffic settings meshsplice reads from its
// annotations equal those of istio-init's istio-iptables arguments, with
// Istio's default values and with non-default ones
// (values.global.proxy.*), with and without pod annotations of its own.
func TestIstioOverlayCapturesAsIstioInit(t *testing.T) {
	s := kubetest.Shared(t)
	sample := must(os.ReadFile("testdata/sample-deployment.yaml"))
	podAnnotated := strings.Replace(string(sample), "        inject.istio.io/templates: sidecar,meshsplice\n",
		"        inject.istio.io/templates: sidecar,meshsplice\n"+
			"        traffic.sidecar.istio.io/excludeOutboundPorts: \"3306\"\n"+
			"        traffic.sidecar.istio.io/excludeOutboundIPRanges: \"169.254.169.254/32\"\n"+
			"        status.sidecar.istio.io/port: \"15029\"\n", 1)
	const custom = "testdata/istio-values-custom.yaml"
	for _, tc := range []struct {
		name       string
		overlays   []string // the install meshsplice captures in
		values     []string // the same values without meshsplice's overlay: istio-init's install
		deployment []byte
	}{
		{"Istio's values", overlayOptIn, nil, sample},
		{"non-default values", append(overlayOptIn[:1:1], custom), []string{custom}, sample},
		{"non-default values and pod annotations", append(overlayOptIn[:1:1], custom), []string{custom}, []byte(podAnnotated)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ours := injectedPod(t, s, istioctl.Generate(t, tc.overlays...), tc.deployment, false)
			// The same pod in the same install without meshsplice.
			theirs := injectedPod(t, s, istioctl.Generate(t, tc.values...), []byte(strings.Replace(string(tc.deployment),
				"        inject.istio.io/templates: sidecar,meshsplice\n", "", 1)), false)
			want := istioInitTraffic(t, theirs)
			got, warnings, err := istio.ParseTraffic(ours.Annotations, istio.DefaultDefaults())
			if err != nil {
				t.Fatal(err)
			}
			for _, w := range warnings {
				t.Logf("warning: %s", w)
			}
			got.ExcludeInboundPorts, want.ExcludeInboundPorts = withoutProxyPorts(got.ExcludeInboundPorts), withoutProxyPorts(want.ExcludeInboundPorts)
			if !reflect.DeepEqual(got, want) {
				t.Errorf("meshsplice captures\n%s\nistio-init captures\n%s", js(got), js(want))
			}
		})
	}
}

// istioInitTraffic is what istio-init's istio-iptables arguments capture,
// in meshsplice's terms: each flag turned into the annotation of the same
// meaning and parsed as meshsplice parses a pod's annotations.
func istioInitTraffic(t *testing.T, pod *corev1.Pod) istio.Traffic {
	t.Helper()
	var args []string
	for _, c := range pod.Spec.InitContainers {
		if c.Name == istio.InitContainer {
			args = c.Args
		}
	}
	if len(args) == 0 || args[0] != "istio-iptables" {
		t.Fatalf("no istio-init running istio-iptables: %v", initContainers(pod))
	}
	t.Logf("istio-init: %s", strings.Join(args, " "))
	flags := map[string]string{
		"-i": istio.AnnotationIncludeOutboundIPRanges, "-x": istio.AnnotationExcludeOutboundIPRanges,
		"-b": istio.AnnotationIncludeInboundPorts, "-d": istio.AnnotationExcludeInboundPorts,
		"-q": istio.AnnotationIncludeOutboundPorts, "-o": istio.AnnotationExcludeOutboundPorts,
		"-m": istio.AnnotationInterceptionMode, "-u": istio.AnnotationProxyUID,
	}
	// The status names istio-init, which makes the pod iptables mode for
	// meshsplice (Istio's rules capture it); what is compared is what the
	// rules capture, so the pod is parsed as meshsplice would capture it:
	// with the container the template runs in istio-init's place.
	status := strings.Replace(pod.Annotations[istio.AnnotationStatus], `"`+istio.InitContainer+`"`, `"istio-validation"`, 1)
	ann := map[string]string{istio.AnnotationStatus: status}
	d := istio.DefaultDefaults()
	for i := 1; i < len(args); i++ {
		if strings.HasPrefix(args[i], "--log") {
			continue
		}
		if i+1 >= len(args) {
			t.Fatalf("istio-init flag %s has no value", args[i])
		}
		v := args[i+1]
		switch name, ok := flags[args[i]]; {
		case ok:
			ann[name] = v
		case args[i] == "-p" && v == "15001", args[i] == "-z" && v == "15006":
		default:
			t.Fatalf("istio-init flag %s %s: not modelled here", args[i], v)
		}
		i++
	}
	// istio-iptables -d already holds the status port; meshsplice adds it
	// to the exclusions itself (duplicates collapse).
	if p, ok := pod.Annotations[istio.AnnotationStatusPort]; ok {
		ann[istio.AnnotationStatusPort] = p
	}
	tr, _, err := istio.ParseTraffic(ann, d)
	if err != nil {
		t.Fatalf("istio-init's arguments as annotations %v: %v", ann, err)
	}
	return tr
}

// withoutProxyPorts drops the sidecar's own ports, which istio-init
// always excludes (-d 15090,15021,...) and meshsplice never captures
// inbound (istio.ProxyPorts) without being told.
func withoutProxyPorts(ports []uint16) []uint16 {
	var out []uint16
	for _, p := range ports {
		if !slices.Contains(istio.ProxyPorts, p) {
			out = append(out, p)
		}
	}
	return out
}

func js(v any) string {
	b, _ := json.MarshalIndent(v, "", "  ")
	return string(b)
}

// TestIstioOverlayServerDryRun: the Kubernetes objects istioctl install
// applies with the overlays pass a server-side dry run on the tests' real
// kube-apiserver (strict field validation). Istio's CRDs are left out:
// the server has them already, from the same istio.io/istio version.
func TestIstioOverlayServerDryRun(t *testing.T) {
	s := kubetest.Shared(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if _, err := s.Client.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "istio-system"}},
		metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		t.Fatal(err)
	}
	for name, overlays := range map[string][]string{"opt-in": overlayOptIn, "all pods": overlayAllPods} {
		t.Run(name, func(t *testing.T) {
			var docs []string
			kinds := map[string]int{}
			for _, doc := range istioctl.Docs(istioctl.Generate(t, overlays...)) {
				var meta metav1.TypeMeta
				if err := yaml.Unmarshal(doc, &meta); err != nil {
					t.Fatal(err)
				}
				kinds[meta.Kind]++
				if meta.Kind != "CustomResourceDefinition" {
					docs = append(docs, string(doc))
				}
			}
			t.Logf("objects: %v", kinds)
			if kinds["MutatingWebhookConfiguration"] == 0 || kinds["Deployment"] == 0 {
				t.Fatalf("no injector webhook or istiod Deployment in the manifest: %v", kinds)
			}
			if kinds["DaemonSet"] != 0 {
				t.Errorf("a DaemonSet (istio-cni?) in the manifest: %v", kinds)
			}
			for _, err := range dryRun(ctx, s.Config, []byte(strings.Join(docs, "\n---\n"))) {
				t.Error(err)
			}
		})
	}
}
