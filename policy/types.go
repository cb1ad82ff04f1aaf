package policy

import (
	"errors"
	"net/netip"

	securityv1 "istio.io/client-go/pkg/apis/security/v1"
)

// MaxAtoms is the most atoms one PolicySet may have: one bit each in a
// uint64 mask.
const MaxAtoms = 64

// Defaults for the Input fields that may be left empty.
const (
	DefaultTrustDomain   = "cluster.local"
	DefaultRootNamespace = "istio-system"
)

var (
	// ErrInvalidInput is wrapped by Compile's error when the input itself is
	// unusable (no identity allocator).
	ErrInvalidInput = errors.New("invalid policy input")
	// ErrTooManyAtoms is wrapped by Result.Unenforced when a workload's
	// policies need more than MaxAtoms atoms.
	ErrTooManyAtoms = errors.New("too many atoms for one policy set")
	// ErrInvalidPolicy is wrapped by Result.Unenforced when an ALLOW policy
	// that selects the workload is not valid, and by the reasons in
	// Result.Ignored for invalid DENY policies.
	ErrInvalidPolicy = errors.New("invalid authorization policy")
	// ErrInvalidWorkload is wrapped by Result.Unenforced for a workload
	// Compile cannot use (no name, a name two workloads share, an identity
	// the allocator has no number for): that workload gets no kernel policy,
	// the others are not affected.
	ErrInvalidWorkload = errors.New("invalid workload")
)

// Workload is a pod (or any workload with a sidecar) that policies can
// select and that connections can come from.
type Workload struct {
	Namespace string
	Name      string
	// ServiceAccount names the workload's identity; empty means "default",
	// like Kubernetes.
	ServiceAccount string
	Labels         map[string]string
	// LabelsUnknown says Labels were not supplied (the runtime did not pass
	// them), rather than that the workload has none. Compile then enforces
	// only what the workload's sidecar would deny whichever selector
	// policies apply to it (see Result.Partial).
	LabelsUnknown bool
	IPs           []netip.Addr
}

// Key is the workload's "namespace/name".
func (w Workload) Key() string { return w.Namespace + "/" + w.Name }

// Service is a Kubernetes Service, used to resolve policies whose targetRefs
// name one (see Input.ServiceTargetRefs).
type Service struct {
	Namespace string
	Name      string
	// Selector picks the Service's pods; a Service without one has no pods
	// of its own.
	Selector map[string]string
}

// Input is everything Compile translates.
type Input struct {
	// TrustDomain is the mesh trust domain (MeshConfig.trustDomain);
	// DefaultTrustDomain when empty.
	TrustDomain string
	// TrustDomainAliases are MeshConfig.trustDomainAliases: principals
	// naming an alias (or cluster.local) also match the trust domain, as
	// istiod rewrites them.
	TrustDomainAliases []string
	// RootNamespace is MeshConfig.rootNamespace; DefaultRootNamespace when
	// empty. Its policies apply to workloads in every namespace.
	RootNamespace string
	// Workloads are all known workloads, local or not: the destinations
	// policies are compiled for and the sources identities are known for.
	Workloads []Workload
	// Services resolve targetRefs to Services when ServiceTargetRefs is set.
	Services []Service
	// Policies are the security.istio.io AuthorizationPolicies.
	Policies []*securityv1.AuthorizationPolicy
	// PeerAuthentications are the security.istio.io PeerAuthentications:
	// where they make a port STRICT, the set denies sources known to have
	// no sidecar (see the package documentation, PeerAuthentication).
	PeerAuthentications []*securityv1.PeerAuthentication
	// ServiceTargetRefs applies a policy whose targetRefs name a Service to
	// the Service's pods, as a waypoint would. Istio's sidecars ignore every
	// policy that has targetRefs (Service attachment is for waypoints only),
	// so by default the kernel ignores them too: enforcing them would deny
	// what the sidecar allows.
	ServiceTargetRefs bool
}

// Action is what an atom does when it matches.
type Action uint8

// The actions the kernel enforces. CUSTOM and AUDIT policies are left to the
// sidecar.
const (
	Allow Action = iota
	Deny
)

// String is the action as policies spell it.
func (a Action) String() string {
	switch a {
	case Allow:
		return "ALLOW"
	case Deny:
		return "DENY"
	}
	return "Action(?)"
}

// PortMatch says how an atom's Ports are read.
type PortMatch uint8

// The three forms of an atom's port condition.
const (
	AnyPort    PortMatch = iota // every port; Ports is empty
	InPorts                     // the port is one of Ports
	NotInPorts                  // the port is none of Ports
)

// Atom is one (rule x source x operation) combination of a policy: a
// conjunction of a source identity set, a source address condition and a
// destination port condition. Each atom of a PolicySet owns one bit of every
// mask.
type Atom struct {
	Action Action
	// Policy is the origin policy's "namespace/name".
	Policy string
	// Rule, Source and Operation index the policy's rules, the rule's
	// from and the rule's to; Source or Operation is -1 when the rule has no
	// from or no to (any source, any operation).
	Rule, Source, Operation int

	// Identities is the set of source identities the atom matches, sorted;
	// it contains UnknownIdentity when the atom matches sources that are
	// not known pods.
	Identities []IdentityID
	// Plaintext is set on the atom of a PeerAuthentication STRICT: instead
	// of Identities (empty), it matches the source addresses known to have
	// no sidecar, whatever their identity (PolicySet.PlaintextMask).
	Plaintext bool
	// IPs are the source prefixes of which the source address must be in
	// one; nil means any address. NotIPs are prefixes it must be in none of.
	IPs, NotIPs []netip.Prefix
	// PortMatch and Ports are the destination port condition.
	PortMatch PortMatch
	Ports     []uint16

	// IdentityDesc, IPDesc and PortDesc say the same in words, for humans.
	IdentityDesc, IPDesc, PortDesc string
}

// PolicySet is what the kernel evaluates for a destination workload; see the
// package documentation for the scheme. Verdict evaluates it the way the
// kernel does.
type PolicySet struct {
	Atoms []Atom
	// HasAllow is set when an ALLOW policy applies: then what no ALLOW atom
	// matches is denied.
	HasAllow bool
	// IdentityMasks hold the atoms that a source identity satisfies, for the
	// identities whose mask is not DefaultIdentityMask (the mask of
	// UnknownIdentity, and of any identity not listed).
	IdentityMasks       map[IdentityID]uint64
	DefaultIdentityMask uint64
	// PrefixMasks is looked up by longest prefix match of the source address;
	// it always has 0.0.0.0/0 and ::/0.
	PrefixMasks map[netip.Prefix]uint64
	// PortMasks hold the atoms a destination port satisfies, for the ports
	// whose mask is not DefaultPortMask.
	PortMasks       map[uint16]uint64
	DefaultPortMask uint64
	// AllowMask and DenyMask hold the bits of the ALLOW and DENY atoms.
	AllowMask, DenyMask uint64
	// PlaintextMask holds the bits of the Plaintext atoms: a source known
	// to have no sidecar satisfies them by identity (its identity mask is
	// ORed with it).
	PlaintextMask uint64
	// NotEnforced lists what the sidecar enforces and the kernel does not:
	// the L7 parts dropped from ALLOW rules (the kernel allows more), the
	// DENY rules, sources and operations left out (the kernel denies less),
	// and atoms that can match nothing.
	NotEnforced []string
	// Workloads are the "namespace/name"s of the workloads that use the set.
	Workloads []string
}

// Result is the output of Compile.
type Result struct {
	// Sets are the distinct policy sets; workloads with identical policies
	// share one.
	Sets []PolicySet
	// WorkloadSet maps every workload's "namespace/name" to its index in
	// Sets, or to -1 when the kernel enforces nothing for it (no ALLOW or
	// DENY policy applies and no port is STRICT, or Unenforced says why
	// not). A set may have no
	// atoms: when all the DENY rules of a workload are L7, it allows
	// everything and its NotEnforced says why.
	WorkloadSet map[string]int
	// Unenforced says why a workload that policies apply to has no kernel
	// policy; the reasons wrap ErrTooManyAtoms or ErrInvalidPolicy.
	Unenforced map[string]error
	// Partial says, for a workload whose labels are unknown, which selector
	// policies the kernel leaves to the sidecar: the DENY ones, and the
	// ALLOW ones when no ALLOW policy surely applies (they would turn the
	// default to deny).
	Partial map[string]string
	// IPIdentity maps every known workload address to its identity.
	// Addresses claimed by two identities are left out (see Warnings): they
	// are unknown sources to the kernel.
	IPIdentity map[netip.Addr]IdentityID
	// Identities names every known identity.
	Identities map[IdentityID]string
	// Ignored lists, once per policy, the policies the kernel leaves to the
	// sidecar entirely, and why (CUSTOM, AUDIT, dry-run, targetRefs, invalid
	// DENY).
	Ignored []string
	// Warnings are problems in the input that did not stop the compilation.
	Warnings []string
}
