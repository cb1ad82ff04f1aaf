//go:build e2enode

package node

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	apisecurity "istio.io/api/security/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/internal/kubenode"
	"github.com/meshsplice/meshsplice/istio"
)

const (
	meshNS   = "mesh"
	appUID   = 1000
	proxyUID = 1337
	// allowedPort is open to web; deniedPort is denied to web by an
	// AuthorizationPolicy.
	allowedPort = 8080
	deniedPort  = 9090
)

// TestNode is the whole proof, in order: the node up, the chart
// installed, the meshed pods' traffic captured and spliced with no
// iptables rule in them, policy enforced, helm uninstall leaving the node
// as it found it, and the node torn down leaving the host as it was.
func TestNode(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	s := newSetup(t, ctx)
	n, pins := s.n, s.pins
	s.install(t, ctx)

	// The mesh: db serves allowedPort and deniedPort; web's clients call
	// both; an AuthorizationPolicy denies web -> db:deniedPort.
	mustCreate(t, ctx, n, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: meshNS, Labels: map[string]string{"istio-injection": "enabled"}}})
	for _, sa := range []string{"web", "db"} {
		mustCreate(t, ctx, n, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa, Namespace: meshNS}})
	}
	ic, err := istioclient.NewForConfig(n.Config)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ic.SecurityV1().AuthorizationPolicies(meshNS).Create(ctx, &securityv1.AuthorizationPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "deny-pods-9090", Namespace: meshNS},
		Spec: apisecurity.AuthorizationPolicy{
			Action: apisecurity.AuthorizationPolicy_DENY,
			Rules: []*apisecurity.Rule{{
				// By address: a principal needs mTLS, which the test
				// sidecar does not speak (PERMISSIVE: the sidecar would
				// let a plaintext peer through, so the kernel must too).
				From: []*apisecurity.Rule_From{{Source: &apisecurity.Source{IpBlocks: []string{kubenode.PodCIDR}}}},
				To:   []*apisecurity.Rule_To{{Operation: &apisecurity.Operation{Ports: []string{fmt.Sprint(deniedPort)}}}},
			}},
		}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	db := meshedPod("db", []corev1.Container{
		app("echo-8080", "echo", "--port", fmt.Sprint(allowedPort)),
		app("echo-9090", "echo", "--port", fmt.Sprint(deniedPort)),
	})
	mustCreate(t, ctx, n, db)
	dbIP := waitRunning(t, ctx, n, "db")
	web := meshedPod("web", []corev1.Container{
		app("to-8080", "client", "--target", fmt.Sprintf("%s:%d", dbIP, allowedPort), "--messages", "50", "--size", "8192"),
		app("to-9090", "client", "--target", fmt.Sprintf("%s:%d", dbIP, deniedPort), "--messages", "5", "--timeout", "3s"),
	})
	// A client that ran before its sidecar listened fails; the kubelet
	// runs it again.
	web.Spec.RestartPolicy = corev1.RestartPolicyOnFailure
	mustCreate(t, ctx, n, web)
	webIP := waitRunning(t, ctx, n, "web")

	eventually(t, 90*time.Second, "web -> db:8080 exchanged through both sidecars", func() error {
		st, err := containerState(ctx, n, "web", "to-8080")
		if err != nil {
			return err
		}
		if st.Terminated == nil || st.Terminated.ExitCode != 0 {
			return fmt.Errorf("to-8080: %+v", st)
		}
		return nil
	})
	// Captured: the app's connection went to web's sidecar (outbound) and
	// arrived at db's sidecar (inbound), with the original destination.
	want := fmt.Sprintf(`"orig_dst":"%s:%d"`, dbIP, allowedPort)
	for _, c := range []struct{ pod, listener string }{{"web", "outbound"}, {"db", "inbound"}} {
		logs := podLogs(t, n, c.pod, istio.ProxyContainer)
		if !strings.Contains(logs, `"event":"accept"`) || !strings.Contains(logs, `"listener":"`+c.listener+`"`) || !strings.Contains(logs, want) {
			t.Errorf("%s's sidecar did not accept the %s connection to %s:%d:\n%s", c.pod, c.listener, dbIP, allowedPort, logs)
		}
	}
	// Denied: web -> db:9090 never succeeds, and the kernel counted it.
	eventually(t, 2*time.Minute, "web -> db:9090 denied by the kernel", func() error {
		c, err := datapath.ReadPinnedCounters(pins)
		if err != nil {
			return err
		}
		if c["policy.ingress_denied"]+c["policy.egress_denied"] == 0 {
			return fmt.Errorf("no denial counted: %v", c)
		}
		return nil
	})
	// ... and the client saw it fail, never succeed.
	eventually(t, time.Minute, "web -> db:9090 failed in the client", func() error {
		st, err := containerStatus(ctx, n, "web", "to-9090")
		if err != nil {
			return err
		}
		for _, s := range []corev1.ContainerState{st.State, st.LastTerminationState} {
			if s.Terminated != nil && s.Terminated.ExitCode == 0 {
				t.Fatalf("web -> db:9090 (denied) succeeded: %+v", st)
			}
		}
		if st.State.Terminated == nil && st.LastTerminationState.Terminated == nil {
			return fmt.Errorf("to-9090 has not finished: %+v", st.State)
		}
		return nil
	})
	c, err := datapath.ReadPinnedCounters(pins)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("counters: %v", c)
	for _, k := range []string{"connect.captured", "sk_lookup.captured", "getsockopt.orig_dst_outbound", "sk_msg.redirected"} {
		if c[k] == 0 {
			t.Errorf("counter %s is 0: want the meshed traffic captured and spliced (%v)", k, c)
		}
	}
	// No iptables rule in either pod: the capture is meshsplice's.
	for _, ip := range []string{dbIP, webIP} {
		ns := netnsOf(t, ip)
		for _, cmd := range [][]string{{"iptables-save"}, {"ip6tables-save"}, {"nft", "list", "ruleset"}} {
			out, err := exec.Command("ip", append([]string{"netns", "exec", ns}, cmd...)...).CombinedOutput()
			if err != nil {
				t.Fatalf("%s in %s: %v: %s", cmd[0], ns, err, out)
			}
			for _, l := range strings.Split(string(out), "\n") {
				if strings.HasPrefix(l, "-A") || strings.Contains(l, "redirect") || strings.Contains(l, "dnat") {
					t.Errorf("pod %s (%s) has a rule: %s", ip, ns, l)
				}
			}
		}
	}

	s.uninstall(t)
}

func meshedPod(name string, apps []corev1.Container) *corev1.Pod {
	zero := int64(2)
	proxy := corev1.Container{
		Name: istio.ProxyContainer, Image: kubenode.TestImage, ImagePullPolicy: corev1.PullNever,
		Command:         []string{"/mstest", "sidecar"},
		Env:             noMPTCP,
		SecurityContext: &corev1.SecurityContext{RunAsUser: ptr(int64(proxyUID)), RunAsGroup: ptr(int64(proxyUID))},
	}
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: meshNS,
			Labels: map[string]string{"app": name, "security.istio.io/tlsMode": "istio",
				"service.istio.io/canonical-name": name, "service.istio.io/canonical-revision": "latest"},
			// What Istio's injector sets (no istio-init: meshsplice captures).
			Annotations: map[string]string{
				istio.AnnotationStatus:                    `{"initContainers":null,"containers":["istio-proxy"],"volumes":["workload-socket","credential-socket","workload-certs","istio-envoy","istio-data","istio-podinfo","istio-token","istiod-ca-cert"],"imagePullSecrets":null,"revision":"default"}`,
				"kubectl.kubernetes.io/default-container": apps[0].Name,
				"istio.io/rev":                            "default",
			}},
		Spec: corev1.PodSpec{
			NodeName: kubenode.NodeName, ServiceAccountName: name,
			AutomountServiceAccountToken: ptr(false), EnableServiceLinks: ptr(false),
			TerminationGracePeriodSeconds: &zero,
			Containers:                    append([]corev1.Container{proxy}, apps...),
		},
	}
}

func app(name string, args ...string) corev1.Container {
	return corev1.Container{Name: name, Image: kubenode.TestImage, ImagePullPolicy: corev1.PullNever,
		Command:         append([]string{"/mstest"}, args...),
		Env:             noMPTCP,
		SecurityContext: &corev1.SecurityContext{RunAsUser: ptr(int64(appUID)), RunAsGroup: ptr(int64(appUID))}}
}

// noMPTCP: Go (>= 1.24) listens with MPTCP where the kernel has it, and a
// sockmap refuses an MPTCP listener; Envoy listens with plain TCP.
var noMPTCP = []corev1.EnvVar{{Name: "GODEBUG", Value: "multipathtcp=0"}}

func dirNames(t *testing.T, dir string) string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return strings.Join(names, " ")
}

func ptr[T any](v T) *T { return &v }

func mustCreate(t *testing.T, ctx context.Context, n *kubenode.Node, obj any) {
	t.Helper()
	var err error
	switch o := obj.(type) {
	case *corev1.Namespace:
		_, err = n.Client.CoreV1().Namespaces().Create(ctx, o, metav1.CreateOptions{})
	case *corev1.ServiceAccount:
		_, err = n.Client.CoreV1().ServiceAccounts(o.Namespace).Create(ctx, o, metav1.CreateOptions{})
	case *corev1.Pod:
		_, err = n.Client.CoreV1().Pods(o.Namespace).Create(ctx, o, metav1.CreateOptions{})
	default:
		t.Fatalf("mustCreate %T", obj)
	}
	if err != nil {
		t.Fatal(err)
	}
}

func waitRunning(t *testing.T, ctx context.Context, n *kubenode.Node, name string) string {
	t.Helper()
	var ip string
	eventually(t, 2*time.Minute, "pod "+name+" running", func() error {
		p, err := n.Client.CoreV1().Pods(meshNS).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		if p.Status.Phase != corev1.PodRunning || p.Status.PodIP == "" {
			b, _ := json.Marshal(p.Status)
			return fmt.Errorf("%s", b)
		}
		ip = p.Status.PodIP
		return nil
	})
	return ip
}

func containerState(ctx context.Context, n *kubenode.Node, pod, container string) (corev1.ContainerState, error) {
	st, err := containerStatus(ctx, n, pod, container)
	return st.State, err
}

func containerStatus(ctx context.Context, n *kubenode.Node, pod, container string) (corev1.ContainerStatus, error) {
	p, err := n.Client.CoreV1().Pods(meshNS).Get(ctx, pod, metav1.GetOptions{})
	if err != nil {
		return corev1.ContainerStatus{}, err
	}
	for _, s := range p.Status.ContainerStatuses {
		if s.Name == container {
			return s, nil
		}
	}
	return corev1.ContainerStatus{}, fmt.Errorf("no status of %s/%s yet", pod, container)
}

// podLogs reads a container's logs where kubelet writes them (every
// restart's file).
func podLogs(t *testing.T, n *kubenode.Node, pod, container string) string {
	t.Helper()
	files, _ := filepath.Glob(filepath.Join(n.Dir, "pod-logs", meshNS+"_"+pod+"_*", container, "*.log"))
	var b strings.Builder
	for _, f := range files {
		data, _ := os.ReadFile(f)
		b.Write(data)
	}
	return b.String()
}

// podsReport is every pod's status, for failures.
func podsReport(n *kubenode.Node) string {
	ps, err := n.Client.CoreV1().Pods("").List(context.Background(), metav1.ListOptions{})
	if err != nil {
		return err.Error()
	}
	var b strings.Builder
	for _, p := range ps.Items {
		st, _ := json.Marshal(p.Status)
		fmt.Fprintf(&b, "%s/%s: %s\n", p.Namespace, p.Name, st)
		for _, c := range append(p.Spec.InitContainers, p.Spec.Containers...) {
			files, _ := filepath.Glob(filepath.Join(n.Dir, "pod-logs", p.Namespace+"_"+p.Name+"_*", c.Name, "*.log"))
			for _, f := range files {
				data, _ := os.ReadFile(f)
				if len(data) > 2000 {
					data = data[len(data)-2000:]
				}
				fmt.Fprintf(&b, "  %s:\n%s\n", c.Name, data)
			}
		}
	}
	return b.String()
}

// netnsOf is the /run/netns name of the pod with ip.
func netnsOf(t *testing.T, ip string) string {
	t.Helper()
	files, _ := filepath.Glob("/run/netns/cni-*")
	for _, f := range files {
		out, err := exec.Command("ip", "-n", filepath.Base(f), "-o", "-4", "addr").Output()
		if err == nil && strings.Contains(string(out), " "+ip+"/") {
			return filepath.Base(f)
		}
	}
	t.Fatalf("no netns in /run/netns with %s", ip)
	return ""
}

// cgroupPrograms lists the programs attached to the cgroup (bpftool).
func cgroupPrograms(t *testing.T, cgroup string) string {
	t.Helper()
	out, err := exec.Command("bpftool", "cgroup", "show", cgroup).CombinedOutput()
	if err != nil {
		t.Fatalf("bpftool cgroup show %s: %v: %s", cgroup, err, out)
	}
	return string(out)
}

func helmRun(helm string, n *kubenode.Node, args ...string) ([]byte, error) {
	cmd := exec.Command(helm, append(args, "--kubeconfig", n.Kubeconfig)...)
	cmd.Env = append(os.Environ(), "HELM_CACHE_HOME="+filepath.Join(n.Dir, "helm", "cache"),
		"HELM_CONFIG_HOME="+filepath.Join(n.Dir, "helm", "config"), "HELM_DATA_HOME="+filepath.Join(n.Dir, "helm", "data"))
	return cmd.CombinedOutput()
}

func eventually(t *testing.T, limit time.Duration, what string, f func() error) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for {
		err := f()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not after %v: %v", what, limit, err)
		}
		time.Sleep(250 * time.Millisecond)
	}
}

// podCgroupRoot is the cgroup v2 directory holding the node's pods, the
// chart's cgroupRoot: kubelet's kubepods in the unified hierarchy (on
// this hybrid VM at /sys/fs/cgroup/unified), never the machine's root.
func podCgroupRoot(t *testing.T) string {
	t.Helper()
	for _, c := range []string{"/sys/fs/cgroup/unified/kubepods", "/sys/fs/cgroup/kubepods"} {
		if st, err := os.Stat(filepath.Join(c, "cgroup.procs")); err == nil && !st.IsDir() {
			return c
		}
	}
	t.Fatal("no kubepods cgroup in the cgroup v2 hierarchy")
	return ""
}

// TestNodeSingleConf: a node whose CNI is a single-plugin .conf. The
// chart's cni-install makes it NAME.conflist with meshsplice-cni chained
// (and removes the .conf), containerd takes the list: a meshed pod started
// then is registered with the agent and its inbound is captured; helm
// uninstall puts the .conf back byte for byte and removes the list.
func TestNodeSingleConf(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	s := newSetup(t, ctx, kubenode.SingleConf)
	n := s.n
	s.install(t, ctx)
	if _, err := os.Stat(n.Conflist); !os.IsNotExist(err) {
		t.Errorf("the node's .conf is still there (%v): containerd would take it, unchained", err)
	}
	mustCreate(t, ctx, n, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: meshNS}})
	mustCreate(t, ctx, n, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "db", Namespace: meshNS}})
	mustCreate(t, ctx, n, meshedPod("db", []corev1.Container{app("echo-8080", "echo", "--port", fmt.Sprint(allowedPort))}))
	dbIP := waitRunning(t, ctx, n, "db")
	// The host is no meshed pod: its connection to db is captured inbound
	// by db's kernel (sk_lookup) to db's sidecar, as istio-iptables'
	// PREROUTING rules would.
	eventually(t, time.Minute, "host -> db:8080 captured to db's sidecar", func() error {
		// Connect and hang up after 1 s (curl's telnet: the echo server
		// sends nothing first); the outcome is the sidecar's log.
		exec.Command("curl", "-s", "-m", "1", "-o", "/dev/null", fmt.Sprintf("telnet://%s:%d", dbIP, allowedPort)).Run()
		logs := podLogs(t, n, "db", istio.ProxyContainer)
		if !strings.Contains(logs, `"listener":"inbound"`) {
			return fmt.Errorf("db's sidecar accepted nothing inbound:\n%s", logs)
		}
		return nil
	})
	s.uninstall(t)
}
