package agent

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/meshsplice/meshsplice/agent/api"
	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/istio"
)

// `meshsplice status` works without the agent: it reads the kernel (pins)
// and the agent's state directory, and explains each pod from both.

// Verdict is a yes/no answer about a pod with the reason for it. State is
// "yes", "no", "n/a" (does not apply: e.g. inbound readiness of a pod that
// is not captured) or "unknown" (Reason says what could not be read).
type Verdict struct {
	State  string `json:"state"`
	Reason string `json:"reason"`
}

func yes(format string, args ...any) Verdict { return Verdict{"yes", fmt.Sprintf(format, args...)} }
func no(format string, args ...any) Verdict  { return Verdict{"no", fmt.Sprintf(format, args...)} }
func unknown(format string, args ...any) Verdict {
	return Verdict{"unknown", fmt.Sprintf(format, args...)}
}

// PodReport is one pod as `meshsplice status` shows it. Cookie, IPs,
// Traffic and Identity keep the names of datapath.Pod, so a datapath.Status
// decodes the pods of `status --json` too.
type PodReport struct {
	Name        string       `json:"name,omitempty"`
	Namespace   string       `json:"namespace,omitempty"`
	ContainerID string       `json:"container_id,omitempty"`
	Netns       string       `json:"netns,omitempty"` // path; empty when the agent's state does not know the pod
	Cookie      uint64       `json:"cookie"`
	IPs         []netip.Addr `json:"ips"`
	Identity    uint32       `json:"identity"`
	Registered  *time.Time   `json:"registered,omitempty"`
	// InKernel is false for a pod the agent registered that the kernel
	// tables lack.
	InKernel bool `json:"in_kernel"`
	// Mode is who captures the pod, from the kernel's entry:
	// istio.ModeMeshsplice, istio.ModeIPTables (Istio's own iptables;
	// meshsplice splices its sidecar only) or istio.ModeOff.
	Mode           string        `json:"mode,omitempty"`
	Captured       Verdict       `json:"captured"`
	Spliced        Verdict       `json:"spliced"`
	InboundReady   Verdict       `json:"inbound_ready"`
	PolicyEnforced Verdict       `json:"policy_enforced"`
	Traffic        istio.Traffic `json:"traffic"`
}

// String is "namespace/name", or what else identifies the pod.
func (r PodReport) String() string {
	if r.Name == "" && r.ContainerID == "" {
		return fmt.Sprintf("netns cookie %d", r.Cookie)
	}
	return api.PodRegistration{PodName: r.Name, PodNamespace: r.Namespace, ContainerID: r.ContainerID}.String()
}

// ReportPods explains every pod of the kernel's status and of the agent's
// state directory. It returns an error, with reports made from the kernel
// alone, when the state cannot be read.
func ReportPods(st *datapath.Status, stateDir string) ([]PodReport, error) {
	if stateDir == "" {
		stateDir = DefaultStateDir
	}
	regs, stateErr := readPods(filepath.Join(stateDir, "pods.json"))
	byCookie := map[uint64]*pod{}
	for _, p := range regs {
		byCookie[p.Cookie] = p
	}
	cgroup := st.Cgroup()
	var out []PodReport
	for _, kp := range st.Pods {
		reg := byCookie[kp.Cookie]
		delete(byCookie, kp.Cookie)
		out = append(out, reportPod(st, kp, reg, stateErr, cgroup))
	}
	if len(byCookie) == len(regs) && len(regs) > 0 {
		// Not one pod in common: this state is not this datapath's agent's.
		stateErr = errors.Join(stateErr, fmt.Errorf("the agent state in %s knows %d pods, none of them in the kernel tables of %s: is it the state dir of the agent that uses this pin dir? (--state-dir)", stateDir, len(regs), st.PinDir))
		byCookie = nil
	}
	for _, reg := range byCookie {
		r := PodReport{Name: reg.Reg.PodName, Namespace: reg.Reg.PodNamespace, ContainerID: reg.Reg.ContainerID,
			Netns: reg.Reg.Netns, Cookie: reg.Cookie, IPs: reg.Reg.IPs}
		if !reg.Registered.IsZero() {
			r.Registered = &reg.Registered
		}
		why := unknown("registered with the agent (%s) but not in the kernel tables: the agent drops it at its next start if its netns is gone, else re-registers it", stateDir)
		r.Captured, r.Spliced, r.InboundReady, r.PolicyEnforced = why, why, why, why
		out = append(out, r)
	}
	un, unErr := unregisteredReports(stateDir)
	out = append(out, un...)
	stateErr = errors.Join(stateErr, unErr)
	sort.Slice(out, func(i, j int) bool {
		if a, b := out[i].String(), out[j].String(); a != b {
			return a < b
		}
		return out[i].Cookie < out[j].Cookie
	})
	if stateErr != nil {
		return out, fmt.Errorf("agent state: %w", stateErr)
	}
	return out, nil
}

func readPods(path string) ([]*pod, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var list []*pod
	if err := json.Unmarshal(b, &list); err != nil {
		return nil, fmt.Errorf("%w %s: %w", errCorrupt, path, err)
	}
	for _, p := range list {
		if p == nil || p.Reg.ContainerID == "" || p.Cookie == 0 {
			return nil, fmt.Errorf("%w %s: an entry without container ID or netns cookie", errCorrupt, path)
		}
	}
	return list, nil
}

func reportPod(st *datapath.Status, kp datapath.Pod, reg *pod, stateErr error, cgroup string) PodReport {
	r := PodReport{Cookie: kp.Cookie, IPs: kp.IPs, Identity: kp.Identity, Traffic: kp.Traffic, InKernel: true}
	var ann map[string]string
	if reg != nil {
		r.Name, r.Namespace, r.ContainerID, r.Netns = reg.Reg.PodName, reg.Reg.PodNamespace, reg.Reg.ContainerID, reg.Reg.Netns
		if !reg.Registered.IsZero() {
			r.Registered = &reg.Registered
		}
		ann = reg.Reg.Annotations
		if ann == nil {
			ann = map[string]string{}
		}
	}
	noState := "the agent's state does not know this pod"
	if stateErr != nil {
		noState = "the agent's state cannot be read: " + stateErr.Error()
	}
	t := kp.Traffic
	k := st.PodKernel[kp.Cookie]
	r.Mode = PodMode(t)

	switch {
	case t.IPTables:
		r.Captured = no("Istio's own iptables capture the pod (%s, or pod annotation %s: iptables): meshsplice never captures it twice", istio.InitContainer, istio.AnnotationCapture)
	case t.Capture && st.Node.Capture:
		r.Captured = yes("connections from the pod go to its sidecar (%d) and connections to it to its inbound listener (%d)", t.OutboundPort, t.InboundPort)
	case t.Capture:
		r.Captured = no("node switch: capture is off (agent --capture=false or the meshsplice ConfigMap)")
	case ann == nil:
		r.Captured = no("the kernel's entry for the pod has capture off; why is unknown: %s", noState)
	default:
		r.Captured = no("%s", captureOffReason(ann, reg.Reg.Labels))
	}

	switch {
	case r.Captured.State != "yes" && !t.IPTables:
		r.Spliced = no("not captured")
	case !st.Node.Splice:
		r.Spliced = no("node switch: splice is off (agent --splice=false or the meshsplice ConfigMap)")
	case !t.Splice && ann != nil && strings.TrimSpace(ann[istio.AnnotationSplice]) == "disabled":
		r.Spliced = no("pod annotation %s: disabled", istio.AnnotationSplice)
	case !t.Splice:
		r.Spliced = no("the kernel's entry for the pod has splice off")
	case t.IPTables:
		r.Spliced = yes("sidecar <-> sidecar with pods on this node, through Istio's REDIRECT; app <-> sidecar stays TCP (iptables NAT)")
	default:
		r.Spliced = yes("sidecar <-> sidecar with pods on this node%s", appSpliceReason(t, ann, st))
	}

	switch {
	case t.IPTables:
		r.InboundReady = Verdict{"n/a", "Istio's iptables hand inbound connections to the sidecar"}
	case r.Captured.State != "yes":
		r.InboundReady = Verdict{"n/a", "not captured: inbound connections go to the pod's own listeners"}
	case k.ListenerReady == nil:
		r.InboundReady = unknown("cannot read the kernel's listener table: %v", k.ListenerErr)
	case *k.ListenerReady:
		r.InboundReady = yes("the sidecar's inbound listener (%d) is in the kernel's table", t.InboundPort)
	case r.Netns == "":
		r.InboundReady = no("the sidecar's inbound listener (%d) is not in the kernel's table: inbound connections are refused (%s, so its sockets cannot be checked)", t.InboundPort, noState)
	default:
		why := MissingListenerReason(r.Netns, t.InboundPort, cgroup)
		if r.Registered != nil {
			why += fmt.Sprintf("; registered %s ago", time.Since(*r.Registered).Round(time.Second))
		}
		r.InboundReady = no("inbound connections are refused: %s", why)
	}
	r.PolicyEnforced = PolicyEnforced(k)
	return r
}

// PodMode is who captures a pod with these settings (istio.ModeMeshsplice,
// istio.ModeIPTables or istio.ModeOff).
func PodMode(t istio.Traffic) string {
	switch {
	case t.Capture:
		return istio.ModeMeshsplice
	case t.IPTables:
		return istio.ModeIPTables
	}
	return istio.ModeOff
}

// captureOffReason says why a pod's annotations leave it uncaptured, in
// istio.ParseTraffic's order.
func captureOffReason(ann, labels map[string]string) string {
	if _, injected := ann[istio.AnnotationStatus]; !injected {
		return fmt.Sprintf("not injected: no %s annotation (no sidecar)", istio.AnnotationStatus)
	}
	if v := strings.TrimSpace(ann[istio.AnnotationInject]); v == "false" {
		return fmt.Sprintf("pod annotation %s: %s", istio.AnnotationInject, v)
	}
	if v := strings.TrimSpace(ann[istio.AnnotationInterceptionMode]); v == "NONE" {
		return fmt.Sprintf("pod annotation %s: NONE", istio.AnnotationInterceptionMode)
	}
	if v := strings.TrimSpace(ann[istio.AnnotationCapture]); v == "disabled" {
		return fmt.Sprintf("pod annotation %s: disabled", istio.AnnotationCapture)
	}
	if _, _, err := istio.ParseTraffic(ann, istio.DefaultDefaults()); err != nil {
		return fmt.Sprintf("invalid pod annotations: %v", err)
	}
	return fmt.Sprintf("the agent follows another Istio revision than the pod's (%q; agent --revision), or the mesh config's default interception mode is NONE",
		istio.PodRevision(ann, labels))
}

// PolicyEnforced says whether the kernel enforces AuthorizationPolicy for
// the pod, from datapath.ReadPodPolicies: the one place that decides how
// policy relates to capture (it stays on with capture off).
func PolicyEnforced(k datapath.PodKernel) Verdict {
	if k.Policy == nil {
		return unknown("cannot read the kernel's policy tables: %v", k.PolicyErr)
	}
	if !k.Policy.Enforced {
		return no("%s", k.Policy.Reason)
	}
	if k.Policy.Reason != "" {
		return yes("policy set %d: %s", k.Policy.PolicySet, k.Policy.Reason)
	}
	return yes("policy set %d: the kernel judges connections to the pod (RST) and peers' connects to it (EPERM)", k.Policy.PolicySet)
}

// appSpliceReason says whether and why the pod's app <-> sidecar hops are
// spliced: its annotation, the node's default (docs/readers.md) or the
// node switch.
func appSpliceReason(t istio.Traffic, ann map[string]string, st *datapath.Status) string {
	v, set := ann[istio.AnnotationAppSplice]
	why := "the node's default: splice(2) reads of spliced sockets are refused here, so app sockets are safe to splice"
	if set {
		why = fmt.Sprintf("pod annotation %s: %s", istio.AnnotationAppSplice, strings.TrimSpace(v))
	}
	switch {
	case t.AppSplice && st.Node.AppSpliceOff:
		return "; app <-> sidecar stays TCP: node switch app-splice is off (agent --app-splice=false or the meshsplice ConfigMap), over " + why
	case t.AppSplice:
		return ", and app <-> sidecar (" + why + ")"
	case set || ann == nil:
		return "; app <-> sidecar stays TCP (" + why + ")"
	default:
		return fmt.Sprintf("; app <-> sidecar stays TCP: not the default on this node (splice(2) readers of spliced sockets: %s; `meshsplice check` says why); a pod opts in with %s: true", st.Readers(), istio.AnnotationAppSplice)
	}
}
