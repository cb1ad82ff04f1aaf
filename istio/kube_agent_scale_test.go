package istio_test

import (
	"bufio"
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	apisecurity "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/meshsplice/meshsplice/agent/api"
	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/internal/testnet"
	"github.com/meshsplice/meshsplice/istio"
)

// Sizes of the agent part of the scale run.
var scalePolicies = scaleSize("KUBE_SCALE_POLICIES", 1000) // AuthorizationPolicies besides the edited one

const (
	scaleEdits      = 10 // policy edit -> kernel samples, quiet and churning
	scaleADDs       = 60 // CNI ADDs (real netns) while the cluster churns
	quietADDs       = 20 // CNI ADDs (real netns) before, for comparison
	churnPodsPerSec = 10 // pod objects created, and as many deleted, per second
	churnEditsEvery = 200 * time.Millisecond
)

// benchAgentScale runs `meshsplice agent --kubernetes` (the real binary,
// in a test cgroup with its own pin dir) against the cluster of
// BenchmarkKubeScale plus 1,000 AuthorizationPolicies, and reports:
//
//   - its memory once synced (rss-MB, heap-MB: process_resident_memory_bytes
//     and go_memstats_heap_inuse_bytes of its /metrics), and how long the
//     sync took (agent-sync-s: start to the first policy in the kernel);
//   - the time from an AuthorizationPolicy update through the API server
//     to the kernel's maps (edit-p50-ms, edit-max-ms; quiet cluster, and
//     churn-edit-* while the cluster churns): the edit moves a policy's
//     selector from one registered pod to another, and the maps are
//     polled until the first pod has no policy set and the second has one;
//   - the latency of CNI ADDs (add-p50-ms, add-p99-ms, add-max-ms) made
//     while pod objects are created and deleted and policies edited in
//     the background (and, for comparison, quiet-add-* in a quiet
//     cluster): the request the CNI plugin sends, on the agent's socket,
//     for a pod object just created on this node (no IP yet, as kubelet
//     leaves it) with a real network namespace.
func benchAgentScale(b *testing.B, ctx context.Context, e *kubeEnv, cfg *rest.Config, kc kubernetes.Interface) {
	testnet.RequireRoot(b)
	ic, err := istioclient.NewForConfig(cfg)
	if err != nil {
		b.Fatal(err)
	}
	b.StopTimer()
	start := time.Now()
	if err := parallel(ctx, scalePolicies, func(j int) error {
		_, err := ic.SecurityV1().AuthorizationPolicies(e.ns).Create(ctx, scalePolicy(e.ns, j), metav1.CreateOptions{})
		return err
	}); err != nil {
		b.Fatal(err)
	}
	if _, err := ic.SecurityV1().AuthorizationPolicies(e.ns).Create(ctx, editPolicy(e.ns, "edit-a"), metav1.CreateOptions{}); err != nil {
		b.Fatal(err)
	}
	b.Logf("created %d AuthorizationPolicies in %v", scalePolicies+1, time.Since(start).Round(time.Millisecond))

	// The node: the agent, its pin dir and cgroup, a bridge for the pods.
	bin := testnet.BuildBinary(b, "github.com/meshsplice/meshsplice/cmd/meshsplice")
	cg := testnet.NewCgroup(b)
	pin := testnet.PinDir(b, func(dir string) error { return datapath.Detach(dir, time.Second) })
	node := testnet.NewBridgeNet(b, testnet.BridgeNetOpts{})
	pods := make([]*testnet.Pod, 2+quietADDs+scaleADDs)
	for i := range pods {
		pods[i] = node.AddPod(b, fmt.Sprintf("sc%d", i))
	}
	sock := filepath.Join(b.TempDir(), "cni.sock")
	metrics := "127.0.0.1:" + strconv.Itoa(freeTCPPort(b))
	for range b.N {
		b.StartTimer()
		t0 := time.Now()
		ag := testnet.Start(b, testnet.StartOpts{Name: "agent", Args: []string{bin, "agent", "--kubernetes",
			"--kubeconfig", e.srv.Kubeconfig, "--node-name", e.node, "--istio-namespace", e.istioNS,
			"--cgroup", cg.Path, "--pin-dir", pin, "--cni-socket", sock, "--state-dir", b.TempDir(),
			"--metrics-addr", metrics, "--log-level", "error"}})
		client := api.NewClient(sock, time.Minute)
		b.Cleanup(client.Close)
		waitReady(b, metrics, 5*time.Minute)
		ready := time.Since(t0)

		// The two pods the edited policy moves between.
		a, z := pods[0], pods[1]
		for i, p := range []*testnet.Pod{a, z} {
			probe := []string{"edit-a", "edit-b"}[i]
			if _, err := createLocalPod(ctx, kc, e.ns, p.Name, e.node, map[string]string{"probe": probe}, p); err != nil {
				b.Fatal(err)
			}
			if _, _, err := addPod(ctx, client, e.ns, p); err != nil {
				b.Fatalf("CNI ADD of %s: %v\n%s", p.Name, err, ag.Tail())
			}
		}
		cookieA, cookieZ := cookie(b, a), cookie(b, z)
		waitKernel(b, pin, 5*time.Minute, func(pp map[uint64]datapath.PodPolicy) bool {
			return pp[cookieA].PolicySet != 0 && pp[cookieZ].PolicySet == 0
		})
		synced := time.Since(t0)
		time.Sleep(5 * time.Second) // the informers' initial lists settle
		m := readMetrics(b, metrics)
		b.ReportMetric(ready.Seconds(), "agent-ready-s")
		b.ReportMetric(synced.Seconds(), "agent-sync-s")
		b.ReportMetric(m["process_resident_memory_bytes"]/1e6, "rss-MB")
		b.ReportMetric(m["go_memstats_heap_inuse_bytes"]/1e6, "heap-MB")
		b.Logf("agent synced in %v: RSS %.1f MB, heap in use %.1f MB, heap objects %.0f, goroutines %.0f, policy compiles %.0f",
			synced.Round(time.Millisecond), m["process_resident_memory_bytes"]/1e6, m["go_memstats_heap_inuse_bytes"]/1e6,
			m["go_memstats_heap_objects"], m["go_goroutines"], m["meshsplice_policy_compiles_total"])

		// (b) Policy edit -> kernel, quiet.
		edit := func() time.Duration {
			cur, err := ic.SecurityV1().AuthorizationPolicies(e.ns).Get(ctx, "edited", metav1.GetOptions{})
			if err != nil {
				b.Fatal(err)
			}
			to, on, off := "edit-b", cookieZ, cookieA
			if cur.Spec.Selector.MatchLabels["probe"] == "edit-b" {
				to, on, off = "edit-a", cookieA, cookieZ
			}
			cur.Spec.Selector.MatchLabels["probe"] = to
			t := time.Now()
			if _, err := ic.SecurityV1().AuthorizationPolicies(e.ns).Update(ctx, cur, metav1.UpdateOptions{}); err != nil {
				b.Fatal(err)
			}
			waitKernel(b, pin, time.Minute, func(pp map[uint64]datapath.PodPolicy) bool {
				return pp[on].PolicySet != 0 && pp[off].PolicySet == 0
			})
			return time.Since(t)
		}
		var quiet []time.Duration
		for range scaleEdits {
			quiet = append(quiet, edit())
			time.Sleep(200 * time.Millisecond)
		}
		report(b, "edit", quiet)

		// CNI ADDs, quiet: each waits for a policy compile of its own.
		addPods := func(pods []*testnet.Pod, between func(i int)) (adds []time.Duration, enforced int) {
			for i, p := range pods {
				labels := map[string]string{"app": fmt.Sprintf("app-%d", i%50)}
				obj, err := createLocalPod(ctx, kc, e.ns, p.Name, e.node, labels, nil)
				if err != nil {
					b.Fatal(err)
				}
				d, st, err := addPod(ctx, client, e.ns, p)
				if err != nil {
					b.Fatalf("CNI ADD of %s: %v\n%s", p.Name, err, ag.Tail())
				}
				adds = append(adds, d)
				if st.Policy != nil && st.Policy.Enforced {
					enforced++
				}
				setPodIP(ctx, b, kc, obj, p) // kubelet, after the CNI
				between(i)
				time.Sleep(100 * time.Millisecond)
			}
			return adds, enforced
		}
		quietAdds, quietEnforced := addPods(pods[2:2+quietADDs], func(int) {})
		report(b, "quiet-add", quietAdds)
		b.Logf("quiet ADDs: %d of %d returned with the pod's policy in the kernel", quietEnforced, len(quietAdds))
		compiles0 := readMetrics(b, metrics)["meshsplice_policy_compiles_total"]

		// (c) Churn in the background: pod objects created and deleted
		// on all nodes, policies edited.
		cctx, stopChurn := context.WithCancel(ctx)
		var churn sync.WaitGroup
		var created, deleted, edited atomic.Int64
		churn.Go(func() {
			tick := time.NewTicker(time.Second / churnPodsPerSec)
			defer tick.Stop()
			for i := 0; ; i++ {
				select {
				case <-cctx.Done():
					return
				case <-tick.C:
				}
				n := 100000 + i
				if err := createScalePod(cctx, kc, e.ns, n, fmt.Sprintf("scale-node-%d", n%10)); err == nil {
					created.Add(1)
				}
				if i >= 50 { // keep about 50 churned pods alive
					if err := kc.CoreV1().Pods(e.ns).Delete(cctx, fmt.Sprintf("scale-%d", n-50), metav1.DeleteOptions{}); err == nil {
						deleted.Add(1)
					}
				}
			}
		})
		churn.Go(func() {
			tick := time.NewTicker(churnEditsEvery)
			defer tick.Stop()
			for {
				select {
				case <-cctx.Done():
					return
				case <-tick.C:
				}
				j := rand.IntN(scalePolicies)
				cur, err := ic.SecurityV1().AuthorizationPolicies(e.ns).Get(cctx, fmt.Sprintf("scale-%d", j), metav1.GetOptions{})
				if err != nil {
					continue
				}
				cur.Spec.Rules[0].To[0].Operation.Ports = []string{strconv.Itoa(8000 + rand.IntN(100))}
				if _, err := ic.SecurityV1().AuthorizationPolicies(e.ns).Update(cctx, cur, metav1.UpdateOptions{}); err == nil {
					edited.Add(1)
				}
			}
		})
		time.Sleep(3 * time.Second) // the churn is under way
		churnStart := time.Now()
		var churned []time.Duration
		adds, enforced := addPods(pods[2+quietADDs:], func(i int) {
			if i%(scaleADDs/scaleEdits) == 0 {
				churned = append(churned, edit())
			}
		})
		window := time.Since(churnStart)
		stopChurn()
		churn.Wait()
		m = readMetrics(b, metrics)
		b.StopTimer()
		report(b, "add", adds)
		b.Logf("ADDs under churn: %d of %d returned with the pod's policy in the kernel (the others after PolicyWait)", enforced, len(adds))
		report(b, "churn-edit", churned)
		b.ReportMetric(m["process_resident_memory_bytes"]/1e6, "churn-rss-MB")
		b.Logf("churn: %v, %d pod objects created, %d deleted, %d policy edits; %.0f policy compiles meanwhile; RSS %.1f MB, heap in use %.1f MB, CPU %.1f s in all",
			window.Round(time.Millisecond), created.Load(), deleted.Load(), edited.Load(),
			m["meshsplice_policy_compiles_total"]-compiles0, m["process_resident_memory_bytes"]/1e6,
			m["go_memstats_heap_inuse_bytes"]/1e6, m["process_cpu_seconds_total"])
		var failures []string
		for k, v := range m {
			for _, f := range []string{"meshsplice_reconcile_retries_total", "meshsplice_apply_failures_total",
				"meshsplice_policy_not_applied_total", "meshsplice_drift_pods"} {
				if strings.HasPrefix(k, f) && v != 0 {
					failures = append(failures, k+" "+strconv.FormatFloat(v, 'f', -1, 64))
				}
			}
		}
		slices.Sort(failures)
		b.Logf("failures and retries at the end (nonzero): %v", failures)
		if err := ag.Signal(os.Interrupt); err != nil {
			b.Fatal(err)
		}
		if err := ag.WaitTimeout(30 * time.Second); err != nil {
			b.Logf("agent: %v\n%s", err, ag.Tail())
		}
	}
}

// scalePolicy is AuthorizationPolicy j of the scale run: an ALLOW for
// one of 50 apps (20 policies each), from one principal or namespace,
// to one port.
func scalePolicy(ns string, j int) *securityv1.AuthorizationPolicy {
	from := &apisecurity.Source{Principals: []string{"cluster.local/ns/" + ns + "/sa/default"}}
	if j%2 == 1 {
		from = &apisecurity.Source{Namespaces: []string{fmt.Sprintf("client-ns-%d", j%10)}}
	}
	return &securityv1.AuthorizationPolicy{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("scale-%d", j), Namespace: ns},
		Spec: apisecurity.AuthorizationPolicy{
			Selector: &typev1beta1.WorkloadSelector{MatchLabels: map[string]string{"app": fmt.Sprintf("app-%d", j%50)}},
			Action:   apisecurity.AuthorizationPolicy_ALLOW,
			Rules: []*apisecurity.Rule{{From: []*apisecurity.Rule_From{{Source: from}},
				To: []*apisecurity.Rule_To{{Operation: &apisecurity.Operation{Ports: []string{strconv.Itoa(8000 + j%20)}}}}}}}}
}

// editPolicy is the policy the run edits: an ALLOW for the pod labelled
// probe=<probe>.
func editPolicy(ns, probe string) *securityv1.AuthorizationPolicy {
	return &securityv1.AuthorizationPolicy{ObjectMeta: metav1.ObjectMeta{Name: "edited", Namespace: ns},
		Spec: apisecurity.AuthorizationPolicy{
			Selector: &typev1beta1.WorkloadSelector{MatchLabels: map[string]string{"probe": probe}},
			Action:   apisecurity.AuthorizationPolicy_ALLOW,
			Rules: []*apisecurity.Rule{{From: []*apisecurity.Rule_From{{Source: &apisecurity.Source{
				Principals: []string{"cluster.local/ns/" + ns + "/sa/default"}}}}}}}}
}

// createLocalPod creates an injected pod object name on node; with p,
// its status says p's addresses.
func createLocalPod(ctx context.Context, kc kubernetes.Interface, ns, name, node string, labels map[string]string, p *testnet.Pod) (*corev1.Pod, error) {
	obj := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: labels,
		Annotations: map[string]string{istio.AnnotationStatus: injectedStatus("default", "istio-validation")}},
		Spec: corev1.PodSpec{NodeName: node, Containers: []corev1.Container{{Name: "app", Image: "app"},
			{Name: istio.ProxyContainer, Image: "proxyv2"}}}}
	got, err := kc.CoreV1().Pods(ns).Create(ctx, obj, metav1.CreateOptions{})
	if err != nil || p == nil {
		return got, err
	}
	got.Status.Phase = corev1.PodRunning
	got.Status.PodIP = p.IPv4.String()
	got.Status.PodIPs = []corev1.PodIP{{IP: p.IPv4.String()}, {IP: p.IPv6.String()}}
	return kc.CoreV1().Pods(ns).UpdateStatus(ctx, got, metav1.UpdateOptions{})
}

// setPodIP gives obj p's addresses, as kubelet does after the CNI ADD.
func setPodIP(ctx context.Context, tb testing.TB, kc kubernetes.Interface, obj *corev1.Pod, p *testnet.Pod) {
	tb.Helper()
	obj.Status.Phase = corev1.PodRunning
	obj.Status.PodIP = p.IPv4.String()
	obj.Status.PodIPs = []corev1.PodIP{{IP: p.IPv4.String()}, {IP: p.IPv6.String()}}
	if _, err := kc.CoreV1().Pods(obj.Namespace).UpdateStatus(ctx, obj, metav1.UpdateOptions{}); err != nil {
		tb.Fatal(err)
	}
}

// addPod sends the CNI plugin's ADD for p (pod ns/p.Name) and returns how
// long the agent took to answer, and its answer.
func addPod(ctx context.Context, c *api.Client, ns string, p *testnet.Pod) (time.Duration, api.PodStatus, error) {
	t := time.Now()
	st, err := c.AddPod(ctx, api.PodRegistration{ContainerID: "c-" + p.Name, Netns: p.NS.Path(), IfName: "eth0",
		IPs: []netip.Addr{p.IPv4, p.IPv6}, PodName: p.Name, PodNamespace: ns, Network: "scale"})
	return time.Since(t), st, err
}

func cookie(tb testing.TB, p *testnet.Pod) uint64 {
	tb.Helper()
	c, err := p.NS.Cookie()
	if err != nil {
		tb.Fatal(err)
	}
	return c
}

// waitKernel polls the kernel's policy maps every 2 ms until ok.
func waitKernel(tb testing.TB, pin string, limit time.Duration, ok func(map[uint64]datapath.PodPolicy) bool) {
	tb.Helper()
	deadline := time.Now().Add(limit)
	for {
		pp, err := datapath.ReadPodPolicies(pin)
		if err == nil && ok(pp) {
			return
		}
		if time.Now().After(deadline) {
			tb.Fatalf("the kernel's policy maps never got there in %v (last read: %v)", limit, err)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// report logs samples and reports their p50, p99 (for more than 20
// samples) and max, in ms, as name-p50-ms etc.
func report(b *testing.B, name string, samples []time.Duration) {
	s := slices.Clone(samples)
	slices.Sort(s)
	q := func(f float64) float64 { return float64(s[int(f*float64(len(s)-1)+0.5)]) / 1e6 }
	b.ReportMetric(q(0.5), name+"-p50-ms")
	if len(s) > 20 {
		b.ReportMetric(q(0.99), name+"-p99-ms")
	}
	b.ReportMetric(q(1), name+"-max-ms")
	var ms []string
	for _, d := range samples {
		ms = append(ms, strconv.FormatFloat(float64(d)/1e6, 'f', 1, 64))
	}
	b.Logf("%s samples (ms, in order): %s", name, strings.Join(ms, " "))
}

// waitReady waits until the agent at addr answers /readyz with 200.
func waitReady(tb testing.TB, addr string, limit time.Duration) {
	tb.Helper()
	deadline := time.Now().Add(limit)
	for {
		resp, err := http.Get("http://" + addr + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		if time.Now().After(deadline) {
			tb.Fatalf("agent not ready after %v: %v", limit, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// readMetrics reads the agent's metrics, keyed by name and labels.
func readMetrics(tb testing.TB, addr string) map[string]float64 {
	tb.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		tb.Fatal(err)
	}
	defer resp.Body.Close()
	out := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		name, v, ok := strings.Cut(sc.Text(), " ")
		if !ok || strings.HasPrefix(name, "#") {
			continue
		}
		if f, err := strconv.ParseFloat(v, 64); err == nil {
			out[name] = f
		}
	}
	return out
}

// scaleSize is the environment variable env (a smaller run to try the
// benchmark out), else def.
func scaleSize(env string, def int) int {
	if n, err := strconv.Atoi(os.Getenv(env)); err == nil && n > 0 {
		return n
	}
	return def
}

// freeTCPPort returns a loopback TCP port that is free at the moment.
func freeTCPPort(tb testing.TB) int {
	tb.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}
