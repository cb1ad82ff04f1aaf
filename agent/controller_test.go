package agent

import (
	"context"
	"errors"
	"net/netip"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/client-go/util/workqueue"

	"github.com/meshsplice/meshsplice/agent/api"
	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/internal/testnet"
	"github.com/meshsplice/meshsplice/istio"
)

// oneConfig is a Source that sends one config and then nothing.
type oneConfig struct{ c istio.Config }

func (s oneConfig) Run(ctx context.Context, updates chan<- istio.Config) error {
	select {
	case updates <- s.c:
	case <-ctx.Done():
		return nil
	}
	<-ctx.Done()
	return nil
}

// startTestAgent runs an agent in this process on a cgroup and pin
// directory of the test's own; tweak changes it before it serves.
func startTestAgent(tb testing.TB, tweak func(*Agent)) *Agent {
	tb.Helper()
	testnet.RequireRoot(tb)
	cg := testnet.NewCgroup(tb)
	pin := testnet.PinDir(tb, func(dir string) error { return datapath.Detach(dir, time.Second) })
	dir := tb.TempDir()
	a, err := New(Config{PinDir: pin, CgroupPath: cg.Path, CNISocket: filepath.Join(dir, "cni.sock"),
		StateDir: dir, NodeCapture: true, NodeSplice: true, PolicyWait: 50 * time.Millisecond,
		Source: oneConfig{istio.Config{Mesh: istio.DefaultMeshConfig(), Node: istio.NodeSwitches{Capture: true, Splice: true}}}})
	if err != nil {
		tb.Fatal(err)
	}
	if tweak != nil {
		tweak(a)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Serve(ctx) }()
	tb.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			tb.Errorf("agent: %v", err)
		}
		a.Close()
	})
	waitFor(tb, "the agent ready", func() bool { return a.Health(ctx) == nil })
	waitFor(tb, "the agent settled", func() bool { return settled(a) })
	return a
}

// settled: no pod work waits and the last policy change is compiled.
func settled(a *Agent) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.polDone >= a.polGen && a.ctl.work.Len() == 0 && a.ctl.policy.Len() == 0
}

// waitFor polls cond; the deadline only keeps a broken agent from hanging
// the test.
func waitFor(tb testing.TB, what string, cond func() bool) {
	tb.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			tb.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func registration(p *testnet.Pod, i int) api.PodRegistration {
	return api.PodRegistration{ContainerID: "c-" + p.Name, Netns: p.NS.Path(), IfName: "eth0",
		IPs: []netip.Addr{p.IPv4, p.IPv6}, PodName: p.Name, PodNamespace: "shop", ServiceAccount: p.Name,
		Labels:      map[string]string{"app": p.Name},
		Annotations: map[string]string{istio.AnnotationStatus: `{"containers":["istio-proxy"]}`}}
}

func kernelHas(tb testing.TB, a *Agent, p *testnet.Pod) bool {
	tb.Helper()
	cookie, err := p.NS.Cookie()
	if err != nil {
		tb.Fatal(err)
	}
	pods, err := a.dp.Pods()
	if err != nil {
		tb.Fatal(err)
	}
	return slices.ContainsFunc(pods, func(kp datapath.Pod) bool { return kp.Cookie == cookie && kp.Traffic.Capture })
}

// TestCNIAddNeverWaitsForABlockedCompile: while a policy compile is
// blocked (a slow one), CNI ADDs still return with their pods captured in
// the kernel; the ADDs of the burst are compiled once, by the next run,
// which puts every pod in the kernel's policy.
func TestCNIAddNeverWaitsForABlockedCompile(t *testing.T) {
	gate := make(chan chan struct{}, 1)
	entered := make(chan struct{}, 1)
	a := startTestAgent(t, func(a *Agent) {
		a.ctl.beforeCompile = func() {
			select {
			case release := <-gate:
				entered <- struct{}{}
				<-release
			default:
			}
		}
	})
	node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	var pods []*testnet.Pod
	for _, name := range []string{"p0", "p1", "p2", "p3", "p4"} {
		pods = append(pods, node.AddPod(t, name))
	}
	before := a.ctl.compiles.Load()
	release := make(chan struct{})
	gate <- release
	released := false
	defer func() {
		if !released {
			close(release)
		}
	}()

	// The first ADD starts a compile, which blocks.
	if _, err := a.AddPod(context.Background(), registration(pods[0], 0)); err != nil {
		t.Fatal(err)
	}
	<-entered
	// A burst of ADDs while it is blocked: each returns, captured.
	for i, p := range pods[1:] {
		if _, err := a.AddPod(context.Background(), registration(p, i+1)); err != nil {
			t.Fatalf("ADD %s while a compile is blocked: %v", p.Name, err)
		}
	}
	for _, p := range pods {
		if !kernelHas(t, a, p) {
			t.Errorf("%s is not captured in the kernel after its ADD returned", p.Name)
		}
	}
	if n := a.ctl.compiles.Load() - before; n != 1 {
		t.Fatalf("%d compiles started while the first is blocked, want 1", n)
	}
	close(release)
	released = true
	waitFor(t, "the policy settled", func() bool { return settled(a) })
	if n := metricValue(t, a, "meshsplice_policy_compiles_total", "") - float64(before); n != 2 {
		t.Errorf("%v compiles for the blocked one and a burst of %d ADDs, want 2 (the burst compiled once)", n, len(pods)-1)
	}
	for _, p := range pods {
		for _, ip := range []netip.Addr{p.IPv4, p.IPv6} {
			if ipp, ok := a.applied.IPs[ip]; !ok || ipp.Identity == 0 {
				t.Errorf("%s (%s) has no identity in the kernel's policy after the batch: %+v", p.Name, ip, ipp)
			}
		}
	}
}

// metricValue reads a metric of the controller as /metrics serves it
// (label: the value of its one label, "" for none).
func metricValue(tb testing.TB, a *Agent, name, label string) float64 {
	tb.Helper()
	reg := prometheus.NewRegistry()
	reg.MustRegister(controllerCollector{a: a})
	mfs, err := reg.Gather()
	if err != nil {
		tb.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			if label == "" || (len(m.GetLabel()) == 1 && m.GetLabel()[0].GetValue() == label) {
				return m.GetCounter().GetValue()
			}
		}
	}
	tb.Fatalf("no metric %s{%s}", name, label)
	return 0
}

// recordingLimiter is a rate limiter that notes each back-off it gives.
type recordingLimiter struct {
	workqueue.TypedRateLimiter[string]
	mu    sync.Mutex
	delay []time.Duration
}

func (r *recordingLimiter) When(key string) time.Duration {
	d := r.TypedRateLimiter.When(key)
	r.mu.Lock()
	r.delay = append(r.delay, d)
	r.mu.Unlock()
	return d
}

// TestFailedPodReconcileRetriedWithBackoff: a pod whose reconcile fails is
// put back on the work queue after a back-off that doubles, each failure
// counted, until it succeeds; the success resets the back-off.
func TestFailedPodReconcileRetriedWithBackoff(t *testing.T) {
	rec := &recordingLimiter{TypedRateLimiter: workqueue.NewTypedItemExponentialFailureRateLimiter[string](time.Millisecond, time.Second)}
	var attempts atomic.Int32
	a := startTestAgent(t, func(a *Agent) {
		a.ctl = newController(rec)
		a.ctl.failReconcile = func(string) error {
			if attempts.Add(1) <= 3 {
				return errors.New("injected failure")
			}
			return nil
		}
	})
	p := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{}).AddPod(t, "web")
	reg := registration(p, 0)
	if _, err := a.AddPod(context.Background(), reg); err != nil {
		t.Fatal(err)
	}
	failuresBefore := a.Failures()["program_pod"]
	a.enqueuePod(reg.ContainerID)
	waitFor(t, "the fourth attempt", func() bool { return attempts.Load() >= 4 && settled(a) })
	if n := attempts.Load(); n != 4 {
		t.Errorf("%d attempts, want 4 (3 failures, then a success)", n)
	}
	if n := metricValue(t, a, "meshsplice_reconcile_retries_total", "pod"); n != 3 {
		t.Errorf("meshsplice_reconcile_retries_total{what=pod} = %v, want 3", n)
	}
	if n := a.Failures()["program_pod"] - failuresBefore; n != 3 {
		t.Errorf("program_pod failures counted %d, want 3", n)
	}
	rec.mu.Lock()
	got := slices.Clone(rec.delay)
	rec.mu.Unlock()
	if want := []time.Duration{time.Millisecond, 2 * time.Millisecond, 4 * time.Millisecond}; !slices.Equal(got, want) {
		t.Errorf("back-offs %v, want %v", got, want)
	}
	if n := a.ctl.work.NumRequeues(podKey(reg.ContainerID)); n != 0 {
		t.Errorf("back-off not reset by the success: %d requeues remembered", n)
	}
	if !kernelHas(t, a, p) {
		t.Error("the pod is not in the kernel after the retries")
	}
}
