package agent

import (
	"sort"
	"sync"
)

// Every failure to apply something (a pod, a policy, the node switches, a
// state file) goes through Agent.failed: it is counted by kind
// (meshsplice_apply_failures_total{what}) and handed to Config.Events. The
// caller logs it, with the context only it knows.

// EventSink receives the agent's failures and the drifts its checks find
// ("drift", drift_agent.go): on Kubernetes, KubeEvents makes them Events
// (events.go); the standalone agent leaves it nil. what is a short kind
// ("program_pod", "policy", ...); object names the pod ("namespace/name")
// when there is one. It must not block: the agent calls it holding its
// lock.
type EventSink interface {
	Failure(what, object string, err error)
}

// failureCounts counts failures by kind. Safe for concurrent use: the
// metrics collector reads it without a.mu.
type failureCounts struct {
	mu sync.Mutex
	n  map[string]uint64
}

func (f *failureCounts) add(what string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.n == nil {
		f.n = map[string]uint64{}
	}
	f.n[what]++
}

// snapshot returns the counts, sorted kinds first for stable output.
func (f *failureCounts) snapshot() ([]string, map[string]uint64) {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make(map[string]uint64, len(f.n))
	kinds := make([]string, 0, len(f.n))
	for k, v := range f.n {
		out[k] = v
		kinds = append(kinds, k)
	}
	sort.Strings(kinds)
	return kinds, out
}

// failed counts a failure to apply something and passes it on as an Event.
func (a *Agent) failed(what string, err error) { a.failedOn(what, "", err) }

// failedOn is failed for a failure about one object (a pod).
func (a *Agent) failedOn(what, object string, err error) {
	a.failures.add(what)
	if a.cfg.Events != nil {
		a.cfg.Events.Failure(what, object, err)
	}
}

// Failures returns how many failures of each kind the agent had.
func (a *Agent) Failures() map[string]uint64 {
	_, n := a.failures.snapshot()
	return n
}
