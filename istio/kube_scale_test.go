package istio_test

import (
	"context"
	"fmt"
	"runtime"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"

	"github.com/meshsplice/meshsplice/istio"
)

// BenchmarkKubeScale is issue 12's scale run (not in make test: make
// kube-scale, docs/kubernetes-scale.md), against the real API server:
// 5,000 injected pod objects, 500 of them on this node, created once for
// its two parts, source (the config source's memory) and agent (the
// agent with 1,000 AuthorizationPolicies: kube_agent_scale_test.go).
func BenchmarkKubeScale(b *testing.B) {
	pods, nodes := scaleSize("KUBE_SCALE_PODS", 5000), 10
	e := newKubeEnv(b)
	cfg := rest.CopyConfig(e.srv.Config)
	cfg.QPS, cfg.Burst = 2000, 2000
	kc, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	start := time.Now()
	if err := parallel(ctx, pods, func(i int) error {
		return createScalePod(ctx, kc, e.ns, i, fmt.Sprintf("scale-node-%d", i%nodes))
	}); err != nil {
		b.Fatal(err)
	}
	b.Logf("created %d pods in %v", pods, time.Since(start).Round(time.Millisecond))
	e.node = "scale-node-0"
	b.Run("source", func(b *testing.B) { benchSourceScale(b, ctx, e, cfg, kc, pods, nodes) })
	b.Run("agent", func(b *testing.B) { benchAgentScale(b, ctx, e, cfg, kc) })
}

// parallel runs do(0..n-1) on 16 goroutines and returns the first error.
func parallel(ctx context.Context, n int, do func(i int) error) error {
	var wg sync.WaitGroup
	errs := make(chan error, n)
	work := make(chan int)
	for range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range work {
				if err := do(i); err != nil {
					errs <- err
				}
			}
		}()
	}
	for i := range n {
		if ctx.Err() != nil {
			break
		}
		work <- i
	}
	close(work)
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		return err
	}
	return ctx.Err()
}

// benchSourceScale is the memory of the config source: the heap it holds
// once it delivered its first Config (heap-MB), and, for comparison, the
// heap of a plain cluster-wide pod informer without the trimming
// transform (untrimmed-heap-MB), and how long the first Config took
// (sync-s).
func benchSourceScale(b *testing.B, ctx context.Context, e *kubeEnv, cfg *rest.Config, kc kubernetes.Interface, pods, nodes int) {
	b.ResetTimer()
	heapNow := func() uint64 {
		runtime.GC()
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return ms.HeapAlloc
	}
	for range b.N {
		// The source.
		before := heapNow()
		t0 := time.Now()
		sctx, scancel := context.WithCancel(ctx)
		updates := make(chan istio.Config, 1)
		src := &istio.KubeSource{Config: cfg, NodeName: e.node, IstioNamespace: e.istioNS}
		done := make(chan error, 1)
		go func() { done <- src.Run(sctx, updates) }()
		var c istio.Config
		for len(c.Pods) < pods/nodes || len(c.PodIPs) < pods {
			select {
			case c = <-updates:
			case <-time.After(5 * time.Minute):
				b.Fatalf("no full Config after 5 minutes: %d local pods, %d pod IPs", len(c.Pods), len(c.PodIPs))
			}
		}
		sync := time.Since(t0)
		after := heapNow()
		runtime.KeepAlive(c)
		scancel()
		<-done

		// A plain informer, for comparison.
		c = istio.Config{}
		before2 := heapNow()
		pctx, pcancel := context.WithCancel(ctx)
		f := informers.NewSharedInformerFactory(kc, 0)
		inf := f.Core().V1().Pods().Informer()
		f.Start(pctx.Done())
		cache.WaitForCacheSync(pctx.Done(), inf.HasSynced)
		after2 := heapNow()
		runtime.KeepAlive(inf)
		pcancel()
		f.Shutdown()

		b.ReportMetric(float64(after-before)/1e6, "heap-MB")
		b.ReportMetric(float64(after2-before2)/1e6, "untrimmed-heap-MB")
		b.ReportMetric(sync.Seconds(), "sync-s")
	}
}

// createScalePod creates pod i the way Istio's injector leaves one (two
// containers, the status annotation, labels), with its IP.
func createScalePod(ctx context.Context, kc kubernetes.Interface, ns string, i int, node string) error {
	always := corev1.ContainerRestartPolicyAlways
	env := []corev1.EnvVar{}
	for _, k := range []string{"PILOT_CERT_PROVIDER", "CA_ADDR", "POD_NAME", "POD_NAMESPACE", "INSTANCE_IP",
		"SERVICE_ACCOUNT", "HOST_IP", "ISTIO_CPU_LIMIT", "PROXY_CONFIG", "ISTIO_META_POD_PORTS", "ISTIO_META_APP_CONTAINERS",
		"GOMEMLIMIT", "GOMAXPROCS", "ISTIO_META_CLUSTER_ID", "ISTIO_META_NODE_NAME", "ISTIO_META_INTERCEPTION_MODE",
		"ISTIO_META_WORKLOAD_NAME", "ISTIO_META_OWNER", "ISTIO_META_MESH_ID", "TRUST_DOMAIN"} {
		env = append(env, corev1.EnvVar{Name: k, Value: "value-of-" + k})
	}
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("scale-%d", i), Namespace: ns,
			Labels: map[string]string{"app": fmt.Sprintf("app-%d", i%50), "version": "v1",
				"security.istio.io/tlsMode": "istio", "service.istio.io/canonical-name": fmt.Sprintf("app-%d", i%50),
				"service.istio.io/canonical-revision": "v1"},
			Annotations: map[string]string{istio.AnnotationStatus: injectedStatus("default", "istio-validation"),
				"kubectl.kubernetes.io/default-container": "app", "prometheus.io/path": "/stats/prometheus",
				"prometheus.io/port": "15020", "prometheus.io/scrape": "true"}},
		Spec: corev1.PodSpec{NodeName: node,
			InitContainers: []corev1.Container{{Name: "istio-validation", Image: "docker.io/istio/proxyv2:1.28.0",
				Args: []string{"istio-iptables", "-p", "15001", "-z", "15006", "-u", "1337", "-m", "REDIRECT", "-i", "*", "-x", "", "-b", "*", "-d", "15090,15021,15020", "--log_output_level=default:info", "--run-validation", "--skip-rule-apply"}},
				{Name: "istio-proxy", Image: "docker.io/istio/proxyv2:1.28.0", RestartPolicy: &always, Env: env,
					Args: []string{"proxy", "sidecar", "--domain", "$(POD_NAMESPACE).svc.cluster.local", "--proxyLogLevel=warning", "--proxyComponentLogLevel=misc:error", "--log_output_level=default:info"}}},
			Containers: []corev1.Container{{Name: "app", Image: "registry.example/app:1.0", Env: env[:5]}}},
	}
	got, err := kc.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{})
	if err != nil {
		return err
	}
	ip := fmt.Sprintf("10.%d.%d.%d", 100+i/65536, (i/256)%256, i%256)
	got.Status.Phase = corev1.PodRunning
	got.Status.PodIP = ip
	got.Status.PodIPs = []corev1.PodIP{{IP: ip}}
	_, err = kc.CoreV1().Pods(ns).UpdateStatus(ctx, got, metav1.UpdateOptions{})
	return err
}
