package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"sort"
	"time"

	"github.com/meshsplice/meshsplice/agent/api"
	"github.com/meshsplice/meshsplice/istio"
)

// On Kubernetes (a config source that implements KubePods) the API server,
// not the CNI runtime, says what a pod is:
//
//   - CNI ADD: the agent looks the pod up by K8S_POD_NAMESPACE and
//     K8S_POD_NAME (the informer's cache, else a GET bounded by
//     Config.LookupTimeout) and registers it with the object's
//     annotations, labels and service account, so capture and policy are
//     in place before a container of the pod starts. An API server out of
//     reach fails the ADD as "not ready" (the plugin's agentUnreachable
//     decides whether the pod starts unmeshed).
//   - Every config: registrations whose pod object changed are updated
//     and re-programmed (so are pods registered before the agent started:
//     they are caught up at its first config); registrations whose pod
//     object is gone (or is another pod of that name, by UID) are removed
//     once they are older than Config.PodGoneGrace and a GET confirms it;
//     meshed pods of this node with an address but no registration (their
//     ADD went by while no agent ran) are listed in unregistered.json and
//     shown by `meshsplice status` as not registered: their netns is known
//     only from a CNI ADD, so they are meshed once recreated.

// DefaultPodGoneGrace: a registration younger than this is never removed
// for lack of its pod object (the informer may not have seen it yet).
const DefaultPodGoneGrace = 30 * time.Second

// DefaultLookupTimeout bounds a CNI ADD's GET of its pod.
const DefaultLookupTimeout = 5 * time.Second

// KubePods looks this node's pods up on the API server (istio.KubeSource).
type KubePods interface {
	// LookupPod returns the pod namespace/name, from the informer's cache
	// or, when the cache lacks it, a GET bounded by ctx; found is false
	// when the API server has no such pod.
	LookupPod(ctx context.Context, namespace, name string) (p istio.Pod, found bool, err error)
}

// kube is the Kubernetes pod lookup, nil in standalone mode.
func (a *Agent) kube() KubePods {
	k, _ := a.cfg.Source.(KubePods)
	return k
}

// fromAPIServer fills a registration from the pod's object (Kubernetes
// mode; a registration without a pod name is kept as it is).
func (a *Agent) fromAPIServer(ctx context.Context, req podReg) (podReg, error) {
	k := a.kube()
	if k == nil || req.PodName == "" || req.PodNamespace == "" {
		return req, nil
	}
	lctx, cancel := context.WithTimeout(ctx, a.cfg.LookupTimeout)
	defer cancel()
	kp, found, err := k.LookupPod(lctx, req.PodNamespace, req.PodName)
	switch {
	case err != nil:
		a.failedOn("lookup_pod", req.String(), err)
		return req, fmt.Errorf("%w: read pod %s from the API server: %w", api.ErrNotReady, req, err)
	case !found:
		return req, fmt.Errorf("%w: the API server has no pod %s", api.ErrInvalidRequest, req)
	case req.PodUID != "" && kp.UID != req.PodUID:
		return req, fmt.Errorf("%w: pod %s has UID %s on the API server, not %s (K8S_POD_UID)", api.ErrConflict, req, kp.UID, req.PodUID)
	}
	return withKubePod(req, kp), nil
}

// withKubePod is r with what the API server says of its pod.
func withKubePod(r podReg, kp istio.Pod) podReg {
	r.PodUID, r.ServiceAccount, r.Annotations, r.Labels = kp.UID, kp.ServiceAccount, kp.Annotations, kp.Labels
	return r
}

// UnregisteredPod is a meshed pod of this node that has no registration.
type UnregisteredPod struct {
	Namespace string       `json:"namespace"`
	Name      string       `json:"name"`
	UID       string       `json:"uid,omitempty"`
	IPs       []netip.Addr `json:"ips"`
}

func (a *Agent) unregisteredPath() string { return filepath.Join(a.cfg.StateDir, "unregistered.json") }

// syncKubePods follows this node's pod objects of config c (Kubernetes
// mode): see the top of this file. Called with a.mu held.
func (a *Agent) syncKubePods(c istio.Config) {
	if a.kube() == nil {
		return
	}
	byName := make(map[string]istio.Pod, len(c.Pods))
	for _, kp := range c.Pods {
		byName[kp.String()] = kp
	}
	registered := map[string]bool{}
	changed := false
	for id, p := range a.pods {
		if p.Recovered || p.Reg.PodName == "" || p.Reg.PodNamespace == "" {
			continue
		}
		key := p.Reg.PodNamespace + "/" + p.Reg.PodName
		kp, ok := byName[key]
		if !ok || (p.Reg.PodUID != "" && kp.UID != p.Reg.PodUID) {
			a.ctl.work.Add(prefixGone + id)
			continue
		}
		registered[key] = true
		if r := withKubePod(p.Reg, kp); !reflect.DeepEqual(r, p.Reg) {
			a.log.Info("pod object changed; programming the pod again", "pod", key)
			p.Reg = r
			a.enqueuePod(id)
			changed = true
		}
	}
	if changed {
		if err := a.saveState(); err != nil {
			a.log.Error("save registrations", "error", err)
			a.failed("save_state", err)
		}
	}
	var un []UnregisteredPod
	for _, kp := range c.Pods {
		if kp.Mesh.Meshed && len(kp.IPs) > 0 && !registered[kp.String()] {
			un = append(un, UnregisteredPod{Namespace: kp.Namespace, Name: kp.Name, UID: kp.UID, IPs: kp.IPs})
		}
	}
	if a.unregisteredSaved && reflect.DeepEqual(un, a.unregistered) {
		return
	}
	for _, u := range un {
		a.log.Warn("meshed pod without a registration: its CNI ADD did not reach the agent; recreate it to mesh it",
			"pod", u.Namespace+"/"+u.Name, "ips", u.IPs)
	}
	a.unregistered = un
	a.saveUnregistered()
}

// noteRegistered takes a pod that registered off the list of unregistered
// ones. Called with a.mu held.
func (a *Agent) noteRegistered(r podReg) {
	i := slices.IndexFunc(a.unregistered, func(u UnregisteredPod) bool {
		return u.Namespace == r.PodNamespace && u.Name == r.PodName
	})
	if i < 0 {
		return
	}
	a.unregistered = slices.Delete(slices.Clone(a.unregistered), i, i+1)
	a.saveUnregistered()
}

// saveUnregistered writes a.unregistered for `meshsplice status`. Called
// with a.mu held.
func (a *Agent) saveUnregistered() {
	b, err := json.MarshalIndent(a.unregistered, "", "  ")
	if err == nil {
		err = writeFileSync(a.unregisteredPath(), b)
	}
	a.unregisteredSaved = err == nil
	if err != nil {
		a.log.Error("save the list of unregistered pods", "error", err)
		a.failed("save_state", err)
	}
}

// checkGone removes registration id when its pod object is gone from the
// API server (or is another pod of the same name), and the registration
// is older than Config.PodGoneGrace.
func (a *Agent) checkGone(ctx context.Context, id string) error {
	k := a.kube()
	a.mu.Lock()
	p := a.pods[id]
	if p == nil || k == nil {
		a.mu.Unlock()
		return nil
	}
	reg, cookie, age := p.Reg, p.Cookie, time.Since(p.Registered)
	a.mu.Unlock()
	if wait := a.cfg.PodGoneGrace - age; wait > 0 {
		a.ctl.work.AddAfter(prefixGone+id, wait)
		return nil
	}
	lctx, cancel := context.WithTimeout(ctx, a.cfg.LookupTimeout)
	defer cancel()
	kp, found, err := k.LookupPod(lctx, reg.PodNamespace, reg.PodName)
	if err != nil {
		return fmt.Errorf("is pod %s still there: %w", reg, err)
	}
	if found && (reg.PodUID == "" || kp.UID == reg.PodUID) {
		return nil
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if p := a.pods[id]; p == nil || p.Cookie != cookie {
		return nil // unregistered or registered again meanwhile
	}
	a.log.Info("removing a registration whose pod object is gone from the API server", "pod", reg.String(),
		"uid", reg.PodUID, "netns", reg.Netns)
	if err := a.removePod(id); err != nil {
		a.failedOn("remove_pod", reg.String(), err)
		return err
	}
	return nil
}

// readUnregistered reads the agent's list of meshed pods without a
// registration (none when the file is not there: standalone mode).
func readUnregistered(stateDir string) ([]UnregisteredPod, error) {
	b, err := os.ReadFile(filepath.Join(stateDir, "unregistered.json"))
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var un []UnregisteredPod
	if err := json.Unmarshal(b, &un); err != nil {
		return nil, fmt.Errorf("%s: %w", filepath.Join(stateDir, "unregistered.json"), err)
	}
	return un, nil
}

// unregisteredReports are the status lines of pods without a
// registration.
func unregisteredReports(stateDir string) ([]PodReport, error) {
	un, err := readUnregistered(stateDir)
	out := make([]PodReport, 0, len(un))
	for _, u := range un {
		r := PodReport{Name: u.Name, Namespace: u.Namespace, IPs: u.IPs}
		why := no("not registered: the pod is meshed by Istio but its CNI ADD never reached the agent (its netns is unknown): recreate the pod to mesh it")
		r.Captured, r.Spliced, r.InboundReady, r.PolicyEnforced = why, why, why, why
		out = append(out, r)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].String() < out[j].String() })
	return out, err
}
