package api

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"

	"github.com/meshsplice/meshsplice/istio"
)

// MemRegistry is a Registry that keeps registrations in memory and touches
// no kernel state: for tests of the API's clients, the CNI plugin above
// all. It decides Capture and Splice from the pod's annotations with
// istio.ParseTraffic and Istio's default settings, as the agent does, and
// rejects registrations whose annotations do not parse. The zero value is
// ready to use.
type MemRegistry struct {
	mu   sync.Mutex
	pods map[string]PodStatus
	// notReady is set by SetReady(false).
	notReady bool
}

var _ Registry = (*MemRegistry)(nil)
var _ HealthChecker = (*MemRegistry)(nil)

// AddPod registers or replaces a pod.
func (m *MemRegistry) AddPod(_ context.Context, req PodRegistration) (PodStatus, error) {
	if err := req.Validate(); err != nil {
		return PodStatus{}, err
	}
	t, warnings, err := istio.ParseTraffic(req.Annotations, istio.DefaultDefaults())
	if err != nil {
		return PodStatus{}, fmt.Errorf("%w: annotations: %s", ErrInvalidRequest, strings.ReplaceAll(err.Error(), "\n", "; "))
	}
	st := PodStatus{Pod: clonePod(req), Capture: t.Capture, Splice: t.Splice, Warnings: warnings}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.notReady {
		return PodStatus{}, fmt.Errorf("%w: registry switched off by SetReady(false)", ErrNotReady)
	}
	if m.pods == nil {
		m.pods = map[string]PodStatus{}
	}
	m.pods[req.ContainerID] = st
	return cloneStatus(st), nil
}

// CheckPod returns a registered pod.
func (m *MemRegistry) CheckPod(_ context.Context, containerID string) (PodStatus, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	st, ok := m.pods[containerID]
	if !ok {
		return PodStatus{}, fmt.Errorf("container %s: %w", containerID, ErrPodNotFound)
	}
	return cloneStatus(st), nil
}

// RemovePod forgets a pod; an unknown one is not an error.
func (m *MemRegistry) RemovePod(_ context.Context, containerID string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	delete(m.pods, containerID)
	return nil
}

// Health fails with ErrNotReady after SetReady(false).
func (m *MemRegistry) Health(context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.notReady {
		return fmt.Errorf("%w: registry switched off by SetReady(false)", ErrNotReady)
	}
	return nil
}

// SetReady switches the registry between ready (the default) and not
// ready, in which Health and AddPod fail with ErrNotReady.
func (m *MemRegistry) SetReady(ready bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.notReady = !ready
}

// Pod returns a registered pod and whether it is registered.
func (m *MemRegistry) Pod(containerID string) (PodStatus, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	st, ok := m.pods[containerID]
	return cloneStatus(st), ok
}

// Pods returns every registered pod, sorted by container ID.
func (m *MemRegistry) Pods() []PodStatus {
	m.mu.Lock()
	defer m.mu.Unlock()
	ids := slices.Sorted(maps.Keys(m.pods))
	out := make([]PodStatus, 0, len(ids))
	for _, id := range ids {
		out = append(out, cloneStatus(m.pods[id]))
	}
	return out
}

func clonePod(p PodRegistration) PodRegistration {
	p.IPs = slices.Clone(p.IPs)
	p.Annotations = maps.Clone(p.Annotations)
	return p
}

func cloneStatus(st PodStatus) PodStatus {
	st.Pod = clonePod(st.Pod)
	st.Warnings = slices.Clone(st.Warnings)
	return st
}
