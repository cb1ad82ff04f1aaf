package agent

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/client-go/util/workqueue"
)

// The agent is a controller, not a lock. a.mu guards the agent's state
// (registrations, the config in force) and is held only for one pod's
// work at a time, never for the whole node:
//
//   - A change (a config, a pod's object on Kubernetes, a failure) puts
//     keys on a rate-limited work queue: "node" (the node switches),
//     "pod/ID" (re-program one registration), "gone/ID" (Kubernetes: is
//     the pod object of a registration still there?). One worker takes
//     them one by one; a failed key comes back after a back-off that
//     doubles from retryFirst to retryMax (counted:
//     meshsplice_reconcile_retries_total{what}).
//   - The policy has a queue of its own with one key, "policy": a change
//     while a compile runs marks it again, so a burst of changes is
//     compiled once, by the next run. The compile and the kernel writes
//     run without a.mu, on a copy of the inputs taken under it
//     (meshsplice_policy_compiles_total).
//   - A CNI ADD programs its pod itself (under a.mu, one pod's work), then
//     waits for the policy batch that holds the pod, without a lock and at
//     most Config.PolicyWait: a slow compile never holds a pod's start
//     back for longer than that. Until the batch lands, the pod's sidecar
//     alone enforces its policy (the kernel never denies what the sidecar
//     would allow, so nothing is refused that should not be).

// Queue keys.
const (
	keyNode   = "node"
	keyPolicy = "policy"
	prefixPod = "pod/"
	// prefixGone asks whether a registration's pod object is still on the
	// API server (kubepods.go).
	prefixGone = "gone/"
)

// Back-off of a failed key: retryFirst, doubled per failure, up to
// retryMax; a success resets it.
const (
	retryFirst = time.Second
	retryMax   = time.Minute
)

// DefaultPolicyWait bounds how long a CNI ADD waits for the policy batch
// that holds its pod.
const DefaultPolicyWait = 2 * time.Second

// controller holds the agent's work queues and what tests look into.
type controller struct {
	limiter workqueue.TypedRateLimiter[string]
	work    workqueue.TypedRateLimitingInterface[string] // node, pods
	policy  workqueue.TypedRateLimitingInterface[string] // keyPolicy only

	compiles atomic.Uint64
	retries  retryCounts

	// beforeCompile, when set (tests), runs in the policy worker after the
	// inputs are taken and before the compile: a compile that blocks there
	// plays a slow one.
	beforeCompile func()
	// failReconcile, when set (tests), fails a pod's reconcile.
	failReconcile func(id string) error
}

func newController(limiter workqueue.TypedRateLimiter[string]) *controller {
	if limiter == nil {
		limiter = workqueue.NewTypedItemExponentialFailureRateLimiter[string](retryFirst, retryMax)
	}
	cfg := func(name string) workqueue.TypedRateLimitingQueueConfig[string] {
		return workqueue.TypedRateLimitingQueueConfig[string]{Name: name}
	}
	return &controller{
		limiter: limiter,
		work:    workqueue.NewTypedRateLimitingQueueWithConfig(limiter, cfg("meshsplice-pods")),
		policy:  workqueue.NewTypedRateLimitingQueueWithConfig(limiter, cfg("meshsplice-policy")),
	}
}

// retryCounts counts requeues after failures, by kind ("node", "pod",
// "gone", "policy").
type retryCounts struct {
	node, pod, gone, policy atomic.Uint64
}

func (r *retryCounts) of(key string) *atomic.Uint64 {
	switch {
	case key == keyNode:
		return &r.node
	case key == keyPolicy:
		return &r.policy
	case strings.HasPrefix(key, prefixGone):
		return &r.gone
	default:
		return &r.pod
	}
}

func podKey(id string) string { return prefixPod + id }

// enqueuePod asks for one registration to be programmed again.
func (a *Agent) enqueuePod(id string) { a.ctl.work.Add(podKey(id)) }

// enqueueAll asks for the node switches and every registration. Called
// with a.mu held.
func (a *Agent) enqueueAll() {
	a.ctl.work.Add(keyNode)
	for id := range a.pods {
		a.enqueuePod(id)
	}
}

// policyChanged records that the policy's inputs changed and asks for a
// compile. Called with a.mu held.
func (a *Agent) policyChanged() uint64 {
	a.polGen++
	a.ctl.policy.Add(keyPolicy)
	return a.polGen
}

// runWorkers runs the pod worker and the policy worker until ctx ends.
func (a *Agent) runWorkers(ctx context.Context, wg *sync.WaitGroup) {
	go func() {
		<-ctx.Done()
		a.ctl.work.ShutDown()
		a.ctl.policy.ShutDown()
	}()
	wg.Go(func() { a.worker(ctx, a.ctl.work, a.reconcileKey) })
	wg.Go(func() { a.worker(ctx, a.ctl.policy, func(context.Context, string) error { return a.syncPolicy() }) })
}

// worker processes q's keys with handle until q shuts down; a failed key
// is put back after its back-off.
func (a *Agent) worker(ctx context.Context, q workqueue.TypedRateLimitingInterface[string], handle func(context.Context, string) error) {
	for {
		key, quit := q.Get()
		if quit {
			return
		}
		err := handle(ctx, key)
		switch {
		case err == nil:
			if q.NumRequeues(key) > 0 {
				a.log.Info("applied after a failure: the kernel follows the agent again", "what", key)
			}
			q.Forget(key)
		case ctx.Err() != nil:
		default:
			backoff := a.ctl.limiter.When(key)
			a.ctl.retries.of(key).Add(1)
			a.log.Info("applying again after a failure", "what", key, "backoff", backoff.String(), "error", err.Error())
			q.AddAfter(key, backoff)
		}
		q.Done(key)
	}
}

// reconcileKey handles one key of the pod queue.
func (a *Agent) reconcileKey(ctx context.Context, key string) error {
	switch {
	case key == keyNode:
		a.mu.Lock()
		defer a.mu.Unlock()
		if err := a.dp.SetNode(a.nodeSettings()); err != nil {
			a.log.Error("apply node switches", "error", err)
			a.failed("node", err)
			return err
		}
		return nil
	case strings.HasPrefix(key, prefixGone):
		return a.checkGone(ctx, strings.TrimPrefix(key, prefixGone))
	case strings.HasPrefix(key, prefixPod):
		return a.reconcilePod(strings.TrimPrefix(key, prefixPod))
	}
	return fmt.Errorf("unknown work queue key %q", key)
}

// reconcilePod programs one registration with the config in force.
func (a *Agent) reconcilePod(id string) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	p := a.pods[id]
	if p == nil {
		return nil // unregistered meanwhile
	}
	err := a.programPod(p)
	if err == nil && a.ctl.failReconcile != nil {
		err = a.ctl.failReconcile(id)
	}
	if err != nil {
		a.log.Error("program pod", "pod", p.Reg.String(), "error", err)
		a.failedOn("program_pod", p.Reg.String(), err)
	}
	return err
}

// syncPolicy compiles and installs the policy for the inputs of the
// moment, and tells the CNI ADDs waiting for it. It holds a.polMu
// throughout (a drift check never sees half of it), a.mu only to copy the
// inputs and to publish the result.
func (a *Agent) syncPolicy() error {
	a.polMu.Lock()
	defer a.polMu.Unlock()
	defer a.drift.soon() // check the kernel after every apply
	a.mu.Lock()
	in := a.policyInputs()
	gen := a.polGen
	a.mu.Unlock()
	a.ctl.compiles.Add(1)
	if a.ctl.beforeCompile != nil {
		a.ctl.beforeCompile()
	}
	err := a.reconcilePolicy(in)
	if err != nil {
		a.log.Error("authorization policy not applied; the kernel keeps the previous one", "error", err)
		a.failed("policy", err)
	}
	a.mu.Lock()
	if gen > a.polDone {
		a.polDone = gen
	}
	close(a.polNotify)
	a.polNotify = make(chan struct{})
	a.mu.Unlock()
	return err
}

// settledWork reports whether no pod work waits and the last policy
// change is in the kernel: only then may the kernel be compared with the
// config (a drift check).
func (a *Agent) settledWork() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.polDone >= a.polGen && a.ctl.work.Len() == 0 && a.ctl.policy.Len() == 0
}

// waitPolicy waits until a policy run that took inputs of generation gen
// or later has finished (installed or refused), at most
// Config.PolicyWait. It reports whether it did.
func (a *Agent) waitPolicy(ctx context.Context, gen uint64) bool {
	timer := time.NewTimer(a.cfg.PolicyWait)
	defer timer.Stop()
	for {
		a.mu.Lock()
		done, notify := a.polDone >= gen, a.polNotify
		a.mu.Unlock()
		if done {
			return true
		}
		select {
		case <-notify:
		case <-timer.C:
			return false
		case <-ctx.Done():
			return false
		}
	}
}

var (
	compilesDesc = prometheus.NewDesc("meshsplice_policy_compiles_total",
		"Policy compiles: one per batch of changes.", nil, nil)
	retriesDesc = prometheus.NewDesc("meshsplice_reconcile_retries_total",
		"Work queue keys applied again after a failure, by kind.", []string{"what"}, nil)
	queueDesc = prometheus.NewDesc("meshsplice_reconcile_queue_depth",
		"Keys waiting in the agent's work queues.", []string{"queue"}, nil)
)

// controllerCollector exports the controller's counters.
type controllerCollector struct{ a *Agent }

func (c controllerCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- compilesDesc
	ch <- retriesDesc
	ch <- queueDesc
}

func (c controllerCollector) Collect(ch chan<- prometheus.Metric) {
	ctl := c.a.ctl
	ch <- prometheus.MustNewConstMetric(compilesDesc, prometheus.CounterValue, float64(ctl.compiles.Load()))
	for what, n := range map[string]*atomic.Uint64{"node": &ctl.retries.node, "pod": &ctl.retries.pod,
		"gone": &ctl.retries.gone, "policy": &ctl.retries.policy} {
		ch <- prometheus.MustNewConstMetric(retriesDesc, prometheus.CounterValue, float64(n.Load()), what)
	}
	ch <- prometheus.MustNewConstMetric(queueDesc, prometheus.GaugeValue, float64(ctl.work.Len()), "pods")
	ch <- prometheus.MustNewConstMetric(queueDesc, prometheus.GaugeValue, float64(ctl.policy.Len()), "policy")
}
