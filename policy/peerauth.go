package policy

import (
	"cmp"
	"fmt"
	"slices"
	"strings"

	securityv1beta1 "istio.io/api/security/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
)

// MTLSMode is a resolved PeerAuthentication mutual TLS mode (UNSET is
// resolved by inheritance and, at the top, is PERMISSIVE).
type MTLSMode uint8

// The modes a sidecar enforces on its inbound ports.
const (
	MTLSPermissive MTLSMode = iota // plaintext and mTLS
	MTLSStrict                     // mTLS only: plaintext is refused
	MTLSDisable                    // plaintext only
)

// String is the mode as PeerAuthentications spell it.
func (m MTLSMode) String() string {
	switch m {
	case MTLSPermissive:
		return "PERMISSIVE"
	case MTLSStrict:
		return "STRICT"
	case MTLSDisable:
		return "DISABLE"
	}
	return "MTLSMode(?)"
}

// PeerAuth is the effective PeerAuthentication of a workload: Mode on every
// port but those PerPort names (container ports, as the sidecar sees them).
type PeerAuth struct {
	Mode    MTLSMode
	PerPort map[uint32]MTLSMode
	// From is the "namespace/name" of the policies that decided, mesh,
	// namespace then workload level.
	From []string
}

// ModeFor is the mode of one destination port.
func (p PeerAuth) ModeFor(port uint16) MTLSMode {
	if m, ok := p.PerPort[uint32(port)]; ok {
		return m
	}
	return p.Mode
}

// convertMode is Istio's ConvertToMutualTLSMode for a set mode.
func convertMode(m securityv1beta1.PeerAuthentication_MutualTLS_Mode) MTLSMode {
	switch m {
	case securityv1beta1.PeerAuthentication_MutualTLS_STRICT:
		return MTLSStrict
	case securityv1beta1.PeerAuthentication_MutualTLS_DISABLE:
		return MTLSDisable
	}
	return MTLSPermissive
}

func mtlsUnset(m *securityv1beta1.PeerAuthentication_MutualTLS) bool {
	return m == nil || m.GetMode() == securityv1beta1.PeerAuthentication_MutualTLS_UNSET
}

// olderPeerAuth orders PeerAuthentications as istiod does before it picks
// one per level: oldest first, then by "name.namespace".
func olderPeerAuth(a, b *securityv1.PeerAuthentication) int {
	if c := a.CreationTimestamp.Time.Compare(b.CreationTimestamp.Time); c != 0 {
		return c
	}
	return cmp.Compare(a.Name+"."+a.Namespace, b.Name+"."+b.Namespace)
}

// composePeerAuth is istiod's ComposePeerAuthentication for one workload,
// given the policy chosen at each level (nil: none): UNSET inherits from
// the level above (PERMISSIVE at the top); portLevelMtls is read from the
// workload-level policy only, an UNSET port taking the workload's mode.
func composePeerAuth(mesh, namespace, workload *securityv1.PeerAuthentication) PeerAuth {
	out := PeerAuth{Mode: MTLSPermissive}
	for _, p := range []*securityv1.PeerAuthentication{mesh, namespace, workload} {
		if p == nil {
			continue
		}
		out.From = append(out.From, p.Namespace+"/"+p.Name)
		if !mtlsUnset(p.Spec.GetMtls()) {
			out.Mode = convertMode(p.Spec.GetMtls().GetMode())
		}
	}
	if workload != nil && workload.Spec.GetPortLevelMtls() != nil {
		out.PerPort = map[uint32]MTLSMode{}
		for port, m := range workload.Spec.GetPortLevelMtls() {
			if mtlsUnset(m) {
				out.PerPort[port] = out.Mode
			} else {
				out.PerPort[port] = convertMode(m.GetMode())
			}
		}
	}
	return out
}

// peerAuthFor returns the effective PeerAuthentication of w as its sidecar
// has it, and whether it is certain: when w's labels are unknown and
// workload-level policies may select it, every possibility is returned
// (none of them, or each one that may be the oldest that selects it).
//
// Levels (istiod's getConfigsForWorkload and ComposePeerAuthentication): a
// policy without a selector (or with empty matchLabels) is mesh-wide in
// the root namespace and namespace-wide elsewhere; one with a selector in
// another namespace than the root is workload-level when its labels are a
// subset of the workload's; one with a selector in the root namespace is
// never used. At each level the oldest policy wins (creation time, then
// "name.namespace").
func (c *compiler) peerAuthFor(w Workload) []PeerAuth {
	var mesh, ns *securityv1.PeerAuthentication
	var sure, maybe []*securityv1.PeerAuthentication
	for _, p := range c.peerAuths {
		if p.Namespace != w.Namespace && p.Namespace != c.in.RootNamespace {
			continue
		}
		sel := p.Spec.GetSelector().GetMatchLabels()
		switch {
		case len(sel) == 0 && p.Namespace == c.in.RootNamespace:
			if mesh == nil {
				mesh = p
			}
		case len(sel) == 0:
			if ns == nil {
				ns = p
			}
		case p.Namespace == c.in.RootNamespace:
			// A selector in the root namespace: istiod ignores it.
		case w.LabelsUnknown:
			maybe = append(maybe, p)
		case subset(sel, w.Labels):
			sure = append(sure, p)
		}
	}
	// c.peerAuths is sorted oldest first, so the first of a level wins.
	if len(sure) > 0 {
		return []PeerAuth{composePeerAuth(mesh, ns, sure[0])}
	}
	out := []PeerAuth{composePeerAuth(mesh, ns, nil)}
	for _, p := range maybe {
		out = append(out, composePeerAuth(mesh, ns, p))
	}
	return out
}

// plaintextPolicy is the prefix of the Atom.Policy of a PeerAuthentication
// atom.
const plaintextPolicy = "PeerAuthentication "

// strictAtom turns the possible PeerAuthentications of a workload into the
// kernel's one DENY atom for them: sources known to have no sidecar
// (Atom.Plaintext), on the ports that are STRICT in every possibility.
// ok is false when no port is STRICT for sure. A possibility with a
// port-level key outside 1-65535 (Istio's webhook rejects them; port 0
// would name the sidecar's catch-all chain) makes the kernel enforce
// nothing, said in note.
func strictAtom(possible []PeerAuth) (a Atom, note string, ok bool) {
	var named []uint16
	var from []string
	defaultStrict := true
	for _, p := range possible {
		for port := range p.PerPort {
			if port == 0 || port > 65535 {
				return a, fmt.Sprintf("%s: portLevelMtls names port %d (not 1-65535): mTLS mode left to the sidecar",
					strings.Join(p.From, ", "), port), false
			}
			named = append(named, uint16(port))
		}
		defaultStrict = defaultStrict && p.Mode == MTLSStrict
		from = append(from, p.From...)
	}
	named = sortedPorts(named)
	strictAt := func(port uint16) bool {
		for _, p := range possible {
			if p.ModeFor(port) != MTLSStrict {
				return false
			}
		}
		return true
	}
	var except, only []uint16
	for _, port := range named {
		switch s := strictAt(port); {
		case defaultStrict && !s:
			except = append(except, port)
		case !defaultStrict && s:
			only = append(only, port)
		}
	}
	switch {
	case defaultStrict && len(except) > 0:
		a.PortMatch, a.Ports = NotInPorts, except
	case defaultStrict:
		a.PortMatch = AnyPort
	case len(only) > 0:
		a.PortMatch, a.Ports = InPorts, only
	default:
		return a, "", false
	}
	slices.Sort(from)
	from = slices.Compact(from)
	a.Action, a.Plaintext = Deny, true
	a.Policy = plaintextPolicy + strings.Join(from, ", ")
	a.Rule, a.Source, a.Operation = -1, -1, -1
	a.IdentityDesc = "sources known to have no sidecar (plaintext; STRICT mTLS)"
	a.IPDesc = describeIPs(nil, nil)
	a.PortDesc = describePorts(a.PortMatch, a.Ports)
	return a, "", true
}

// sortPeerAuths keeps the usable PeerAuthentications, oldest first.
func (c *compiler) sortPeerAuths(res *Result) {
	for _, p := range c.in.PeerAuthentications {
		if p == nil {
			res.Warnings = append(res.Warnings, "a null PeerAuthentication: ignored")
			continue
		}
		c.peerAuths = append(c.peerAuths, p)
	}
	slices.SortStableFunc(c.peerAuths, olderPeerAuth)
}
