package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"
	"regexp"
	"strings"
)

// DefaultSocket is where the agent listens and the CNI plugin connects
// unless configured otherwise.
const DefaultSocket = "/run/meshsplice/cni.sock"

// Registry is what the API server needs from the agent: its set of
// registered pods, keyed by CNI container ID.
type Registry interface {
	// AddPod registers a pod, or replaces the registration of the same
	// container ID, and returns what the agent made of it. The request has
	// been validated already.
	AddPod(ctx context.Context, req PodRegistration) (PodStatus, error)
	// CheckPod returns the registration of a container, or an error
	// wrapping ErrPodNotFound.
	CheckPod(ctx context.Context, containerID string) (PodStatus, error)
	// RemovePod unregisters a container. It is idempotent: an unknown
	// container is not an error.
	RemovePod(ctx context.Context, containerID string) error
}

// HealthChecker is implemented by a Registry that can tell whether it is
// ready to register pods; the health endpoint then reports its answer.
// Return an error wrapping ErrNotReady when it is not.
type HealthChecker interface {
	Health(ctx context.Context) error
}

// Sentinel errors. A Registry wraps them to choose the HTTP answer; the
// Client's errors match them with errors.Is.
var (
	// ErrInvalidRequest: the request or one of its fields is invalid (400).
	ErrInvalidRequest = errors.New("invalid request")
	// ErrPodNotFound: no pod is registered under the container ID (404).
	ErrPodNotFound = errors.New("pod not registered")
	// ErrConflict: the request contradicts the agent's state (409).
	ErrConflict = errors.New("conflict")
	// ErrNotReady: the agent cannot register pods yet, for example while
	// its datapath is loading (503).
	ErrNotReady = errors.New("agent not ready")
	// ErrAgentUnreachable: the client could not connect to the agent's
	// socket (client side only: no answer was received).
	ErrAgentUnreachable = errors.New("meshsplice agent not reachable")
)

// Error codes of the JSON error body.
const (
	CodeInvalidRequest   = "invalid_request"
	CodePodNotFound      = "pod_not_found"
	CodeNotFound         = "not_found"
	CodeMethodNotAllowed = "method_not_allowed"
	CodeConflict         = "conflict"
	CodeNotReady         = "not_ready"
	CodeInternal         = "internal"
)

// Error is an error answer from the agent, as the Client returns it.
// errors.Is matches it against the sentinel error of its code.
type Error struct {
	// StatusCode is the HTTP status of the answer.
	StatusCode int `json:"-"`
	// Code is the machine-readable error code (Code* constants).
	Code string `json:"code"`
	// Message is the human-readable error.
	Message string `json:"error"`
}

// Error returns the agent's message.
func (e *Error) Error() string {
	if e.Message == "" {
		return fmt.Sprintf("agent answered HTTP %d (%s)", e.StatusCode, e.Code)
	}
	return e.Message
}

// Is reports whether target is the sentinel error of e's code.
func (e *Error) Is(target error) bool {
	switch e.Code {
	case CodeInvalidRequest:
		return target == ErrInvalidRequest
	case CodePodNotFound:
		return target == ErrPodNotFound
	case CodeConflict:
		return target == ErrConflict
	case CodeNotReady:
		return target == ErrNotReady
	case CodeForbidden:
		return target == ErrForbidden
	}
	return false
}

// PodRegistration is what the CNI plugin tells the agent about a pod on ADD.
type PodRegistration struct {
	// ContainerID is the CNI container ID (the pod sandbox ID), the key of
	// the registration.
	ContainerID string `json:"containerID"`
	// Netns is the path of the pod's network namespace (CNI_NETNS).
	Netns string `json:"netns"`
	// IfName is the pod's interface (CNI_IFNAME).
	IfName string `json:"ifName"`
	// IPs are the pod's addresses, from the chain's previous result.
	IPs []netip.Addr `json:"ips"`
	// PodName, PodNamespace and PodUID identify the pod (K8S_POD_NAME,
	// K8S_POD_NAMESPACE, K8S_POD_UID in CNI_ARGS); empty for a pod that
	// is not a Kubernetes pod.
	PodName      string `json:"podName,omitempty"`
	PodNamespace string `json:"podNamespace,omitempty"`
	PodUID       string `json:"podUID,omitempty"`
	// ServiceAccount is the pod's service account, its mesh identity.
	ServiceAccount string `json:"serviceAccount,omitempty"`
	// Annotations are the pod's annotations: the Istio settings
	// (sidecar.istio.io/*, traffic.sidecar.istio.io/*) and meshsplice's
	// own switches (meshsplice.io/*).
	Annotations map[string]string `json:"annotations,omitempty"`
	// Labels are the pod's labels, which AuthorizationPolicy selectors
	// match (standalone: from the io.meshsplice.pod-labels capability).
	Labels map[string]string `json:"labels,omitempty"`
	// Network is the name of the CNI network the pod was added to.
	Network string `json:"network,omitempty"`
}

// UnmarshalJSON decodes a registration; an invalid address in ips is
// reported with its index.
func (r *PodRegistration) UnmarshalJSON(b []byte) error {
	type plain PodRegistration
	var w struct {
		*plain
		IPs []string `json:"ips"`
	}
	w.plain = (*plain)(r)
	if err := json.Unmarshal(b, &w); err != nil {
		// Name the field as the client spelled it, without the
		// embedded alias.
		var typeErr *json.UnmarshalTypeError
		if errors.As(err, &typeErr) {
			typeErr.Field = strings.TrimPrefix(typeErr.Field, "plain.")
		}
		return err
	}
	r.IPs = nil
	for i, s := range w.IPs {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return &fieldError{field: fmt.Sprintf("ips[%d]", i), msg: fmt.Sprintf("%q is not an IP address", s)}
		}
		r.IPs = append(r.IPs, a)
	}
	return nil
}

// String returns "namespace/name", or "container ID" for a pod without a
// Kubernetes name: the name to use in messages.
func (r PodRegistration) String() string {
	switch {
	case r.PodName != "" && r.PodNamespace != "":
		return r.PodNamespace + "/" + r.PodName
	case r.PodName != "":
		return r.PodName
	}
	return "container " + r.ContainerID
}

// containerIDPattern is the CNI spec's container ID syntax.
var containerIDPattern = regexp.MustCompile(`^[a-zA-Z0-9][a-zA-Z0-9_.\-]*$`)

// ValidateContainerID checks a container ID against the CNI spec's syntax.
func ValidateContainerID(id string) error {
	if id == "" {
		return &fieldError{field: "containerID", msg: "is required"}
	}
	if !containerIDPattern.MatchString(id) {
		return &fieldError{field: "containerID", msg: fmt.Sprintf("%q must match %s", id, containerIDPattern)}
	}
	return nil
}

// Validate checks the registration and reports every bad field at once,
// in an error wrapping ErrInvalidRequest.
func (r PodRegistration) Validate() error {
	var bad []string
	add := func(err error) {
		if err != nil {
			bad = append(bad, err.Error())
		}
	}
	add(ValidateContainerID(r.ContainerID))
	switch {
	case r.Netns == "":
		add(&fieldError{field: "netns", msg: "is required"})
	case !filepath.IsAbs(r.Netns):
		add(&fieldError{field: "netns", msg: fmt.Sprintf("%q must be an absolute path", r.Netns)})
	case strings.ContainsRune(r.Netns, 0):
		add(&fieldError{field: "netns", msg: fmt.Sprintf("%q holds a NUL byte", r.Netns)})
	}
	switch {
	case r.IfName == "":
		add(&fieldError{field: "ifName", msg: "is required"})
	case len(r.IfName) > 15 || strings.ContainsAny(r.IfName, "/: \t\n\x00") || r.IfName == "." || r.IfName == "..":
		add(&fieldError{field: "ifName", msg: fmt.Sprintf("%q is not a valid interface name", r.IfName)})
	}
	if len(r.IPs) == 0 {
		add(&fieldError{field: "ips", msg: "at least one pod IP is required"})
	}
	for i, ip := range r.IPs {
		switch {
		case !ip.IsValid():
			add(&fieldError{field: fmt.Sprintf("ips[%d]", i), msg: "is not an IP address"})
		case ip.IsUnspecified():
			add(&fieldError{field: fmt.Sprintf("ips[%d]", i), msg: fmt.Sprintf("%s is the unspecified address", ip)})
		case ip.Zone() != "":
			add(&fieldError{field: fmt.Sprintf("ips[%d]", i), msg: fmt.Sprintf("%s must not have a zone", ip)})
		}
	}
	for k := range r.Annotations {
		if k == "" {
			add(&fieldError{field: "annotations", msg: "empty annotation name"})
		}
	}
	if len(bad) > 0 {
		return fmt.Errorf("%w: %s", ErrInvalidRequest, strings.Join(bad, "; "))
	}
	return nil
}

// PodStatus is the agent's view of a registered pod.
type PodStatus struct {
	// Pod is the registration as the agent holds it.
	Pod PodRegistration `json:"pod"`
	// Capture tells whether the agent captures the pod's traffic (false
	// for a pod without a sidecar or one that opted out).
	Capture bool `json:"capture"`
	// Splice tells whether the pod's connections are spliced.
	Splice bool `json:"splice"`
	// Mode is who captures the pod: "meshsplice", "iptables" (Istio's own
	// iptables; meshsplice splices its sidecar only) or "off".
	Mode string `json:"mode,omitempty"`
	// InboundReady tells whether the kernel holds the sidecar's inbound
	// listener, so inbound capture can hand it connections (nil: the pod
	// is not captured). InboundReason says why not.
	InboundReady  *bool  `json:"inboundReady,omitempty"`
	InboundReason string `json:"inboundReason,omitempty"`
	// Warnings are what the agent found odd in the pod's settings
	// (unsupported or unknown annotations, ignored values).
	Warnings []string `json:"warnings,omitempty"`
	// Policy says whether the kernel enforces the pod's authorization
	// policy, and why not (nil from an agent that does not say).
	Policy *PolicyStatus `json:"policy,omitempty"`
}

// PolicyStatus is whether the kernel enforces a pod's authorization policy
// (the agent's view of datapath.PodPolicy).
type PolicyStatus struct {
	Enforced bool `json:"enforced"`
	// Reason says why not, or, when enforced, what is left to the sidecar.
	Reason string `json:"reason,omitempty"`
}

// fieldError is a problem with one field of a request.
type fieldError struct {
	field, msg string
}

func (e *fieldError) Error() string { return e.field + ": " + e.msg }
