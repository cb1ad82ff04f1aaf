// Package apitest provides an in-memory api.Registry for tests of the agent
// API's clients, the CNI plugin above all. It is a package of its own so
// that the API package, which the CNI plugin links, stays free of the
// istio package and its dependencies.
package apitest

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"

	"github.com/meshsplice/meshsplice/agent/api"
	"github.com/meshsplice/meshsplice/istio"
)

// MemRegistry is an api.Registry that keeps registrations in memory and
// touches no kernel state. It decides Capture and Splice from the pod's annotations with
// istio.ParseTraffic and Istio's default settings, as the agent does, and
// rejects registrations whose annotations do not parse. The zero value is
// ready to use.
type MemRegistry struct {
	mu   sync.Mutex
	pods map[string]api.PodStatus
	// notReady is set by SetReady(false).
	notReady bool
}

var (
	_ api.Registry      = (*MemRegistry)(nil)
	_ api.HealthChecker = (*MemRegistry)(nil)
)

// AddPod registers or replaces a pod.
func (m *MemRegistry) AddPod(_ context.Context, req api.PodRegistration) (api.PodStatus, error) {
	if err := req.Validate(); err != nil {
		return api.PodStatus{}, err
	}
	t, warnings, err := istio.ParseTraffic(req.Annotations, istio.DefaultDefaults())
	if err != nil {
		return api.PodStatus{}, fmt.Errorf("%w: annotations: %s", api.ErrInvalidRequest, strings.ReplaceAll(err.Error(), "\n", "; "))
	}
	st := api.PodStatus{Pod: clonePod(req), Capture: t.Capture, Splice: t.Splice, Warnings: warnings}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.notReady {
		return api.PodStatus{}, fmt.Errorf("%w: registry switched off by SetReady(false)", api.ErrNotReady)
	}
	if m.pods == nil {
		m.pods = map[string]api.PodStatus{}
	}
	m.pods[req.ContainerID] = st
	return cloneStatus(st), nil
}

// CheckPod returns a registered pod.
func (m *MemRegistry) CheckPod(_ context.Context, containerID string) (api.PodStatus, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	st, ok := m.pods[containerID]
	if !ok {
		return api.PodStatus{}, fmt.Errorf("container %s: %w", containerID, api.ErrPodNotFound)
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

// Health fails with api.ErrNotReady after SetReady(false).
func (m *MemRegistry) Health(context.Context) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.notReady {
		return fmt.Errorf("%w: registry switched off by SetReady(false)", api.ErrNotReady)
	}
	return nil
}

// SetReady switches the registry between ready (the default) and not
// ready, in which Health and AddPod fail with api.ErrNotReady.
func (m *MemRegistry) SetReady(ready bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.notReady = !ready
}

// Pod returns a registered pod and whether it is registered.
func (m *MemRegistry) Pod(containerID string) (api.PodStatus, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	st, ok := m.pods[containerID]
	return cloneStatus(st), ok
}

// Pods returns every registered pod, sorted by container ID.
func (m *MemRegistry) Pods() []api.PodStatus {
	m.mu.Lock()
	defer m.mu.Unlock()
	ids := slices.Sorted(maps.Keys(m.pods))
	out := make([]api.PodStatus, 0, len(ids))
	for _, id := range ids {
		out = append(out, cloneStatus(m.pods[id]))
	}
	return out
}

func clonePod(p api.PodRegistration) api.PodRegistration {
	p.IPs = slices.Clone(p.IPs)
	p.Annotations = maps.Clone(p.Annotations)
	return p
}

func cloneStatus(st api.PodStatus) api.PodStatus {
	st.Pod = clonePod(st.Pod)
	st.Warnings = slices.Clone(st.Warnings)
	return st
}
