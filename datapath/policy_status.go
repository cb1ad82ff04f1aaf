package datapath

import (
	"fmt"

	"github.com/cilium/ebpf"

	"github.com/meshsplice/meshsplice/redirect"
)

// PodPolicy says whether the kernel enforces a pod's authorization policy,
// and why not. ReadPodPolicies reads it from the pins alone (for
// `meshsplice status`, no agent needed); the agent adds what only it knows
// (labels unknown, too many atoms, a policy not applied) in its /pods.
type PodPolicy struct {
	NetnsCookie uint64 `json:"netns_cookie"`
	// Enforced: connections to and from the pod are judged by a policy set.
	Enforced bool `json:"enforced"`
	// Reason says why not when Enforced is false; when it is true, what
	// the kernel leaves to the sidecar, if anything ("" then).
	Reason string `json:"reason,omitempty"`
	// PolicySet is the kernel's set for the pod's addresses (0: none).
	PolicySet uint32 `json:"policy_set,omitempty"`
}

// Reasons ReadPodPolicies gives.
const (
	ReasonNoSidecar  = "no sidecar (not injected, inject=false or interceptionMode NONE): Istio does not authorize its traffic, so neither does the kernel"
	ReasonNoPolicy   = "no ALLOW or DENY policy applies to it, or the agent left it to the sidecar (see the agent's /pods)"
	ReasonCaptureOff = "capture is off (pod or node): policy is still enforced on the ports its sidecar sees"
	// ReasonIPTables: sk_lookup sees an inbound SYN after PREROUTING's
	// REDIRECT, on the sidecar's own port (e2e TestIptablesModeThroughAgent).
	ReasonIPTables = "Istio's own iptables capture it: its connects are judged (before their NAT); inbound connections reach the kernel already REDIRECTed to the sidecar's port, so only the sidecar judges those"
)

// PodPolicies is ReadPodPolicies for this datapath.
func (d *Datapath) PodPolicies() (map[uint64]PodPolicy, error) {
	return podPolicies(d.capture.MsPods, d.capture.MsPodIps, d.capture.MsIpInfo, d.capture.MsNodeSettings)
}

// ReadPodPolicies reads, for every registered pod of the datapath pinned at
// pinDir, whether the kernel enforces its policy, keyed by netns cookie.
func ReadPodPolicies(pinDir string) (map[uint64]PodPolicy, error) {
	if pinDir == "" {
		pinDir = DefaultPinDir
	}
	maps, err := openPinnedMaps(pinDir, redirect.CaptureMapMsPods, redirect.CaptureMapMsPodIps,
		redirect.CaptureMapMsIpInfo, redirect.CaptureMapMsNodeSettings)
	if err != nil {
		return nil, err
	}
	defer closeMaps(maps)
	return podPolicies(maps[redirect.CaptureMapMsPods], maps[redirect.CaptureMapMsPodIps],
		maps[redirect.CaptureMapMsIpInfo], maps[redirect.CaptureMapMsNodeSettings])
}

func podPolicies(pods, podIPs, ipInfo, node *ebpf.Map) (map[uint64]PodPolicy, error) {
	var n redirect.CaptureMsNode
	nodeCapture := node.Lookup(uint32(0), &n) == nil && n.Flags&redirect.CaptureMsNodeFlagMS_NODE_CAPTURE != 0
	set := map[uint64]uint32{}
	var a redirect.CaptureMsAddr
	var owner uint64
	it := podIPs.Iterate()
	for it.Next(&a, &owner) {
		var info redirect.CaptureMsIpInfo
		if ipInfo.Lookup(&a, &info) == nil && info.PolicySet != 0 && set[owner] == 0 {
			set[owner] = info.PolicySet
		}
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("read pod addresses: %w", err)
	}
	out := map[uint64]PodPolicy{}
	var cookie uint64
	var v redirect.CaptureMsPod
	pit := pods.Iterate()
	for pit.Next(&cookie, &v) {
		pp := PodPolicy{NetnsCookie: cookie, PolicySet: set[cookie]}
		sidecar := v.Flags&(redirect.CaptureMsPodFlagMS_POD_SIDECAR|redirect.CaptureMsPodFlagMS_POD_CAPTURE) != 0
		capture := v.Flags&redirect.CaptureMsPodFlagMS_POD_CAPTURE != 0 && nodeCapture
		switch {
		case !sidecar:
			pp.Reason = ReasonNoSidecar
		case pp.PolicySet == 0:
			pp.Reason = ReasonNoPolicy
		default:
			pp.Enforced = true
			switch {
			case v.Flags&redirect.CaptureMsPodFlagMS_POD_IPTABLES != 0:
				pp.Reason = ReasonIPTables
			case !capture:
				pp.Reason = ReasonCaptureOff
			}
		}
		out[cookie] = pp
	}
	if err := pit.Err(); err != nil {
		return nil, fmt.Errorf("read pods: %w", err)
	}
	return out, nil
}
