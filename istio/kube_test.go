package istio_test

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	apinetworking "istio.io/api/networking/v1"
	apisecurity "istio.io/api/security/v1beta1"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshsplice/meshsplice/internal/kubetest"
	"github.com/meshsplice/meshsplice/istio"
)

// The API server starts once for the package, on the first test that
// needs it.
func TestMain(m *testing.M) { os.Exit(kubetest.Main(m)) }

// kubeEnv is one test's corner of the shared API server: its own
// namespace for workloads, its own "istiod namespace" and node name, so
// that tests do not see each other's pods and ConfigMaps.
type kubeEnv struct {
	srv         *kubetest.Server
	ic          istioclient.Interface
	ns, istioNS string
	node        string
	latest      atomic.Pointer[istio.Config]
}

var ipCounter atomic.Uint32

// nextIP returns a pod IP no other test of this run uses.
func nextIP() netip.Addr {
	n := ipCounter.Add(1)
	return netip.AddrFrom4([4]byte{10, 200, byte(n >> 8), byte(n)})
}

func newKubeEnv(t testing.TB) *kubeEnv {
	t.Helper()
	srv := kubetest.Shared(t)
	ic, err := istioclient.NewForConfig(srv.Config)
	if err != nil {
		t.Fatal(err)
	}
	e := &kubeEnv{srv: srv, ic: ic, ns: srv.Namespace(t), istioNS: srv.Namespace(t)}
	e.node = "node-" + e.ns
	return e
}

// run starts a KubeSource for the env's node until the test ends.
func (e *kubeEnv) run(t *testing.T, revision string) {
	t.Helper()
	src := &istio.KubeSource{Config: e.srv.Config, NodeName: e.node, IstioNamespace: e.istioNS,
		Revision: revision, Batch: 20 * time.Millisecond}
	ctx, cancel := context.WithCancel(context.Background())
	updates := make(chan istio.Config)
	done := make(chan error, 1)
	go func() { done <- src.Run(ctx, updates) }()
	go func() {
		for {
			select {
			case c := <-updates:
				e.latest.Store(&c)
			case <-ctx.Done():
				return
			}
		}
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("KubeSource.Run: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Errorf("KubeSource.Run did not return 10 s after its context ended")
		}
	})
}

// waitFor waits (30 s at most) until the latest Config satisfies ok, which
// returns "" when satisfied and otherwise what is still wrong.
func (e *kubeEnv) waitFor(t *testing.T, what string, ok func(istio.Config) string) istio.Config {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	last := "no Config received"
	for time.Now().Before(deadline) {
		if c := e.latest.Load(); c != nil {
			if last = ok(*c); last == "" {
				return *c
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("%s: not delivered within 30 s; last Config: %s", what, last)
	return istio.Config{}
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// injectedStatus is the sidecar.istio.io/status annotation Istio's
// injector writes (istio-cni mode: istio-validation, not istio-init).
func injectedStatus(revision string, initContainers ...string) string {
	return fmt.Sprintf(`{"initContainers":[%s],"containers":["istio-proxy"],"volumes":["workload-socket","credential-socket","workload-certs","istio-envoy","istio-data","istio-podinfo","istio-token","istiod-ca-cert"],"imagePullSecrets":null,"revision":%q}`,
		`"`+strings.Join(initContainers, `","`)+`"`, revision)
}

type podSpec struct {
	name, node, sa string
	annotations    map[string]string
	labels         map[string]string
	sidecar        string // "", "sidecar", "native"
	init           []string
	ip             netip.Addr
}

// createPod creates a pod as kubelet and the injector would leave it:
// scheduled on node, with status.podIPs set through the status
// subresource.
func (e *kubeEnv) createPod(t *testing.T, ps podSpec) *corev1.Pod {
	t.Helper()
	ctx := ctxT(t)
	always := corev1.ContainerRestartPolicyAlways
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: ps.name, Namespace: e.ns, Annotations: ps.annotations, Labels: ps.labels},
		Spec: corev1.PodSpec{NodeName: ps.node, ServiceAccountName: ps.sa,
			Containers: []corev1.Container{{Name: "app", Image: "app"}}},
	}
	for _, c := range ps.init {
		pod.Spec.InitContainers = append(pod.Spec.InitContainers, corev1.Container{Name: c, Image: "proxyv2"})
	}
	switch ps.sidecar {
	case "sidecar":
		pod.Spec.Containers = append(pod.Spec.Containers, corev1.Container{Name: "istio-proxy", Image: "proxyv2"})
	case "native":
		pod.Spec.InitContainers = append(pod.Spec.InitContainers,
			corev1.Container{Name: "istio-proxy", Image: "proxyv2", RestartPolicy: &always})
	}
	if ps.sa != "" && ps.sa != "default" {
		_, err := e.srv.Client.CoreV1().ServiceAccounts(e.ns).Create(ctx,
			&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: ps.sa}}, metav1.CreateOptions{})
		if err != nil && !strings.Contains(err.Error(), "already exists") {
			t.Fatal(err)
		}
	}
	got, err := e.srv.Client.CoreV1().Pods(e.ns).Create(ctx, pod, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("create pod %s: %v", ps.name, err)
	}
	if ps.ip.IsValid() {
		got.Status.Phase = corev1.PodRunning
		got.Status.PodIP = ps.ip.String()
		got.Status.PodIPs = []corev1.PodIP{{IP: ps.ip.String()}}
		if got, err = e.srv.Client.CoreV1().Pods(e.ns).UpdateStatus(ctx, got, metav1.UpdateOptions{}); err != nil {
			t.Fatalf("set the IP of pod %s: %v", ps.name, err)
		}
	}
	return got
}

func findPod(c istio.Config, name string) (istio.Pod, bool) {
	for _, p := range c.Pods {
		if p.Name == name {
			return p, true
		}
	}
	return istio.Pod{}, false
}

// TestKubeSourcePods: the source delivers this node's pods with Istio's
// answer for each, every pod IP's identity cluster wide, and follows
// annotation, label, IP and deletion changes.
func TestKubeSourcePods(t *testing.T) {
	e := newKubeEnv(t)
	ips := map[string]netip.Addr{}
	for _, n := range []string{"meshed", "native", "plain", "iptables", "canary", "tproxy", "remote"} {
		ips[n] = nextIP()
	}
	inj := func(rev string, more ...string) map[string]string {
		a := map[string]string{istio.AnnotationStatus: injectedStatus(rev, "istio-validation")}
		for i := 0; i+1 < len(more); i += 2 {
			a[more[i]] = more[i+1]
		}
		return a
	}
	e.run(t, "")
	e.createPod(t, podSpec{name: "meshed", node: e.node, sa: "web", sidecar: "sidecar", init: []string{"istio-validation"},
		annotations: inj("default", istio.AnnotationExcludeInboundPorts, "9090"), labels: map[string]string{"app": "web"}, ip: ips["meshed"]})
	e.createPod(t, podSpec{name: "native", node: e.node, sidecar: "native", init: []string{"istio-validation"},
		annotations: inj("default"), ip: ips["native"]})
	e.createPod(t, podSpec{name: "plain", node: e.node, ip: ips["plain"]})
	e.createPod(t, podSpec{name: "iptables", node: e.node, sidecar: "sidecar", init: []string{"istio-init"},
		annotations: map[string]string{istio.AnnotationStatus: injectedStatus("default", "istio-init")}, ip: ips["iptables"]})
	e.createPod(t, podSpec{name: "canary", node: e.node, sidecar: "sidecar", annotations: inj("canary"), ip: ips["canary"]})
	e.createPod(t, podSpec{name: "tproxy", node: e.node, sidecar: "sidecar",
		annotations: inj("default", istio.AnnotationInterceptionMode, "TPROXY"), ip: ips["tproxy"]})
	e.createPod(t, podSpec{name: "remote", node: "other-" + e.node, sa: "remote-sa", sidecar: "sidecar",
		annotations: inj("default"), ip: ips["remote"]})
	e.createPod(t, podSpec{name: "pending", node: e.node, sidecar: "sidecar", annotations: inj("default")})

	want := map[string]string{ // pod -> "" meshed, else a word of the reason
		"meshed": "", "native": "", "plain": "not injected", "iptables": "istio-init",
		"canary": `revision "canary"`, "tproxy": "TPROXY", "pending": "",
	}
	c := e.waitFor(t, "the node's pods", func(c istio.Config) string {
		if len(c.Pods) != len(want) {
			var names []string
			for _, p := range c.Pods {
				names = append(names, p.Name)
			}
			return fmt.Sprintf("pods %v", names)
		}
		return ""
	})
	for name, reason := range want {
		p, _ := findPod(c, name)
		if p.Mesh.Meshed != (reason == "") || !strings.Contains(p.Mesh.Reason, reason) {
			t.Errorf("pod %s: meshed %v (%q), want meshed %v, reason containing %q", name, p.Mesh.Meshed, p.Mesh.Reason, reason == "", reason)
		}
	}
	if _, ok := findPod(c, "remote"); ok {
		t.Errorf("the pod of another node is among this node's pods")
	}
	m, _ := findPod(c, "meshed")
	if m.ServiceAccount != "web" || m.Labels["app"] != "web" || !slices.Equal(m.IPs, []netip.Addr{ips["meshed"]}) ||
		!slices.Contains(m.Mesh.Traffic.ExcludeInboundPorts, 9090) || m.Mesh.Proxy != istio.ProxySidecar {
		t.Errorf("pod meshed: sa %q labels %v IPs %v proxy %q traffic %+v", m.ServiceAccount, m.Labels, m.IPs, m.Mesh.Proxy, m.Mesh.Traffic)
	}
	if n, _ := findPod(c, "native"); n.Mesh.Proxy != istio.ProxyNativeSidecar {
		t.Errorf("pod native: proxy %q, want %q", n.Mesh.Proxy, istio.ProxyNativeSidecar)
	}
	wantID := istio.PodIdentity{Namespace: e.ns, Name: "remote", ServiceAccount: "remote-sa", NodeName: "other-" + e.node, Injected: true, Proxy: true}
	if got := c.PodIPs[ips["remote"]]; got != wantID {
		t.Errorf("PodIPs[%s] = %+v, want %+v", ips["remote"], got, wantID)
	}
	if got := c.PodIPs[ips["plain"]]; got.Name != "plain" || got.ServiceAccount != "default" || got.Injected {
		t.Errorf("PodIPs[%s] = %+v, want pod plain, service account default, not injected", ips["plain"], got)
	}

	// Edits reach the source.
	ctx := ctxT(t)
	pods := e.srv.Client.CoreV1().Pods(e.ns)
	p, err := pods.Get(ctx, "meshed", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	p.Annotations[istio.AnnotationInterceptionMode] = "NONE"
	p.Labels["version"] = "v2"
	if _, err := pods.Update(ctx, p, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	e.waitFor(t, "annotation and label edit", func(c istio.Config) string {
		p, _ := findPod(c, "meshed")
		if p.Mesh.Meshed || p.Labels["version"] != "v2" {
			return fmt.Sprintf("meshed %v labels %v", p.Mesh.Meshed, p.Labels)
		}
		return ""
	})

	// A pod gets its IP later.
	p, err = pods.Get(ctx, "pending", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	pendingIP := nextIP()
	p.Status.PodIPs = []corev1.PodIP{{IP: pendingIP.String()}}
	p.Status.PodIP = pendingIP.String()
	if _, err := pods.UpdateStatus(ctx, p, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	e.waitFor(t, "a pod's new IP", func(c istio.Config) string {
		p, _ := findPod(c, "pending")
		if !slices.Equal(p.IPs, []netip.Addr{pendingIP}) || c.PodIPs[pendingIP].Name != "pending" {
			return fmt.Sprintf("pending IPs %v, PodIPs[%s] %+v", p.IPs, pendingIP, c.PodIPs[pendingIP])
		}
		return ""
	})

	// A pod that ran to completion leaves the node's pods (its network is
	// gone), as it leaves PodIPs.
	p, err = pods.Get(ctx, "pending", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	p.Status.Phase = corev1.PodSucceeded
	if _, err := pods.UpdateStatus(ctx, p, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	e.waitFor(t, "a completed pod gone", func(c istio.Config) string {
		if _, local := findPod(c, "pending"); local || c.PodIPs[pendingIP].Name != "" {
			return fmt.Sprintf("completed pod still local %v, PodIPs[%s] %+v", local, pendingIP, c.PodIPs[pendingIP])
		}
		return ""
	})

	// Deletion removes the pod everywhere.
	zero := int64(0)
	for _, name := range []string{"native", "remote"} {
		if err := pods.Delete(ctx, name, metav1.DeleteOptions{GracePeriodSeconds: &zero}); err != nil {
			t.Fatal(err)
		}
	}
	e.waitFor(t, "deletions", func(c istio.Config) string {
		_, local := findPod(c, "native")
		_, ip1 := c.PodIPs[ips["native"]]
		_, ip2 := c.PodIPs[ips["remote"]]
		if local || ip1 || ip2 {
			return fmt.Sprintf("native still local %v, native IP known %v, remote IP known %v", local, ip1, ip2)
		}
		return ""
	})
}

// TestKubeSourceConfig: the mesh config (by revision), the meshsplice
// switches, AuthorizationPolicies, PeerAuthentications, WorkloadEntries,
// Services and namespaces reach the source, edits too, and an invalid
// mesh config or switch leaves the last good one in force.
func TestKubeSourceConfig(t *testing.T) {
	for _, revision := range []string{"", "canary"} {
		t.Run("revision="+revision, func(t *testing.T) {
			e := newKubeEnv(t)
			ctx := ctxT(t)
			cms := e.srv.Client.CoreV1().ConfigMaps(e.istioNS)
			e.run(t, revision)
			e.waitFor(t, "Istio's defaults without a ConfigMap", func(c istio.Config) string {
				if c.TrustDomain() != "cluster.local" || !c.Node.Capture || !c.Node.Splice {
					return fmt.Sprintf("trust domain %s, node %v", c.TrustDomain(), c.Node)
				}
				return ""
			})

			name := istio.MeshConfigMapName(revision)
			other := istio.MeshConfigMapName("other")
			mesh := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: name},
				Data: map[string]string{"mesh": "trustDomain: example.org\nproxyListenPort: 15101\n"}}
			if _, err := cms.Create(ctx, mesh, metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
			if _, err := cms.Create(ctx, &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: other},
				Data: map[string]string{"mesh": "trustDomain: other.org\n"}}, metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
			e.waitFor(t, "the revision's mesh config", func(c istio.Config) string {
				if c.TrustDomain() != "example.org" || c.Defaults().OutboundPort != 15101 {
					return fmt.Sprintf("trust domain %s, outbound port %d, sources %v", c.TrustDomain(), c.Defaults().OutboundPort, c.Sources)
				}
				return ""
			})

			// An invalid edit keeps the last good mesh config and switches,
			// while other changes still arrive.
			mesh.Data["mesh"] = "trustDomain: [not, a, string]\n"
			if _, err := cms.Update(ctx, mesh, metav1.UpdateOptions{}); err != nil {
				t.Fatal(err)
			}
			sw := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Name: "meshsplice"}, Data: map[string]string{"splice": "disabled"}}
			if _, err := cms.Create(ctx, sw, metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
			e.waitFor(t, "the switches, with the last good mesh config", func(c istio.Config) string {
				if c.Node.Splice || !c.Node.Capture || c.TrustDomain() != "example.org" ||
					!slices.ContainsFunc(c.Sources, func(s string) bool { return strings.Contains(s, "rejected") }) {
					return fmt.Sprintf("node %v, trust domain %s, sources %v", c.Node, c.TrustDomain(), c.Sources)
				}
				return ""
			})
			sw.Data["splice"] = "maybe"
			if _, err := cms.Update(ctx, sw, metav1.UpdateOptions{}); err != nil {
				t.Fatal(err)
			}
			mesh.Data["mesh"] = "trustDomain: new.org\n"
			if _, err := cms.Update(ctx, mesh, metav1.UpdateOptions{}); err != nil {
				t.Fatal(err)
			}
			e.waitFor(t, "a valid mesh edit, with the last good switches", func(c istio.Config) string {
				if c.TrustDomain() != "new.org" || c.Node.Splice || !c.Node.Capture {
					return fmt.Sprintf("trust domain %s, node %v", c.TrustDomain(), c.Node)
				}
				return ""
			})
		})
	}

	t.Run("objects", func(t *testing.T) {
		e := newKubeEnv(t)
		ctx := ctxT(t)
		e.run(t, "")
		aps := e.ic.SecurityV1().AuthorizationPolicies(e.ns)
		ap := &securityv1.AuthorizationPolicy{ObjectMeta: metav1.ObjectMeta{Name: "deny-db"},
			Spec: apisecurity.AuthorizationPolicy{Action: apisecurity.AuthorizationPolicy_DENY,
				Rules: []*apisecurity.Rule{{To: []*apisecurity.Rule_To{{Operation: &apisecurity.Operation{Ports: []string{"5432"}}}}}}}}
		if _, err := aps.Create(ctx, ap, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		pa := &securityv1.PeerAuthentication{ObjectMeta: metav1.ObjectMeta{Name: "strict"},
			Spec: apisecurity.PeerAuthentication{Mtls: &apisecurity.PeerAuthentication_MutualTLS{Mode: apisecurity.PeerAuthentication_MutualTLS_STRICT}}}
		if _, err := e.ic.SecurityV1().PeerAuthentications(e.ns).Create(ctx, pa, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		for name, addr := range map[string]string{"vm": "10.250.0.7", "dns": "vm.example.org"} {
			we := &networkingv1.WorkloadEntry{ObjectMeta: metav1.ObjectMeta{Name: name},
				Spec: apinetworking.WorkloadEntry{Address: addr, ServiceAccount: "vm-sa", Labels: map[string]string{"app": "vm"}}}
			if _, err := e.ic.NetworkingV1().WorkloadEntries(e.ns).Create(ctx, we, metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
		}
		svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "web"},
			Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "web"}, Ports: []corev1.ServicePort{{Port: 80}}}}
		if _, err := e.srv.Client.CoreV1().Services(e.ns).Create(ctx, svc, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		mine := func(ns string) bool { return ns == e.ns }
		e.waitFor(t, "policy, peer authentication, workload entry, service, namespace", func(c istio.Config) string {
			var got []string
			for _, ap := range c.AuthorizationPolicies {
				if mine(ap.Namespace) {
					got = append(got, "ap/"+ap.Name+"/"+ap.Spec.GetAction().String())
				}
			}
			for _, pa := range c.PeerAuthentications {
				if mine(pa.Namespace) {
					got = append(got, "pa/"+pa.Name+"/"+pa.Spec.GetMtls().GetMode().String())
				}
			}
			for _, we := range c.WorkloadEntries {
				if mine(we.Namespace) {
					got = append(got, "we/"+we.Name+"/"+we.Spec.GetServiceAccount())
				}
			}
			for _, s := range c.Services {
				if mine(s.Namespace) {
					got = append(got, "svc/"+s.Name+"/"+s.Selector["app"])
				}
			}
			for _, ns := range c.Namespaces {
				if mine(ns.Name) {
					got = append(got, "ns")
				}
			}
			if want := []string{"ap/deny-db/DENY", "pa/strict/STRICT", "we/vm/vm-sa", "svc/web/web", "ns"}; !slices.Equal(got, want) {
				return fmt.Sprintf("%v, want %v", got, want)
			}
			return ""
		})

		// A policy edit and deletion.
		cur, err := aps.Get(ctx, "deny-db", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		cur.Spec.Action = apisecurity.AuthorizationPolicy_ALLOW
		if _, err := aps.Update(ctx, cur, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		e.waitFor(t, "a policy edit", func(c istio.Config) string {
			for _, ap := range c.AuthorizationPolicies {
				if mine(ap.Namespace) && ap.Spec.GetAction() == apisecurity.AuthorizationPolicy_ALLOW {
					return ""
				}
			}
			return "no ALLOW deny-db"
		})
		if err := aps.Delete(ctx, "deny-db", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		e.waitFor(t, "a policy deletion", func(c istio.Config) string {
			for _, ap := range c.AuthorizationPolicies {
				if mine(ap.Namespace) {
					return "policy " + ap.Name + " still there"
				}
			}
			return ""
		})
	})
}
