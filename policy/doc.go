// Package policy translates Istio AuthorizationPolicies into the identity
// policy meshsplice enforces in the kernel: the L4 meaning of the policies,
// judged on every connection to or from a meshed pod whatever process opens
// it, so that a compromised sidecar or an application that bypasses it still
// cannot open a connection that policy forbids.
//
// The package is pure Go: no kernel, no I/O. Compile takes the workloads,
// Services and policies ([Input]) and returns a [PolicySet] per destination
// workload plus the address-to-identity map ([Result]); the map writer that
// loads them into BPF maps is a thin layer above. [PolicySet.Verdict]
// evaluates a set exactly as the kernel does.
//
// The one rule everything below follows: the kernel must never deny a
// connection the sidecar would allow. Where the kernel cannot represent a
// policy exactly, it enforces less (and says so in the Result), never more.
//
// # Identities
//
// A workload's identity is its SPIFFE ID, spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE_ACCOUNT
// ([SPIFFEID]). The kernel knows a connection's source only by its address:
// [Result.IPIdentity] maps every known workload address (local or not) to a
// small [IdentityID] handed out by an [Allocator], which keeps numbers stable
// across agent restarts (Save, Load). principals ["*"] is any known identity.
//
// # Unknown sources
//
// Identity 0, [UnknownIdentity], is a source address that is no known
// workload: a pod of another node the agent has not been told about, a VM,
// another cluster. The sidecar judges it by the certificate it presents,
// which the kernel cannot see, so the kernel may deny it only where it
// KNOWS that no certificate could help:
//
//   - identity conditions (principals, namespaces, serviceAccounts,
//     trustDomains, their not- forms, and the when keys source.principal,
//     source.namespace, source.serviceAccount, source.trustDomain) hold for
//     an unknown source in an ALLOW atom and fail for it in a DENY atom:
//     an ALLOW by principal lets it through, a DENY by notPrincipals or
//     notNamespaces does not deny it;
//   - address and port conditions (ipBlocks, notIpBlocks, source.ip, ports,
//     notPorts, destination.port) apply to it as to any source: an ALLOW
//     whose every atom names ipBlocks it is outside still denies it, and a
//     DENY of a port or of an address block still denies it.
//
// The property test TestKernelDenyImpliesSidecarDeny holds Compile to this
// rule against a model of the sidecar (CUSTOM, AUDIT and dry-run
// policies, L7 fields and when keys judged per request, any certificate for
// an unknown source).
//
// Identities are finite: Compile resolves every identity condition over the
// known identities plus the unknown one, with istiod's own matchers (the
// Envoy string matchers it generates, applied to the SPIFFE ID):
// principals and source.principal match exactly, by prefix ("ns/prod/*"),
// by suffix ("*/sa/db") or "*"; a principal whose trust domain is the mesh's,
// one of its aliases or "cluster.local" stands for that principal in every
// trust domain of the mesh (istiod's trust domain rewriting);
// serviceAccounts are "sa" (in the policy's namespace) or "ns/sa";
// namespaces are globs turned into the regular expression ".*/ns/GLOB/.*"
// over the whole SPIFFE ID. That last one has a surprise the kernel keeps,
// because the sidecar has it: a '*' can span a '/', so namespaces: ["*a"]
// matches every identity, through the "/sa/" segment of its ID.
//
// # Scope
//
// A policy in the root namespace ([Input.RootNamespace], default
// istio-system) applies to workloads in every namespace; any other policy to
// workloads of its own namespace. selector.matchLabels narrows that to the
// workloads whose labels include all of them; no selector means all. A policy
// with targetRef or targetRefs is ignored: Istio's sidecars never apply such
// policies (a Service attachment is for waypoints; Gateway, GatewayClass and
// ServiceEntry targets are not sidecar workloads). [Input.ServiceTargetRefs]
// applies a Service targetRef to the Service's pods instead, as a waypoint
// would; it is off because the sidecar would not enforce those policies.
//
// A workload whose labels are unknown ([Workload.LabelsUnknown]: the
// runtime did not pass them) may or may not be selected by a policy with a
// selector (or a Service targetRef). The kernel then enforces what its
// sidecar would deny whatever the labels: such DENY policies are left out;
// such ALLOW policies are applied as if they selected it when another ALLOW
// policy surely applies (the default is deny anyway, and they only allow
// more), and left out otherwise (alone they would turn the default to
// deny). [Result.Partial] says so per workload.
//
// A workload Compile cannot use (no name, a name two workloads share, an
// identity the allocator has no number for) gets no kernel policy and is
// reported in [Result.Unenforced] ([ErrInvalidWorkload]); the others are
// compiled as if it were not there.
//
// CUSTOM and AUDIT policies, and dry-run ones (annotation istio.io/dry-run),
// are left to the sidecar ([Result.Ignored]). Of the rest, DENY comes before
// ALLOW: a connection a DENY rule matches is denied; else, when at least one
// ALLOW policy applies, a connection no ALLOW rule matches is denied; else it
// is allowed. An ALLOW policy without rules matches nothing, so it denies
// everything the other ALLOW policies do not allow; an empty rule {} matches
// everything. In a rule, from, to and when are ANDed; the sources of from are
// ORed, the operations of to are ORed, and rules are ORed. The fields of a
// source or an operation, and the when conditions, are ANDed; the values of
// one field are ORed and its not- values must all fail.
//
// A policy that Istio's admission webhook would reject is not enforced
// either: an invalid DENY policy is ignored, and the workloads an invalid
// ALLOW policy selects get no kernel policy at all ([ErrInvalidPolicy] in
// [Result.Unenforced]), because dropping the ALLOW alone could deny what the
// sidecar's other rules allow.
//
// # What the kernel sees: the projection
//
// The kernel sees the source identity (by address), the source address and
// the destination port. These are L4: from.source principals, namespaces,
// serviceAccounts, trustDomains, ipBlocks and their not- forms;
// to.operation ports and notPorts; when keys source.ip, source.namespace,
// source.principal, source.serviceAccount, source.trustDomain and
// destination.port. Everything else is L7 here: requestPrincipals, hosts,
// methods, paths and their not- forms, remoteIpBlocks and notRemoteIpBlocks
// (the original client of X-Forwarded-For or the PROXY protocol), and when
// keys request.*, remote.ip, destination.ip, connection.sni and
// experimental.*.
//
// An ALLOW rule with L7 parts becomes an L4 allow of what its L4 parts match:
// the L7 fields and when conditions are dropped, which allows more. For
// example
//
//	rules:
//	- from:
//	  - source: {principals: ["cluster.local/ns/default/sa/frontend"]}
//	  to:
//	  - operation: {methods: ["GET"], ports: ["8080"]}
//
// becomes "frontend may connect to port 8080": the kernel lets the POSTs
// through too and the sidecar refuses them. An operation with only L7 fields
// (paths: ["/api/*"]) becomes any port; a source with only requestPrincipals
// becomes any source.
//
// A DENY rule is enforced only where it is pure L4, because dropping an L7
// condition from a DENY would deny more than the sidecar does. For example
//
//	action: DENY
//	rules:
//	- to:
//	  - operation: {paths: ["/admin"], ports: ["8080"]}
//
// is not enforced: the kernel cannot tell /admin from /index.html, and
// denying port 8080 would refuse what the sidecar allows. The same holds for
// the not- forms (notMethods: ["GET"] in a DENY means "deny every non-GET
// request", still L7). The granularity is the atom: a DENY rule's (source,
// operation) combination is kept when neither the source nor the operation
// has an L7 field, and a DENY rule with any L7 when condition is dropped
// whole. So
//
//	action: DENY
//	rules:
//	- from:
//	  - source: {namespaces: ["legacy"]}
//	  - source: {requestPrincipals: ["*"]}
//	  to:
//	  - operation: {ports: ["5432"]}
//	  - operation: {paths: ["/debug"]}
//
// is enforced as "legacy may not connect to 5432" only. The classic
// require-a-JWT DENY (notRequestPrincipals: ["*"]) is not enforced at all.
// Every such drop is listed in [PolicySet.NotEnforced].
//
// (The sidecar itself does the opposite on plain TCP ports, where it cannot
// read HTTP: it drops a whole ALLOW rule with L7 parts and widens a DENY to
// its L4 parts. The kernel is laxer than the sidecar in both cases, which
// is what it must be.)
//
// # The bitmask scheme
//
// Compile splits the applicable policies of a workload into atoms ([Atom]):
// one per (rule, source, operation), each a conjunction of a source identity
// set, an address condition (in one of some prefixes, in none of others) and
// a port condition (in a set, not in a set, or any). A set holds at most
// [MaxAtoms] (64) atoms, DENY ones first; each owns one bit. The kernel then
// needs three lookups:
//
//	idMask   = IdentityMasks[srcIdentity]  (DefaultIdentityMask if absent:
//	                                        the unknown source's mask)
//	ipMask   = longest prefix match of srcIP in PrefixMasks
//	portMask = PortMasks[dstPort]           (DefaultPortMask if absent)
//	m = idMask & ipMask & portMask
//	deny if m & DenyMask != 0; else deny if HasAllow and m & AllowMask == 0;
//	else allow
//
// A prefix mask answers for every address whose longest match it is: such an
// address lies in exactly the entries that contain the matched prefix, so the
// mask of entry P holds the atoms whose address condition is true when "in
// Q" reads "Q contains P". PrefixMasks always has 0.0.0.0/0 and ::/0; IPv4
// and IPv6 are separate families, as in Envoy: an IPv6 block (::/0, ::/80,
// v4-mapped ones such as ::ffff:10.0.0.0/104) never matches an IPv4 source,
// and a v4-mapped source address is IPv4 (the kernel stores IPv4 that way;
// its prefix trie keys carry the family). Entries whose mask equals their
// parent's are left out. Compile drops atoms that
// can match nothing. A workload whose policies need more than 64 atoms gets
// no kernel policy ([ErrTooManyAtoms] in [Result.Unenforced]) rather than a
// wrong one. Workloads with identical policies share one set.
//
// # PeerAuthentication
//
// A sidecar whose port is STRICT (mutual TLS only) refuses every plaintext
// connection to it, whatever the AuthorizationPolicies say. The kernel cannot
// see TLS, but it can know that a source has no sidecar: a pod Istio did not
// inject (and that runs no istio-proxy container). [Input.PeerAuthentications]
// are resolved per workload as istiod resolves them
// (ComposePeerAuthentication): a policy without a selector (or with empty
// matchLabels) is mesh-wide in the root namespace and namespace-wide
// elsewhere; one with a selector, outside the root namespace, is
// workload-level when its labels are a subset of the workload's (a selector
// in the root namespace is never used); at each level the oldest policy wins
// (creation time, then "name.namespace"); the workload level overrides the
// namespace level, which overrides the mesh level, and UNSET (or no mtls)
// inherits, PERMISSIVE at the top. portLevelMtls is read from the
// workload-level policy only; its keys are the workload's container ports
// (destination ports as the sidecar sees them), and an UNSET port takes the
// workload's mode.
//
// The ports that end up STRICT become one DENY atom ([Atom.Plaintext]),
// first in the workload's set: it matches every source address the
// enforcement layer flags as having no sidecar, and no other. Its identity
// bits are in no identity mask; [PolicySet.PlaintextMask] is ORed into the
// source's identity mask when the address is flagged ([PolicySet.VerdictFrom]).
// An unknown source is never flagged, so STRICT never denies it, nor a known
// meshed pod. PERMISSIVE and DISABLE deny nothing. When a workload's labels
// are unknown, a port is STRICT only if it is STRICT whichever of the
// workload-level policies that may select it applies (or none). A
// portLevelMtls key outside 1-65535 (Istio's webhook rejects it; port 0
// would set the sidecar's catch-all chain) leaves that workload's mTLS to
// the sidecar (a warning). The property test
// TestKernelDenyImpliesSidecarDenyPeerAuth holds this to a model of the
// sidecar written from istiod's code.
//
// Pods of Istio's ambient mode are not injected, but ztunnel speaks mTLS
// only as HBONE, to port 15008, which is never judged; anything else it
// sends a sidecar is plaintext, which a STRICT port refuses anyway.
// Gateways and waypoints run an istio-proxy container and are never
// flagged.
//
// The enforcement layer applies the atom only where it knows the sidecar
// sees the connection: inbound to a pod of this node on a port its sidecar
// captures, or a connection from a pod of this node to such a pod. Traffic
// to an excluded inbound port never reaches the sidecar and is never denied
// for being plaintext; neither is a connection to a workload of another node,
// whose capture this node does not know (that node's kernel judges it).
//
// # Limits
//
// The kernel judges a connection by the identity of its source address,
// where the sidecar judges the mTLS certificate. They agree for meshed pods
// that use their sidecar. A source that is no known workload (another
// cluster, a VM, anything not in [Input.Workloads]) is the unknown identity
// to the kernel, judged only by its address and port (see Unknown sources),
// and a known pod is judged by its identity even on a plaintext connection. Connections to ports
// the sidecar does not capture inbound (its own 15020, 15021, 15090, and
// excludeInboundPorts) never meet Istio's authorization: the enforcement
// layer must let them through rather than apply the set. The destination
// port is the workload's own port (the container port Envoy sees as
// destination.port), not a Service port.
package policy
