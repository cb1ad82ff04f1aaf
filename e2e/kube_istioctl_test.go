package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshsplice/meshsplice/agent/api"
	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/internal/istioctl"
	"github.com/meshsplice/meshsplice/internal/kubetest"
	"github.com/meshsplice/meshsplice/internal/testnet"
	"github.com/meshsplice/meshsplice/istio"
)

// TestAgentKubernetesIstioctlPod: a pod exactly as Istio's sidecar
// injector makes it with the meshsplice template of
// manifests/istio-overlay.yaml (istioctl manifest generate, then
// istioctl kube-inject of manifests/testdata/sample-deployment.yaml with
// the injector's ConfigMaps), run through `meshsplice agent --kubernetes`.
// The test plays its kubelet: the pod object on node-a with its
// status.podIP, a network namespace, the real meshsplice-cni ADD with the
// pod's annotations (as containerd passes them), then the test sidecar
// as the istio-proxy (uid 1337). The agent's config source classifies it
// as meshed (istio.ClassifyPod), and the app's connection to another pod
// reaches the sidecar's outbound listener (15001), with no iptables rule
// in the pod.
func TestAgentKubernetesIstioctlPod(t *testing.T) {
	testnet.RequireRoot(t)
	srv := kubetest.Shared(t)
	ns, istioNS := srv.Namespace(t), srv.Namespace(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	// The injector of `istioctl install -f manifests/istio-overlay.yaml`.
	manifest := istioctl.Generate(t, "../manifests/istio-overlay.yaml")
	cfg, err := istioctl.ConfigOf(manifest, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	sample, err := os.ReadFile("../manifests/testdata/sample-deployment.yaml")
	if err != nil {
		t.Fatal(err)
	}
	cfg.NativeSidecars = true // the injector's choice on Kubernetes >= 1.33
	out, err := istioctl.Inject(t, srv.Kubeconfig, cfg, sample)
	if err != nil {
		t.Fatal(err)
	}
	pod, err := istioctl.PodOf(out)
	if err != nil {
		t.Fatal(err)
	}
	// The install's mesh config, where the agent reads it.
	meshYAML, err := os.ReadFile(cfg.Mesh)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := srv.Client.CoreV1().ConfigMaps(istioNS).Create(ctx, &corev1.ConfigMap{
		ObjectMeta: metav1.ObjectMeta{Name: "istio"}, Data: map[string]string{"mesh": string(meshYAML)}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	m := &mesh{t: t, bin: mstest(t)}
	m.cg = testnet.NewCgroup(t)
	m.pin = testnet.PinDir(t, func(dir string) error { return datapath.Detach(dir, time.Second) })
	nodeA := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	app := m.addPod(nodeA, "sample", nil) // its network and app; no sidecar yet
	dest := m.addPod(nodeA, "dest", nil)  // an unmeshed destination

	// The pod object, on node-a, as the kubelet reports it running.
	if _, err := srv.Client.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{
		ObjectMeta: metav1.ObjectMeta{Name: pod.Spec.ServiceAccountName}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	pod.Name, pod.Namespace, pod.Spec.NodeName = "sample", ns, "node-a"
	got, err := srv.Client.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create the injected pod: %v", err)
	}
	got.Status.Phase = corev1.PodRunning
	got.Status.PodIP = app.IPv4.String()
	got.Status.PodIPs = []corev1.PodIP{{IP: app.IPv4.String()}, {IP: app.IPv6.String()}}
	if _, err := srv.Client.CoreV1().Pods(ns).UpdateStatus(ctx, got, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}

	// The agent's config source: the pod is meshed.
	src := &istio.KubeSource{Config: srv.Config, NodeName: "node-a", IstioNamespace: istioNS, Batch: 20 * time.Millisecond}
	if pm := classified(t, src, ns, "sample"); !pm.Meshed {
		t.Fatalf("the injected pod is not meshed: %s (%+v)", pm.Reason, pm)
	}

	ag := startKubeAgent(t, srv, m, istioNS)
	defer ag.stop()

	// The runtime's CNI ADD, then the pod's init containers, first of
	// all Istio's istio-validation: it passes only when the pod is
	// captured. Then the istio-proxy sidecar.
	if first := pod.Spec.InitContainers[0]; first.Name != "istio-validation" {
		t.Fatalf("the first init container is %s, want istio-validation", first.Name)
	}
	cniAdd(t, ag.sock, app, ns, "sample", got)
	if err := runIstioValidation(t, m, app, pod); err != nil {
		t.Fatalf("istio-validation in the captured pod: %v", err)
	}
	// The same pod on a node where meshsplice did not capture it.
	uncaptured := m.addPod(nodeA, "uncaptured", nil)
	if err := runIstioValidation(t, m, uncaptured, pod); err == nil {
		t.Fatal("istio-validation passed in a pod nobody captures")
	}
	app.Sidecar = m.start(app, "sample-sidecar", 1337, "sidecar")
	if _, err := app.Sidecar.WaitEvent(waitFor, "ready"); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the sidecar's listener registered", func() bool {
		c, _ := datapath.ReadPinnedCounters(m.pin)
		return c["listener_iter.listener_registered"] >= 1
	})
	m.client(app, appUID, netip.AddrPortFrom(dest.IPv4, appPort), "--messages", "3")
	if n := len(acceptEvents(app.Sidecar, "outbound")); n == 0 {
		c, _ := datapath.ReadPinnedCounters(m.pin)
		t.Fatalf("the app's connection did not reach the sidecar's outbound listener (counters %v)", nonZero(c))
	}
}

// kubeAgent is `meshsplice agent --kubernetes` on node-a of srv, with
// the socket the CNI plugin reaches it on.
type kubeAgent struct {
	*agentProc
	sock string
}

// startKubeAgent starts `meshsplice agent --kubernetes` as node-a's
// agent, Istio in istioNS, on m's cgroup and pin directory, with extra
// flags.
func startKubeAgent(t *testing.T, srv *kubetest.Server, m *mesh, istioNS string, flags ...string) kubeAgent {
	t.Helper()
	bin := testnet.BuildBinary(t, "github.com/meshsplice/meshsplice/cmd/meshsplice")
	sock := filepath.Join(t.TempDir(), "cni.sock")
	ag := &agentProc{t: t, bin: bin, metrics: fmt.Sprintf("127.0.0.1:%d", freePort(t))}
	ag.args = []string{bin, "agent", "--kubernetes", "--kubeconfig", srv.Kubeconfig, "--node-name", "node-a",
		"--istio-namespace", istioNS, "--cgroup", m.cg.Path, "--pin-dir", m.pin, "--cni-socket", sock,
		"--state-dir", t.TempDir(), "--metrics-addr", ag.metrics}
	ag.args = append(ag.args, flags...)
	ag.client = api.NewClient(sock, 5*time.Second)
	t.Cleanup(ag.client.Close)
	ag.start()
	return kubeAgent{agentProc: ag, sock: sock}
}

// runIstioValidation runs pod's istio-validation init container in p, as
// its uid, with Istio's istio-iptables (hack/deps.sh builds it); it
// returns the container's failure.
func runIstioValidation(t *testing.T, m *mesh, p *meshPod, pod *corev1.Pod) error {
	t.Helper()
	var c *corev1.Container
	for i := range pod.Spec.InitContainers {
		if pod.Spec.InitContainers[i].Name == "istio-validation" {
			c = &pod.Spec.InitContainers[i]
		}
	}
	if c == nil || len(c.Args) == 0 || c.Args[0] != "istio-iptables" || c.SecurityContext == nil || c.SecurityContext.RunAsUser == nil {
		t.Fatalf("no istio-validation running istio-iptables as a uid: %+v", c)
	}
	out, err := exec.Command("../hack/deps.sh", "--path", "istio-iptables").Output()
	if err != nil {
		t.Fatalf("hack/deps.sh --path istio-iptables: %v", err)
	}
	uid := int(*c.SecurityContext.RunAsUser)
	v := testnet.Start(t, testnet.StartOpts{NetNS: p.NS, Cgroup: m.cg, UID: uid, GID: uid, Name: p.Name + "-istio-validation",
		Args: append([]string{strings.TrimSpace(string(out))}, c.Args[1:]...)})
	return v.WaitTimeout(60 * time.Second)
}

// classified runs the agent's Kubernetes config source until it has the
// pod ns/name and returns Istio's answer for it.
func classified(t *testing.T, src *istio.KubeSource, ns, name string) istio.PodMesh {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	updates := make(chan istio.Config)
	done := make(chan error, 1)
	go func() { done <- src.Run(ctx, updates) }()
	defer func() { cancel(); <-done }()
	for {
		select {
		case c := <-updates:
			for _, p := range c.Pods {
				if p.Namespace == ns && p.Name == name && len(p.IPs) > 0 {
					return p.Mesh
				}
			}
		case <-ctx.Done():
			t.Fatalf("the config source never had pod %s/%s", ns, name)
		}
	}
}

// cniAdd runs the real meshsplice-cni ADD for p as the last plugin of a
// chain (prevResult: the pod's addresses) with the pod's annotations in
// runtimeConfig, as containerd passes them.
func cniAdd(t *testing.T, sock string, p *meshPod, ns, name string, pod *corev1.Pod) {
	t.Helper()
	plugin := testnet.BuildBinary(t, "github.com/meshsplice/meshsplice/cmd/meshsplice-cni")
	conf := map[string]any{
		"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "meshsplice-cni",
		"agentSocket": sock, "agentUnreachable": "fail",
		"runtimeConfig": map[string]any{"io.kubernetes.cri.pod-annotations": pod.Annotations},
		"prevResult": map[string]any{
			"cniVersion": "1.0.0",
			"interfaces": []map[string]any{{"name": "eth0", "sandbox": p.NS.Path()}},
			"ips": []map[string]any{
				{"address": netip.PrefixFrom(p.IPv4, 32).String(), "interface": 0},
				{"address": netip.PrefixFrom(p.IPv6, 128).String(), "interface": 0},
			},
		},
	}
	stdin, err := json.Marshal(conf)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(plugin)
	cmd.Stdin = bytes.NewReader(stdin)
	cmd.Env = append(os.Environ(), "CNI_COMMAND=ADD", "CNI_CONTAINERID=c-"+name, "CNI_NETNS="+p.NS.Path(),
		"CNI_IFNAME=eth0", "CNI_PATH="+filepath.Dir(plugin),
		fmt.Sprintf("CNI_ARGS=K8S_POD_NAMESPACE=%s;K8S_POD_NAME=%s;K8S_POD_UID=%s", ns, name, pod.UID))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("meshsplice-cni ADD: %v\n%s%s", err, out, stderr.Bytes())
	}
	t.Logf("meshsplice-cni ADD: %s", out)
}
