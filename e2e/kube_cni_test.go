package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshsplice/meshsplice/agent"
	"github.com/meshsplice/meshsplice/agent/api"
	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/internal/kubetest"
	"github.com/meshsplice/meshsplice/internal/testnet"
	"github.com/meshsplice/meshsplice/istio"
)

// forceDelete deletes a pod object at once, as kubelet does once the
// pod's containers are gone (a graceful delete only marks it: no kubelet
// here finishes it).
func forceDelete() metav1.DeleteOptions {
	var zero int64
	return metav1.DeleteOptions{GracePeriodSeconds: &zero}
}

// kubeNode is one node of a Kubernetes test: the agent's files and the
// test playing kubelet for its pods.
type kubeNode struct {
	t         *testing.T
	srv       *kubetest.Server
	m         *mesh
	node      *testnet.BridgeNet
	ns        string
	istioNS   string
	stateDir  string
	sock      string
	plugin    string
	bin       string
	extraArgs []string
}

func newKubeNode(t *testing.T) *kubeNode {
	testnet.RequireRoot(t)
	srv := kubetest.Shared(t)
	k := &kubeNode{t: t, srv: srv, ns: srv.Namespace(t), istioNS: srv.Namespace(t), stateDir: t.TempDir(),
		sock: filepath.Join(t.TempDir(), "cni.sock")}
	k.m = &mesh{t: t, bin: mstest(t)}
	k.m.cg = testnet.NewCgroup(t)
	k.m.pin = testnet.PinDir(t, func(dir string) error { return datapath.Detach(dir, time.Second) })
	k.node = testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	k.bin = testnet.BuildBinary(t, "github.com/meshsplice/meshsplice/cmd/meshsplice")
	k.plugin = testnet.BuildBinary(t, "github.com/meshsplice/meshsplice/cmd/meshsplice-cni")
	return k
}

// agent starts `meshsplice agent --kubernetes` for node-a.
func (k *kubeNode) agent() *agentProc {
	ag := &agentProc{t: k.t, bin: k.bin, metrics: fmt.Sprintf("127.0.0.1:%d", freePort(k.t))}
	ag.args = append([]string{k.bin, "agent", "--kubernetes", "--kubeconfig", k.srv.Kubeconfig, "--node-name", "node-a",
		"--istio-namespace", k.istioNS, "--cgroup", k.m.cg.Path, "--pin-dir", k.m.pin, "--cni-socket", k.sock,
		"--state-dir", k.stateDir, "--metrics-addr", ag.metrics, "--pod-gone-grace", "1s"}, k.extraArgs...)
	ag.client = api.NewClient(k.sock, 5*time.Second)
	k.t.Cleanup(ag.client.Close)
	ag.start()
	return ag
}

// createPod creates an injected pod object on node-a with p's addresses
// in its status, as kubelet reports them.
func (k *kubeNode) createPod(p *meshPod, ann map[string]string) *corev1.Pod {
	k.t.Helper()
	ctx := context.Background()
	if _, err := k.srv.Client.CoreV1().ServiceAccounts(k.ns).Create(ctx,
		&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: p.Name + "-sa"}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
		k.t.Fatal(err)
	}
	obj := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: p.Name, Namespace: k.ns, Annotations: ann,
		Labels: map[string]string{"app": p.Name}},
		Spec: corev1.PodSpec{NodeName: "node-a", ServiceAccountName: p.Name + "-sa",
			Containers: []corev1.Container{{Name: "app", Image: "app"}, {Name: istio.ProxyContainer, Image: "proxyv2"}}}}
	got, err := k.srv.Client.CoreV1().Pods(k.ns).Create(ctx, obj, metav1.CreateOptions{})
	if err != nil {
		k.t.Fatal(err)
	}
	got.Status.Phase = corev1.PodRunning
	got.Status.PodIP = p.IPv4.String()
	got.Status.PodIPs = []corev1.PodIP{{IP: p.IPv4.String()}, {IP: p.IPv6.String()}}
	if got, err = k.srv.Client.CoreV1().Pods(k.ns).UpdateStatus(ctx, got, metav1.UpdateOptions{}); err != nil {
		k.t.Fatal(err)
	}
	return got
}

// annotate sets one annotation of a pod object.
func (k *kubeNode) annotate(name, key, value string) {
	k.t.Helper()
	patch := fmt.Sprintf(`{"metadata":{"annotations":{%q:%q}}}`, key, value)
	if _, err := k.srv.Client.CoreV1().Pods(k.ns).Patch(context.Background(), name, "application/merge-patch+json",
		[]byte(patch), metav1.PatchOptions{}); err != nil {
		k.t.Fatal(err)
	}
}

// cni runs the real meshsplice-cni binary as a runtime does for a
// Kubernetes pod: CNI_ARGS with the pod's namespace, name and UID, the
// interface plugin's result as prevResult, no annotations or labels
// (Kubernetes runtimes pass none).
func (k *kubeNode) cni(command string, p *meshPod, uid string) (string, error) {
	conf := fmt.Sprintf(`{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"meshsplice-cni","agentSocket":%q,
"prevResult":{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":%q}],
"ips":[{"address":"%s/24","interface":0},{"address":"%s/64","interface":0}]}}`, k.sock, p.NS.Path(), p.IPv4, p.IPv6)
	cmd := exec.Command(k.plugin)
	cmd.Env = []string{"CNI_COMMAND=" + command, "CNI_CONTAINERID=c-" + p.Name, "CNI_NETNS=" + p.NS.Path(),
		"CNI_IFNAME=eth0", "CNI_PATH=" + filepath.Dir(k.plugin),
		fmt.Sprintf("CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAMESPACE=%s;K8S_POD_NAME=%s;K8S_POD_UID=%s", k.ns, p.Name, uid)}
	cmd.Stdin = strings.NewReader(conf)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// status runs `meshsplice status --json` with the agent's state dir.
func (k *kubeNode) status() []agent.PodReport {
	k.t.Helper()
	out, err := exec.Command(k.bin, "status", "--json", "--pin-dir", k.m.pin, "--state-dir", k.stateDir).Output()
	if err != nil {
		k.t.Fatalf("meshsplice status: %v", err)
	}
	var st struct {
		Pods []agent.PodReport `json:"pods"`
	}
	if err := json.Unmarshal(out, &st); err != nil {
		k.t.Fatalf("status --json: %v\n%s", err, out)
	}
	return st.Pods
}

// kernelPod is the kernel's entry for p (ok false: none).
func (k *kubeNode) kernelPod(p *meshPod) (datapath.Pod, bool) {
	for _, r := range k.status() {
		if r.InKernel && r.Cookie == p.Cookie {
			return datapath.Pod{Cookie: r.Cookie, IPs: r.IPs, Traffic: r.Traffic, Identity: r.Identity}, true
		}
	}
	return datapath.Pod{}, false
}

// registered is the agent's registration of p, from /pods.
func registered(t *testing.T, ag *agentProc, p *meshPod) (api.PodStatus, bool) {
	var pods []api.PodStatus
	if err := json.Unmarshal([]byte(ag.get("/pods")), &pods); err != nil {
		t.Fatalf("/pods: %v", err)
	}
	i := slices.IndexFunc(pods, func(s api.PodStatus) bool { return s.Pod.ContainerID == "c-"+p.Name })
	if i < 0 {
		return api.PodStatus{}, false
	}
	return pods[i], true
}

// TestKubeCNIAddReadsThePodFromTheAPIServer: on Kubernetes the CNI ADD
// carries only the pod's namespace and name; the agent registers the pod
// with the annotations, labels and service account of its API object, so
// the ADD returns with the pod captured as its annotations say. An
// annotation edit reaches the kernel; deleting the pod object removes the
// registration and the kernel's entry while the agent runs (its DEL never
// came).
func TestKubeCNIAddReadsThePodFromTheAPIServer(t *testing.T) {
	k := newKubeNode(t)
	ag := k.agent()
	defer ag.stop()
	web := k.m.addPod(k.node, "web", nil)
	obj := k.createPod(web, injected(istio.AnnotationSplice, "disabled"))

	if out, err := k.cni("ADD", web, string(obj.UID)); err != nil {
		t.Fatalf("CNI ADD: %v\n%s", err, out)
	}
	// In place when ADD returns: no waiting.
	kp, ok := k.kernelPod(web)
	if !ok || !kp.Traffic.Capture || kp.Traffic.Splice {
		t.Fatalf("after ADD the kernel has %+v (in kernel: %v), want captured with splice disabled by the pod's annotation", kp.Traffic, ok)
	}
	st, ok := registered(t, ag, web)
	if !ok {
		t.Fatal("web is not registered")
	}
	if r := st.Pod; r.ServiceAccount != "web-sa" || r.Labels["app"] != "web" || r.PodUID != string(obj.UID) ||
		r.Annotations[istio.AnnotationSplice] != "disabled" {
		t.Errorf("registration %+v, want the API object's service account, labels, UID and annotations", r)
	}

	// An annotation edit on the API server reaches the kernel.
	k.annotate("web", istio.AnnotationSplice, "enabled")
	eventually(t, "the annotation edit in the kernel", func() bool {
		kp, ok := k.kernelPod(web)
		return ok && kp.Traffic.Splice
	})

	// The pod object goes; its DEL never comes.
	if err := k.srv.Client.CoreV1().Pods(k.ns).Delete(context.Background(), "web", forceDelete()); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the registration of the deleted pod removed", func() bool {
		_, reg := registered(t, ag, web)
		_, inKernel := k.kernelPod(web)
		return !reg && !inKernel
	})
}

// TestKubeCNIAddUnknownPodRefused: an ADD for a pod the API server does
// not have is refused (nothing registered), and so is one whose UID is
// another pod's of the same name.
func TestKubeCNIAddUnknownPodRefused(t *testing.T) {
	k := newKubeNode(t)
	ag := k.agent()
	defer ag.stop()
	ghost := k.m.addPod(k.node, "ghost", nil)
	if out, err := k.cni("ADD", ghost, "uid-1"); err == nil || !strings.Contains(out, "no pod") {
		t.Errorf("ADD of a pod the API server lacks: %v\n%s", err, out)
	}
	k.createPod(ghost, injected())
	if out, err := k.cni("ADD", ghost, "another-uid"); err == nil || !strings.Contains(out, "UID") {
		t.Errorf("ADD with another pod's UID: %v\n%s", err, out)
	}
	if _, ok := registered(t, ag, ghost); ok {
		t.Error("a refused ADD left a registration")
	}
}

// TestKubeAgentCatchesUpAtStart: pods that changed while no agent ran
// are caught up when it starts: a registered pod whose annotation was
// edited is programmed with the edit; one whose object was deleted is
// removed; a meshed pod whose ADD went by while the agent was down is
// reported by `meshsplice status` as not registered (its netns is not
// guessed).
func TestKubeAgentCatchesUpAtStart(t *testing.T) {
	k := newKubeNode(t)
	early := k.m.addPod(k.node, "early", nil)
	gone := k.m.addPod(k.node, "gone", nil)
	missed := k.m.addPod(k.node, "missed", nil)
	ag := k.agent()
	for _, p := range []*meshPod{early, gone} {
		obj := k.createPod(p, injected())
		if out, err := k.cni("ADD", p, string(obj.UID)); err != nil {
			t.Fatalf("CNI ADD %s: %v\n%s", p.Name, err, out)
		}
		if kp, ok := k.kernelPod(p); !ok || !kp.Traffic.Splice {
			t.Fatalf("%s after ADD: %+v, %v", p.Name, kp, ok)
		}
	}
	ag.stop()

	// While no agent runs.
	k.annotate("early", istio.AnnotationSplice, "disabled")
	if err := k.srv.Client.CoreV1().Pods(k.ns).Delete(context.Background(), "gone", forceDelete()); err != nil {
		t.Fatal(err)
	}
	k.createPod(missed, injected())
	time.Sleep(time.Second) // past --pod-gone-grace: gone's registration is older than the grace

	ag = k.agent()
	defer ag.stop()
	eventually(t, "early caught up with its edited annotation", func() bool {
		kp, ok := k.kernelPod(early)
		return ok && kp.Traffic.Capture && !kp.Traffic.Splice
	})
	eventually(t, "gone's registration removed", func() bool {
		_, reg := registered(t, ag, gone)
		_, inKernel := k.kernelPod(gone)
		return !reg && !inKernel
	})
	eventually(t, "missed reported as not registered", func() bool {
		for _, r := range k.status() {
			if r.Name == "missed" && r.Namespace == k.ns {
				return r.Captured.State == "no" && strings.Contains(r.Captured.Reason, "not registered")
			}
		}
		return false
	})
	// Once its ADD comes (the pod recreated), it is registered and no
	// longer reported.
	obj, err := k.srv.Client.CoreV1().Pods(k.ns).Get(context.Background(), "missed", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if out, err := k.cni("ADD", missed, string(obj.UID)); err != nil {
		t.Fatalf("CNI ADD missed: %v\n%s", err, out)
	}
	if kp, ok := k.kernelPod(missed); !ok || !kp.Traffic.Capture {
		t.Errorf("missed after its ADD: %+v, %v", kp, ok)
	}
	for _, r := range k.status() {
		if r.Name == "missed" && !r.InKernel {
			t.Errorf("missed still reported without a registration after its ADD: %+v", r.Captured)
		}
	}
}
