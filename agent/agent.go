// Package agent is meshsplice's node agent: it owns the datapath (loads,
// pins, reconciles), keeps the registry of meshed pods that the CNI plugin
// reports over the local API (package agent/api), follows Istio's
// configuration through an istio.Source, and serves health and Prometheus
// metrics.
//
// Pods survive agent restarts: every registration is written to the state
// directory before it reaches the kernel, and a new agent reloads it,
// re-resolves each pod against the current configuration and drops pods
// whose network namespace is gone (as it does while running, see
// registrations.go). A corrupt state file is moved aside and the pods are
// rebuilt from the kernel (statefile.go, recover.go).
//
// The agent is a controller: changes go through rate-limited work queues,
// one pod at a time, and the policy is compiled once per batch outside the
// agent's lock (controller.go). On Kubernetes the API server says what a
// registered pod is, and registrations follow its pod objects
// (kubepods.go).
//
// Every failure to apply something is logged, counted and passed to
// Config.Events (failures.go), and applied again with back-off
// (controller.go); kernel tables at their limit are watched in pressure.go.
package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"sync"
	"time"

	"github.com/meshsplice/meshsplice/agent/api"
	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/istio"
	"github.com/meshsplice/meshsplice/policy"
	"github.com/meshsplice/meshsplice/redirect"
)

// DefaultMetricsAddr is where the agent serves /healthz, /readyz and
// /metrics unless told otherwise.
const DefaultMetricsAddr = "127.0.0.1:15299"

// DefaultStateDir keeps the agent's pod registrations across restarts.
const DefaultStateDir = "/run/meshsplice"

// Config configures an Agent.
type Config struct {
	PinDir     string // bpffs directory (datapath.DefaultPinDir)
	CgroupPath string // cgroup v2 directory the programs attach to
	CNISocket  string // unix socket of the CNI API (api.DefaultSocket)
	StateDir   string // where registrations are kept (DefaultStateDir)
	// MetricsAddr serves /healthz, /readyz and /metrics; "" disables.
	MetricsAddr string
	// Node overrides: a node switch is on only if the agent's flag AND the
	// mesh-wide meshsplice ConfigMap say so.
	NodeCapture, NodeSplice bool
	// NodeAppSpliceOff keeps app sockets out of splicing on this node
	// (agent --app-splice=false), whatever the pods and the ConfigMap say.
	NodeAppSpliceOff bool
	Source           istio.Source
	Log              *slog.Logger
	// PressureInterval is how often full kernel tables are looked for
	// (DefaultPressureInterval when zero).
	PressureInterval time.Duration
	// Events receives every failure to apply something (Kubernetes
	// Events); nil: logs and metrics only.
	Events EventSink
	// ListenerGrace is how long a captured pod may go without its
	// sidecar's inbound listener in the kernel before the agent warns
	// (DefaultListenerGrace when zero).
	ListenerGrace time.Duration
	// CNIUID may use the CNI API besides root (0: root only).
	CNIUID int
	// PolicyWait bounds how long a CNI ADD waits for the policy batch
	// that holds its pod (DefaultPolicyWait when zero; controller.go).
	PolicyWait time.Duration
	// PodGoneGrace: on Kubernetes, a registration whose pod object the
	// API server does not have is removed once it is this old
	// (DefaultPodGoneGrace when zero; kubepods.go).
	PodGoneGrace time.Duration
	// LookupTimeout bounds a CNI ADD's direct GET of its pod when the
	// informer's cache has not seen it yet (DefaultLookupTimeout when
	// zero).
	LookupTimeout time.Duration
	// DriftInterval is how often the kernel is compared with the config
	// besides after each apply (DefaultDriftInterval when zero).
	DriftInterval time.Duration
}

// Agent is a running node agent.
type Agent struct {
	cfg Config
	log *slog.Logger
	dp  *datapath.Datapath

	// mu guards the agent's state; kernel work under it is one pod's at
	// a time (controller.go).
	mu     sync.Mutex
	pods   map[string]*pod // by container ID
	istio  istio.Config
	ids    *policy.Allocator // workload identities, stable across restarts
	policy policy.Result     // the last compiled policy
	ready  bool
	loaded chan struct{} // closed once the first Istio config arrived

	ctl *controller
	// polMu is held by the policy worker for a whole compile and install
	// (and by a drift check); a.applied is the policy the kernel holds.
	polMu   sync.Mutex
	applied datapath.Policy
	// polGen counts changes of the policy's inputs; polDone is the
	// newest generation a finished policy run took; polNotify is closed
	// (and replaced) at the end of every run.
	polGen, polDone uint64
	polNotify       chan struct{}
	// unregistered are this node's meshed pods that have no
	// registration (Kubernetes; kubepods.go).
	unregistered      []UnregisteredPod
	unregisteredSaved bool // unregistered.json holds a.unregistered
	// identitiesLost: identities.json was corrupt; numbering restarts
	// above the kernel's numbers (loadState).
	identitiesLost bool
	failures       failureCounts
	pressure       pressureState
	drift          driftState // drift checks (drift_agent.go)
}

// podReg is a pod's registration, as the CNI plugin sent it.
type podReg = api.PodRegistration

type pod struct {
	Reg    api.PodRegistration `json:"registration"`
	Cookie uint64              `json:"netns_cookie"`
	// AddedLoV6: the agent added ::6/128 to the pod's lo (it was not
	// there), so removing the pod removes it again.
	AddedLoV6 bool `json:"added_lo_v6,omitempty"`
	// Registered is when the pod was registered (or reloaded by an agent
	// that found no time): the inbound listener's grace period starts here.
	Registered time.Time `json:"registered"`
	// Recovered: rebuilt from the kernel after pods.json was lost
	// (recoverPods). Its kernel settings are kept as they are (its
	// annotations are unknown) and it takes no part in kernel policy, until
	// the CNI plugin registers its netns again or the netns goes.
	Recovered bool          `json:"recovered,omitempty"`
	Traffic   istio.Traffic `json:"-"`
	Warnings  []string      `json:"-"`
	inbound   inboundState
}

// Run starts the agent and blocks until ctx ends. The datapath stays
// attached when it returns: traffic keeps flowing without the agent.
func Run(ctx context.Context, cfg Config) error {
	a, err := New(cfg)
	if err != nil {
		return err
	}
	defer a.Close()
	return a.Serve(ctx)
}

// New opens the datapath and reloads the saved registrations, but does not
// serve yet.
func New(cfg Config) (*Agent, error) {
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.CNISocket == "" {
		cfg.CNISocket = api.DefaultSocket
	}
	if cfg.StateDir == "" {
		cfg.StateDir = DefaultStateDir
	}
	if cfg.ListenerGrace <= 0 {
		cfg.ListenerGrace = DefaultListenerGrace
	}
	if cfg.PressureInterval <= 0 {
		cfg.PressureInterval = DefaultPressureInterval
	}
	if cfg.PolicyWait <= 0 {
		cfg.PolicyWait = DefaultPolicyWait
	}
	if cfg.PodGoneGrace <= 0 {
		cfg.PodGoneGrace = DefaultPodGoneGrace
	}
	if cfg.LookupTimeout <= 0 {
		cfg.LookupTimeout = DefaultLookupTimeout
	}
	if cfg.Source == nil {
		return nil, errors.New("agent: no Istio config source")
	}
	// Created now, not at the first pod: a wrong path fails at start.
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("state dir: %w", err)
	}
	dp, err := datapath.Open(datapath.Options{
		PinDir: cfg.PinDir, CgroupPath: cfg.CgroupPath, Logger: cfg.Log,
		Node: datapath.NodeSettings{Capture: cfg.NodeCapture, Splice: cfg.NodeSplice, AppSpliceOff: cfg.NodeAppSpliceOff},
	})
	if err != nil {
		return nil, err
	}
	a := &Agent{cfg: cfg, log: cfg.Log, dp: dp, pods: map[string]*pod{}, loaded: make(chan struct{}),
		ctl: newController(nil), polNotify: make(chan struct{}),
		istio: istio.Config{Mesh: istio.DefaultMeshConfig(), Node: istio.NodeSwitches{Capture: true, Splice: true}}}
	if err := a.loadIdentities(); err != nil {
		dp.Close()
		return nil, err
	}
	if err := a.loadState(); err != nil {
		dp.Close()
		return nil, err
	}
	return a, nil
}

// Datapath gives access to the kernel side (status, tests).
func (a *Agent) Datapath() *datapath.Datapath { return a.dp }

// Close releases the datapath handles; the datapath stays attached.
func (a *Agent) Close() error { return a.dp.Close() }

// Serve runs the config source, the CNI API and the metrics server until ctx
// ends. When it returns, nothing it started writes to the kernel any more.
func (a *Agent) Serve(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() {
		cancel()
		wg.Wait()
	}()
	errc := make(chan error, 3)
	updates := make(chan istio.Config)
	go func() { errc <- a.cfg.Source.Run(ctx, updates) }()
	wg.Go(func() { a.sweepLoop(ctx) })
	wg.Go(func() { a.pressureLoop(ctx, a.cfg.PressureInterval) })
	a.runWorkers(ctx, &wg)
	wg.Go(func() { a.driftLoop(ctx) })
	wg.Go(func() {
		for {
			select {
			case <-ctx.Done():
				return
			case c := <-updates:
				a.applyConfig(c)
			}
		}
	})
	// Register pods only once the configuration is known: the defaults
	// (ports, interception mode) come from it.
	select {
	case <-a.loaded:
	case err := <-errc:
		return fmt.Errorf("istio config: %w", err)
	case <-ctx.Done():
		a.logStopping(ctx)
		return nil
	}

	apiSrv, err := api.Listen(a.cfg.CNISocket, a, a.log, api.AllowUID(a.cfg.CNIUID))
	if err != nil {
		return err
	}
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		apiSrv.Shutdown(sctx)
	}()
	go func() { errc <- apiSrv.Serve() }()

	if a.cfg.MetricsAddr != "" {
		mln, err := net.Listen("tcp", a.cfg.MetricsAddr)
		if err != nil {
			return fmt.Errorf("listen on %s: %w", a.cfg.MetricsAddr, err)
		}
		msrv := &http.Server{Handler: a.metricsHandler(), ReadHeaderTimeout: 5 * time.Second}
		go func() { errc <- serveUntil(ctx, msrv, mln) }()
	}
	wg.Go(func() {
		tick := time.NewTicker(max(a.cfg.ListenerGrace/4, 100*time.Millisecond))
		defer tick.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case now := <-tick.C:
				a.checkListeners(now)
			}
		}
	})
	a.mu.Lock()
	a.ready = true
	npods := len(a.pods)
	a.mu.Unlock()
	a.log.Info("agent ready", "cni_socket", a.cfg.CNISocket, "metrics", a.cfg.MetricsAddr, "pods", npods)
	select {
	case <-ctx.Done():
		a.logStopping(ctx)
		return nil
	case err := <-errc:
		return err
	}
}

// logStopping says that the agent stops and what keeps running without it.
func (a *Agent) logStopping(ctx context.Context) {
	reason := "stopped"
	if cause := context.Cause(ctx); cause != nil {
		reason = cause.Error()
	}
	a.log.Info("agent stopping; the datapath stays attached and pinned: live and new connections of registered pods keep being captured and spliced, but a sidecar that starts listening before the next agent runs refuses inbound connections until then",
		"reason", reason, "pin_dir", a.dp.PinDir(), "cgroup", a.cfg.CgroupPath)
}

func serveUntil(ctx context.Context, srv *http.Server, ln net.Listener) error {
	go func() {
		<-ctx.Done()
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
	}()
	if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// applyConfig makes the kernel follow a new Istio configuration: it puts
// on the work queue what the change touches (controller.go): the node
// switches and every pod when the defaults pods are resolved against
// changed, the pods whose Kubernetes object changed, and the policy.
func (a *Agent) applyConfig(c istio.Config) {
	a.mu.Lock()
	defer a.mu.Unlock()
	old, first := a.istio, !a.isLoaded()
	a.istio = c
	// Never re-program a pod whose netns is gone: it may hold an address
	// that belongs to a new pod now.
	a.forgetGone()
	if first || !reflect.DeepEqual(old.Defaults(), c.Defaults()) || old.Node != c.Node || old.TrustDomain() != c.TrustDomain() {
		a.enqueueAll()
	}
	a.syncKubePods(c)
	a.policyChanged()
	a.log.Info("istio config applied", "node", a.nodeSettings(), "pods", len(a.pods),
		"authorization_policies", len(c.AuthorizationPolicies), "sources", c.Sources)
	select {
	case <-a.loaded:
	default:
		close(a.loaded)
	}
}

func (a *Agent) isLoaded() bool {
	select {
	case <-a.loaded:
		return true
	default:
		return false
	}
}

// programPod resolves a pod's settings and writes them to the kernel.
// Called with a.mu held.
func (a *Agent) programPod(p *pod) error {
	if p.Recovered {
		return nil // its annotations are unknown: the kernel keeps its settings
	}
	tr, warnings, err := istio.ParseTraffic(p.Reg.Annotations, a.podDefaults())
	if err != nil {
		return fmt.Errorf("%w: pod %s: %w", api.ErrInvalidRequest, p.Reg, err)
	}
	tr, other := istio.ForRevision(tr, p.Reg.Annotations, p.Reg.Labels, a.istio.Revision)
	if other != "" {
		warnings = append(warnings, other+": not captured, spliced or enforced here")
	}
	p.Traffic, p.Warnings = tr, warnings
	if tr.Capture {
		added, err := redirect.AddPassthroughV6(p.Reg.Netns)
		if err != nil {
			return err
		}
		if added && !p.AddedLoV6 {
			p.AddedLoV6 = true
			if err := a.saveState(); err != nil {
				return err
			}
		}
	}
	return a.dp.AddPod(datapath.Pod{NetnsPath: p.Reg.Netns, Cookie: p.Cookie, IPs: p.Reg.IPs, Traffic: tr,
		Identity: a.podIdentity(p)})
}

// AddPod implements api.Registry. On Kubernetes the pod's annotations,
// labels and service account come from the API server (kubepods.go). The
// pod is programmed before AddPod returns; its policy batch is waited for
// at most Config.PolicyWait (controller.go).
func (a *Agent) AddPod(ctx context.Context, req api.PodRegistration) (api.PodStatus, error) {
	cookie, err := datapath.NetnsCookie(req.Netns)
	if err != nil {
		return api.PodStatus{}, fmt.Errorf("%w: netns: %w", api.ErrInvalidRequest, err)
	}
	if err := checkPodNetns(req, cookie); err != nil {
		return api.PodStatus{}, err
	}
	if req, err = a.fromAPIServer(ctx, req); err != nil {
		return api.PodStatus{}, err
	}
	p, gen, err := a.addPod(req, cookie)
	if err != nil {
		return api.PodStatus{}, err
	}
	if !a.waitPolicy(ctx, gen) {
		a.log.Info("pod registered before its policy batch landed; its sidecar enforces meanwhile", "pod", req.String(),
			"policy_wait", a.cfg.PolicyWait.String())
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.statusOf(p), nil
}

// addPod registers and programs a pod, and asks for its policy batch,
// whose generation it returns.
func (a *Agent) addPod(req api.PodRegistration, cookie uint64) (*pod, uint64, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	// A registration rebuilt from the kernel (recoverPods) gives way to
	// the real one of its netns, and comes back if that one fails.
	recovered, recoveredID := a.adoptRecovered(req.ContainerID, cookie)
	undo := func(prev *pod) {
		if recovered != nil && prev == recovered {
			delete(a.pods, req.ContainerID)
			a.pods[recoveredID] = recovered
			return
		}
		a.restore(req.ContainerID, prev)
		if recovered != nil {
			a.pods[recoveredID] = recovered
		}
	}
	for id, other := range a.pods {
		if id != req.ContainerID && other.Cookie == cookie {
			undo(a.pods[req.ContainerID])
			return nil, 0, fmt.Errorf("%w: netns %s is registered already for %s", api.ErrConflict, req.Netns, other.Reg)
		}
	}
	p := &pod{Reg: req, Cookie: cookie, Registered: time.Now()}
	if _, _, err := istio.ParseTraffic(req.Annotations, a.podDefaults()); err != nil {
		undo(a.pods[req.ContainerID])
		return nil, 0, fmt.Errorf("%w: pod %s: %w", api.ErrInvalidRequest, req, err)
	}
	claimWarnings, err := a.settleIPClaims(req.ContainerID, p)
	if err != nil {
		undo(a.pods[req.ContainerID])
		return nil, 0, err
	}
	prev := a.pods[req.ContainerID]
	if prev == nil {
		prev = recovered
	}
	if prev != nil && prev.Cookie == cookie {
		p.AddedLoV6, p.Registered = prev.AddedLoV6, prev.Registered
	}
	a.pods[req.ContainerID] = p
	if err := a.saveState(); err != nil {
		undo(prev)
		a.failedOn("save_state", req.String(), err)
		return nil, 0, err
	}
	if err := a.replacePod(prev, p); err != nil {
		undo(prev)
		a.failedOn("program_pod", req.String(), err)
		if serr := a.saveState(); serr != nil {
			a.log.Error("save registrations after a failed registration", "pod", req.String(), "error", serr)
			a.failed("save_state", serr)
		}
		return nil, 0, err
	}
	p.Warnings = append(p.Warnings, claimWarnings...)
	for _, w := range p.Warnings {
		a.log.Warn("pod settings", "pod", req.String(), "warning", w)
	}
	a.noteRegistered(req)
	// The pod's own policy set and its identity as a source.
	return p, a.policyChanged(), nil
}

// replacePod programs p in place of the previous registration of its
// container ID (nil: none). The datapath rolls a failed registration back,
// so on error the previous one is still in force. A container registered
// again with another netns (its sandbox re-created) leaves nothing of the
// old netns behind; the old one goes first, as both claim the same
// addresses, and comes back if p fails. Called with a.mu held.
func (a *Agent) replacePod(prev, p *pod) error {
	if prev == nil || prev.Cookie == p.Cookie {
		return a.programPod(p)
	}
	if err := a.dp.RemovePod(prev.Cookie); err != nil {
		return fmt.Errorf("forget the previous netns of %s: %w", p.Reg, err)
	}
	err := a.programPod(p)
	if err != nil {
		if rerr := a.programPod(prev); rerr != nil {
			a.log.Error("restore the previous registration", "pod", prev.Reg.String(), "error", rerr)
			a.failedOn("program_pod", prev.Reg.String(), rerr)
			a.ctl.work.AddRateLimited(podKey(prev.Reg.ContainerID))
		}
	}
	return err
}

func (a *Agent) restore(id string, prev *pod) {
	if prev == nil {
		delete(a.pods, id)
	} else {
		a.pods[id] = prev
	}
}

// CheckPod implements api.Registry: the pod is known and the kernel holds it.
func (a *Agent) CheckPod(_ context.Context, containerID string) (api.PodStatus, error) {
	a.mu.Lock()
	p, ok := a.pods[containerID]
	a.mu.Unlock()
	if !ok {
		return api.PodStatus{}, fmt.Errorf("%w: %s", api.ErrPodNotFound, containerID)
	}
	pods, err := a.dp.Pods()
	if err != nil {
		return api.PodStatus{}, err
	}
	for _, kp := range pods {
		if kp.Cookie == p.Cookie {
			a.mu.Lock()
			defer a.mu.Unlock()
			return a.statusOf(p), nil
		}
	}
	return api.PodStatus{}, fmt.Errorf("%w: %s is registered but missing from the kernel tables", api.ErrConflict, p.Reg)
}

// RemovePod implements api.Registry; unknown pods are not an error.
func (a *Agent) RemovePod(_ context.Context, containerID string) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.removePod(containerID)
}

// removePod unregisters a container. Called with a.mu held.
func (a *Agent) removePod(containerID string) error {
	p, ok := a.pods[containerID]
	if !ok {
		return nil
	}
	if err := a.dp.RemovePod(p.Cookie); err != nil {
		return err
	}
	delete(a.pods, containerID)
	if p.AddedLoV6 {
		if err := redirect.RemovePassthroughV6(p.Reg.Netns); err != nil {
			// The pod is going: a stray address must not block its removal.
			a.log.Warn("pod unregistered, but ::6 stays on its lo", "pod", p.Reg.String(), "error", err)
			a.failedOn("remove_passthrough_v6", p.Reg.String(), err)
		}
	}
	a.log.Info("pod unregistered", "pod", p.Reg.String())
	a.policyChanged()
	return a.saveState()
}

// Health implements api.HealthChecker.
func (a *Agent) Health(context.Context) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if !a.ready {
		return fmt.Errorf("%w: waiting for the Istio configuration", api.ErrNotReady)
	}
	return nil
}

// Pods returns the registered pods, sorted by container ID.
func (a *Agent) Pods() []api.PodStatus {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make([]api.PodStatus, 0, len(a.pods))
	kernel, err := a.dp.PodPolicies()
	for _, p := range a.pods {
		out = append(out, a.statusWith(p, kernel, err))
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Pod.ContainerID < out[j].Pod.ContainerID })
	return out
}

// statusOf is a pod's status, its policy included. Called with a.mu held.
func (a *Agent) statusOf(p *pod) api.PodStatus {
	kernel, err := a.dp.PodPolicies()
	return a.statusWith(p, kernel, err)
}

// statusWith is statusOf with the kernel's policy tables read already.
func (a *Agent) statusWith(p *pod, kernel map[uint64]datapath.PodPolicy, err error) api.PodStatus {
	st := api.PodStatus{Pod: p.Reg, Capture: p.Traffic.Capture, Splice: p.Traffic.Splice, Mode: PodMode(p.Traffic), Warnings: p.Warnings}
	if p.inbound.known {
		ready := p.inbound.ready
		st.InboundReady, st.InboundReason = &ready, p.inbound.reason
	}
	if err != nil {
		st.Policy = &api.PolicyStatus{Reason: "cannot read the kernel's policy tables: " + err.Error()}
	} else {
		st.Policy = a.podPolicy(p, kernel)
	}
	return st
}

func (a *Agent) statePath() string { return filepath.Join(a.cfg.StateDir, "pods.json") }

// saveState writes the registrations atomically and durably (statefile.go).
// Called with a.mu held.
func (a *Agent) saveState() error {
	if err := os.MkdirAll(a.cfg.StateDir, 0o700); err != nil {
		return fmt.Errorf("state dir: %w", err)
	}
	var list []*pod
	for _, p := range a.pods {
		list = append(list, p)
	}
	sort.Slice(list, func(i, j int) bool { return list[i].Reg.ContainerID < list[j].Reg.ContainerID })
	b, err := json.MarshalIndent(list, "", "  ")
	if err != nil {
		return err
	}
	if err := writeFileSync(a.statePath(), b); err != nil {
		return fmt.Errorf("save pods: %w", err)
	}
	return nil
}

// loadState reloads registrations of an earlier agent. A pod whose netns is
// gone, or now has another cookie, is dropped (and removed from the
// kernel); kernel pods nobody registered are removed too. A corrupt
// pods.json is moved aside and the pods are rebuilt from the kernel
// (recoverPods): a lost file must not un-mesh live pods.
func (a *Agent) loadState() error {
	list, err := readPods(a.statePath())
	corrupt := errors.Is(err, errCorrupt)
	if corrupt {
		aside, qerr := quarantine(a.statePath())
		if qerr != nil {
			return fmt.Errorf("load pods: %w (%w)", err, qerr)
		}
		a.log.Error("pod registrations unreadable; moved aside, rebuilding them from the kernel",
			"error", err, "moved_to", aside)
		a.failed("load_state", err)
	} else if err != nil {
		return fmt.Errorf("load pods: %w", err)
	}
	keep := map[uint64]bool{}
	for _, p := range list {
		if c, err := datapath.NetnsCookie(p.Reg.Netns); err != nil || c != p.Cookie {
			a.log.Info("dropping pod whose netns is gone", "pod", p.Reg.String(), "netns", p.Reg.Netns)
			if err := a.dp.RemovePod(p.Cookie); err != nil {
				a.log.Error("remove a gone pod from the kernel", "pod", p.Reg.String(), "error", err)
				a.failed("remove_pod", err)
			}
			continue
		}
		if p.Registered.IsZero() {
			p.Registered = time.Now()
		}
		a.pods[p.Reg.ContainerID] = p
		keep[p.Cookie] = true
	}
	kernel, err := a.dp.Pods()
	if err != nil {
		return err
	}
	if corrupt {
		if err := a.recoverPods(kernel, keep); err != nil {
			return err
		}
	}
	if a.identitiesLost {
		if err := identityFloor(a.ids, kernel); err != nil {
			return fmt.Errorf("identities: %w", err)
		}
	}
	for _, kp := range kernel {
		if !keep[kp.Cookie] {
			a.log.Info("removing a kernel pod no registration knows", "netns_cookie", kp.Cookie)
			if err := a.dp.RemovePod(kp.Cookie); err != nil {
				a.log.Error("remove a kernel pod no registration knows", "netns_cookie", kp.Cookie, "error", err)
				a.failed("remove_pod", err)
			}
		}
	}
	// Programmed with the current config once it arrives (applyConfig).
	return nil
}
