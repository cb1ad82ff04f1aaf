package e2e

import (
	"context"
	"encoding/json"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshsplice/meshsplice/agent/api"
	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/internal/istioctl"
	"github.com/meshsplice/meshsplice/internal/kubetest"
	"github.com/meshsplice/meshsplice/internal/testnet"
	"github.com/meshsplice/meshsplice/istio"
)

// Pods exactly as Istio injects them (istioctl kube-inject with the
// injector ConfigMaps of `istioctl manifest generate`), run on node-a of
// the kubetest API server through `meshsplice agent --kubernetes`; the
// test plays their kubelet (kubePod) and asserts what the kernel does.

// installs are the injectors of three Istio installs, generated once.
type installs struct {
	plain   istioctl.InjectConfig // istioctl install: Istio's default template (istio-init)
	overlay istioctl.InjectConfig // istioctl install -f manifests/istio-overlay.yaml
	canary  istioctl.InjectConfig // the same with spec.revision: canary
}

func newInstalls(t *testing.T) installs {
	t.Helper()
	dir := t.TempDir()
	canary := filepath.Join(dir, "canary.yaml")
	if err := os.WriteFile(canary, []byte("apiVersion: install.istio.io/v1alpha1\nkind: IstioOperator\nspec:\n  revision: canary\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	config := func(name string, overlays ...string) istioctl.InjectConfig {
		d := filepath.Join(dir, name)
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
		c, err := istioctl.ConfigOf(istioctl.Generate(t, overlays...), d)
		if err != nil {
			t.Fatalf("%s install: %v", name, err)
		}
		return c
	}
	in := installs{plain: config("plain"), overlay: config("overlay", "../manifests/istio-overlay.yaml"),
		canary: config("canary", "../manifests/istio-overlay.yaml", canary)}
	if in.canary.Revision != "canary" {
		t.Fatalf("the canary install's injector is of revision %q", in.canary.Revision)
	}
	return in
}

// sampleWorkload is manifests/testdata/sample-deployment.yaml, with the
// meshsplice injection template (as it is) or without (Istio's default
// template only).
func sampleWorkload(t *testing.T, meshspliceTemplate bool) []byte {
	t.Helper()
	b, err := os.ReadFile("../manifests/testdata/sample-deployment.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if !meshspliceTemplate {
		b = []byte(strings.Replace(string(b), "      annotations:\n        inject.istio.io/templates: sidecar,meshsplice\n", "", 1))
		if strings.Contains(string(b), "inject.istio.io/templates") {
			t.Fatal("the sample deployment's template annotation moved")
		}
	}
	return b
}

// injectPod is kube-inject of workload with c: the pod the injector of c
// makes of it, with istio-proxy a native sidecar or a container.
func injectPod(t *testing.T, srv *kubetest.Server, c istioctl.InjectConfig, native bool, workload []byte) *corev1.Pod {
	t.Helper()
	c.NativeSidecars = native
	return istioctl.InjectPod(t, srv.Kubeconfig, c, workload)
}

// kubeWorld is a test's node-a: the agent, its cgroup and pins, a bridge.
type kubeWorld struct {
	t    *testing.T
	srv  *kubetest.Server
	m    *mesh
	node *testnet.BridgeNet
	ag   kubeAgent
}

// newKubeWorld starts `meshsplice agent --kubernetes` on node-a with
// Istio in istioNS (mesh config meshFile, in the ConfigMap of revision) and
// extra agent flags.
func newKubeWorld(t *testing.T, srv *kubetest.Server, istioNS, revision, meshFile string, flags ...string) *kubeWorld {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	meshYAML, err := os.ReadFile(meshFile)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := srv.Client.CoreV1().ConfigMaps(istioNS).Create(ctx, &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Name: istio.MeshConfigMapName(revision)}, Data: map[string]string{"mesh": string(meshYAML)}},
		metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	w := &kubeWorld{t: t, srv: srv, m: &mesh{t: t, bin: mstest(t)}}
	w.m.cg = testnet.NewCgroup(t)
	w.m.pin = testnet.PinDir(t, func(dir string) error { return datapath.Detach(dir, time.Second) })
	w.node = testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	w.ag = startKubeAgent(t, srv, w.m, istioNS, flags...)
	t.Cleanup(w.ag.stop)
	return w
}

// kubePod plays the kubelet of pod (as an injector made it) on node-a,
// as name in namespace ns: a network namespace with the echo app, the
// pod object with its status.podIPs, the real meshsplice-cni ADD through
// the agent, then the pod's init containers (Istio's istio-init runs
// istio-iptables as root; istio-validation's failure is returned, as
// the kubelet would hold the pod back) and its istio-proxy (the test
// sidecar, uid 1337), if it has them.
func (w *kubeWorld) kubePod(ns, name string, pod *corev1.Pod) (*meshPod, error) {
	t := w.t
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	p := w.m.addPod(w.node, name, nil)
	pod = pod.DeepCopy()
	if pod.Spec.ServiceAccountName != "" {
		if _, err := w.srv.Client.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{
			ObjectMeta: metav1.ObjectMeta{Name: pod.Spec.ServiceAccountName}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
			t.Fatal(err)
		}
	}
	pod.Name, pod.Namespace, pod.Spec.NodeName = name, ns, "node-a"
	got, err := w.srv.Client.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create pod %s: %v", name, err)
	}
	got.Status.Phase = corev1.PodRunning
	got.Status.PodIP = p.IPv4.String()
	got.Status.PodIPs = []corev1.PodIP{{IP: p.IPv4.String()}, {IP: p.IPv6.String()}}
	if _, err := w.srv.Client.CoreV1().Pods(ns).UpdateStatus(ctx, got, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	cniAdd(t, w.ag.sock, p, ns, name, got)
	proxy := false
	var validation error
	for _, c := range pod.Spec.InitContainers {
		switch c.Name {
		case istio.InitContainer:
			if err := runIstioInit(t, w.m, p, c); err != nil {
				t.Fatalf("istio-init of %s: %v", name, err)
			}
		case "istio-validation":
			validation = runIstioValidation(t, w.m, p, pod)
		case istio.ProxyContainer:
			proxy = true
		}
	}
	for _, c := range pod.Spec.Containers {
		proxy = proxy || c.Name == istio.ProxyContainer
	}
	if proxy {
		p.Sidecar = w.m.start(p, name+"-sidecar", 1337, "sidecar")
		if _, err := p.Sidecar.WaitEvent(waitFor, "ready"); err != nil {
			t.Fatal(err)
		}
	}
	return p, validation
}

// runIstioInit runs Istio's istio-init container c in p as its args say,
// with Istio's istio-iptables (hack/deps.sh builds it), as root: Istio's
// own REDIRECT rules, gone with the netns.
func runIstioInit(t *testing.T, m *mesh, p *meshPod, c corev1.Container) error {
	t.Helper()
	if len(c.Args) == 0 || c.Args[0] != "istio-iptables" {
		t.Fatalf("istio-init does not run istio-iptables: %q", c.Args)
	}
	out, err := exec.Command("../hack/deps.sh", "--path", "istio-iptables").Output()
	if err != nil {
		t.Fatalf("hack/deps.sh --path istio-iptables: %v", err)
	}
	v := testnet.Start(t, testnet.StartOpts{NetNS: p.NS, Cgroup: m.cg, Name: p.Name + "-istio-init",
		Args: append([]string{strings.TrimSpace(string(out))}, c.Args[1:]...)})
	return v.WaitTimeout(60 * time.Second)
}

// podStatus is the agent's /pods entry of pod ns/name.
func (w *kubeWorld) podStatus(ns, name string) api.PodStatus {
	w.t.Helper()
	var pods []api.PodStatus
	if err := json.Unmarshal([]byte(w.ag.get("/pods")), &pods); err != nil {
		w.t.Fatalf("/pods: %v", err)
	}
	for _, p := range pods {
		if p.Pod.PodNamespace == ns && p.Pod.PodName == name {
			return p
		}
	}
	w.t.Fatalf("/pods has no %s/%s: %+v", ns, name, pods)
	return api.PodStatus{}
}

// noDrift runs `meshsplice check --drift` as the agent is configured
// (Kubernetes, its flags): the kernel holds what the config says of
// every pod.
func (w *kubeWorld) noDrift(istioNS string, flags ...string) {
	w.t.Helper()
	rep, drift := checkDrift(w.t, w.ag.bin, append([]string{"--pin-dir", w.m.pin, "--state-dir", w.ag.stateDir(),
		"--kubernetes", "--kubeconfig", w.srv.Kubeconfig, "--node-name", "node-a", "--istio-namespace", istioNS}, flags...)...)
	if drift || rep.Drifted() {
		w.t.Errorf("check --drift found a drift: %+v", rep)
	}
}

func (w *kubeWorld) counters() datapath.Counters {
	w.t.Helper()
	c, err := datapath.ReadPinnedCounters(w.m.pin)
	if err != nil {
		w.t.Fatal(err)
	}
	return c
}

// TestAgentKubernetesInjectedPods: pods of Istio's default template, in
// the regular and the native-sidecar form, and of a revision.
func TestAgentKubernetesInjectedPods(t *testing.T) {
	testnet.RequireRoot(t)
	srv := kubetest.Shared(t)
	in := newInstalls(t)

	// Istio's default template: istio-init captures the pod with
	// iptables. The agent registers such pods in iptables mode, captures
	// neither of them a second time, and splices the client sidecar ->
	// server sidecar hop through the server's REDIRECT. The client's
	// istio-proxy is a container, the server's a native sidecar.
	t.Run("default-template", func(t *testing.T) {
		ns, istioNS := srv.Namespace(t, istio.LabelInjection, "enabled"), srv.Namespace(t)
		workload := sampleWorkload(t, false)
		clientPod := injectPod(t, srv, in.plain, false, workload)
		serverPod := injectPod(t, srv, in.plain, true, workload)
		for _, c := range []struct {
			pod   *corev1.Pod
			proxy string
		}{{clientPod, istio.ProxySidecar}, {serverPod, istio.ProxyNativeSidecar}} {
			pm := istio.ClassifyPod(c.pod, "", testDefaults())
			if pm.Meshed || pm.Mode != istio.ModeIPTables || !pm.IstioInit || pm.Proxy != c.proxy || pm.Revision != istio.DefaultRevision {
				t.Fatalf("Istio's default-template pod classified %+v; want iptables mode, istio-init, proxy %s, revision default", pm, c.proxy)
			}
		}
		w := newKubeWorld(t, srv, istioNS, "", in.plain.Mesh)
		client, _ := w.kubePod(ns, "client", clientPod)
		server, _ := w.kubePod(ns, "server", serverPod)
		for _, name := range []string{"client", "server"} {
			if st := w.podStatus(ns, name); st.Capture || st.Mode != istio.ModeIPTables || !st.Splice {
				t.Errorf("/pods: %s capture %v, mode %q, splice %v; want iptables mode, spliced", name, st.Capture, st.Mode, st.Splice)
			}
		}
		before := w.counters()
		target := netip.AddrPortFrom(server.IPv4, appPort)
		w.m.client(client, appUID, target, "--messages", "100", "--size", "1000")
		d := w.counters().Sub(before)
		t.Logf("counters: %v", nonZero(d))
		oneSidecarHop(t, client, server, target, false)
		sidecarErrors(t, client, server)
		for k, v := range map[string]uint64{
			"connect.captured": 0, "sk_lookup.captured": 0,
			"sockops.sock_inserted": 2, "sockops.nat_paired": 1, "sockops.nat_matched": 1, "sockops.nat_miss": 0,
		} {
			if d[k] != v {
				t.Errorf("%s = %d, want %d", k, d[k], v)
			}
		}
		if d["sk_msg.redirected"] == 0 {
			t.Error("the sidecar <-> sidecar hop was not spliced (sk_msg.redirected 0)")
		}
		w.noDrift(istioNS)
	})

	// A revision: the canary install's injector (with the meshsplice
	// template) injects the pods of namespaces labelled
	// istio.io/rev=canary; the default one's those of istio.io/rev=default;
	// neither injects in a namespace labelled istio-injection=disabled,
	// where a pod can still be injected by hand (istioctl kube-inject).
	// The agent follows canary (--revision canary): only canary's pods are
	// meshed, and only they are captured.
	t.Run("revision", func(t *testing.T) {
		istioNS := srv.Namespace(t)
		workload := sampleWorkload(t, true)
		webhooks := map[string]istioctl.InjectConfig{"canary": in.canary, istio.DefaultRevision: in.overlay}
		cases := []struct {
			name, label, value string
			manual             bool // istioctl kube-inject by hand with canary's injector, whatever the namespace says
			injected           bool
			meshed             bool
			reason             string
		}{
			{"canary", istio.LabelRevision, "canary", false, true, true, ""},
			{"other-revision", istio.LabelRevision, istio.DefaultRevision, false, true, false, `injected by revision "default"; this agent follows "canary"`},
			{"disabled", istio.LabelInjection, "disabled", false, false, false, "not injected"},
			// The namespace label steers only the webhook: a pod injected
			// by hand there is canary's all the same.
			{"manual-in-disabled", istio.LabelInjection, "disabled", true, true, true, ""},
		}
		w := newKubeWorld(t, srv, istioNS, "canary", in.canary.Mesh, "--revision", "canary")
		src := &istio.KubeSource{Config: srv.Config, NodeName: "node-a", IstioNamespace: istioNS, Revision: "canary", Batch: 20 * time.Millisecond}
		dest := w.m.addPod(w.node, "dest", nil) // an unmeshed destination
		for _, c := range cases {
			ns := srv.Namespace(t, c.label, c.value)
			// The webhook of each revision, by its namespace selector.
			pod := (*corev1.Pod)(nil)
			if c.manual {
				pod = injectPod(t, srv, in.canary, true, workload)
			}
			for rev, cfg := range webhooks {
				if istio.InjectionEnabled(istio.Namespace{Name: ns, Labels: map[string]string{c.label: c.value}}, rev) {
					pod = injectPod(t, srv, cfg, true, workload)
				}
			}
			if (pod != nil) != c.injected {
				t.Fatalf("%s: injected %v, want %v", c.name, pod != nil, c.injected)
			}
			if pod == nil {
				var err error
				if pod, err = istioctl.PodOf(workload); err != nil {
					t.Fatal(err)
				}
			}
			if c.meshed && (pod.Annotations[istio.LabelRevision] != "canary" || istio.PodRevision(pod.Annotations, pod.Labels) != "canary") {
				t.Errorf("%s: canary's pod is marked %s=%q, status %s", c.name, istio.LabelRevision,
					pod.Annotations[istio.LabelRevision], pod.Annotations[istio.AnnotationStatus])
			}
			// Istio's istio-validation passes where the pod is captured.
			p, err := w.kubePod(ns, c.name, pod)
			if c.injected && (err == nil) != c.meshed {
				t.Errorf("%s: istio-validation: %v; want it to pass: %v", c.name, err, c.meshed)
			}
			pm := classified(t, src, ns, c.name)
			if pm.Meshed != c.meshed || (!c.meshed && !strings.Contains(pm.Reason, c.reason)) {
				t.Errorf("%s: classified meshed %v (%s), want %v (%s)", c.name, pm.Meshed, pm.Reason, c.meshed, c.reason)
			}
			wantMode := istio.ModeOff
			if c.meshed {
				wantMode = istio.ModeMeshsplice
			}
			if st := w.podStatus(ns, c.name); st.Capture != c.meshed || st.Mode != wantMode {
				t.Errorf("%s: /pods capture %v, mode %q; want %v, %q", c.name, st.Capture, st.Mode, c.meshed, wantMode)
			}
			before := w.counters()
			w.m.client(p, appUID, netip.AddrPortFrom(dest.IPv4, appPort), "--messages", "3")
			d := w.counters().Sub(before)
			want := uint64(0)
			if c.meshed {
				want = 1
			}
			if d["connect.captured"] != want {
				t.Errorf("%s: connect.captured %d, want %d (counters %v)", c.name, d["connect.captured"], want, nonZero(d))
			}
			if p.Sidecar != nil {
				if n := len(acceptEvents(p.Sidecar, "outbound")); n != int(want) {
					t.Errorf("%s: the sidecar's outbound listener got %d connections, want %d", c.name, n, want)
				}
			}
		}
		w.noDrift(istioNS, "--revision", "canary")
	})
}
