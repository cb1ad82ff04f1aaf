package policy

import (
	"cmp"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	securityv1beta1 "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
)

// dryRunAnnotation marks a policy Istio evaluates in shadow mode only.
const dryRunAnnotation = "istio.io/dry-run"

// identity is one member of the identity universe: a known identity, or the
// unknown source (spiffe "").
type identity struct {
	id     IdentityID
	spiffe string
}

// compiled is one ALLOW or DENY policy translated once, independently of the
// workloads it applies to (its atoms only depend on the policy and on the
// identity universe).
type compiled struct {
	p       *securityv1.AuthorizationPolicy
	idx     int    // position in the sorted policies
	key     string // namespace/name
	action  Action
	atoms   []Atom
	notes   []string
	invalid error // set for an invalid ALLOW policy: its workloads are not enforced
}

type compiler struct {
	in       Input
	tds      trustDomains
	universe []identity // sorted by id; universe[0] is the unknown source
	services map[string]Service
	// matchCache holds, per matcher kind, namespace and value, the
	// members of the universe the value matches.
	matchCache map[string][]bool
	// peerAuths are the PeerAuthentications, oldest first.
	peerAuths []*securityv1.PeerAuthentication
}

// Compile translates the ALLOW and DENY AuthorizationPolicies of in into a
// PolicySet per destination workload, and maps workload addresses to
// identities, allocating them with ids. It fails only when the input itself
// is unusable (ErrInvalidInput); policies it cannot enforce exactly are left
// to the sidecar and reported in the Result.
func Compile(in Input, ids Identities) (Result, error) {
	if ids == nil {
		return Result{}, fmt.Errorf("%w: no identity allocator", ErrInvalidInput)
	}
	if in.TrustDomain == "" {
		in.TrustDomain = DefaultTrustDomain
	}
	if in.RootNamespace == "" {
		in.RootNamespace = DefaultRootNamespace
	}
	c := &compiler{
		in:         in,
		tds:        append(trustDomains{in.TrustDomain}, in.TrustDomainAliases...),
		services:   map[string]Service{},
		matchCache: map[string][]bool{},
	}
	res := Result{
		WorkloadSet: map[string]int{},
		Unenforced:  map[string]error{},
		Partial:     map[string]string{},
		IPIdentity:  map[netip.Addr]IdentityID{},
		Identities:  map[IdentityID]string{},
	}

	workloads, err := c.identities(ids, &res)
	if err != nil {
		return Result{}, err
	}
	for _, s := range in.Services {
		c.services[s.Namespace+"/"+s.Name] = s
	}

	policies := c.policies(&res)
	c.sortPeerAuths(&res)

	memo := map[string]int{} // applicable policies -> set
	ix := indexPolicies(policies, in.RootNamespace)
	for _, w := range workloads {
		key := w.Key()
		if _, bad := res.Unenforced[key]; bad {
			res.WorkloadSet[key] = -1
			continue
		}
		var deny, allow, maybeAllow []*compiled
		var bad, left []string
		for _, i := range ix.candidates(w) {
			cp := policies[i]
			sc := c.applies(cp.p, w)
			if sc == outOfScope {
				continue
			}
			switch {
			case cp.invalid != nil:
				bad = append(bad, cp.key+": "+oneLine(cp.invalid))
			case sc == maybeInScope && cp.action == Deny:
				left = append(left, "DENY "+cp.key+" left to the sidecar")
			case sc == maybeInScope:
				maybeAllow = append(maybeAllow, cp)
			case cp.action == Deny:
				deny = append(deny, cp)
			default:
				allow = append(allow, cp)
			}
		}
		// Labels unknown: with an ALLOW policy that surely applies, the
		// default is deny whatever the labels, and every ALLOW that may
		// apply can only allow more; without one, any selected ALLOW
		// would make the default deny, which the sidecar may not do.
		if len(allow) > 0 {
			for _, cp := range maybeAllow {
				left = append(left, "ALLOW "+cp.key+" applied as if selected (the kernel allows more)")
			}
			allow = append(allow, maybeAllow...)
			slices.SortFunc(allow, func(a, b *compiled) int { return cmp.Compare(a.idx, b.idx) })
		} else {
			for _, cp := range maybeAllow {
				left = append(left, "ALLOW "+cp.key+" left to the sidecar")
			}
		}
		// PeerAuthentication STRICT: one DENY atom for the sources known
		// to have no sidecar, first in the set.
		possible := c.peerAuthFor(w)
		var strict []*compiled
		if a, note, ok := strictAtom(possible); ok {
			strict = []*compiled{{key: a.Policy, action: Deny, atoms: []Atom{a}, idx: -1}}
		} else if note != "" {
			res.Warnings = append(res.Warnings, fmt.Sprintf("workload %s: %s", key, note))
		}
		if len(possible) > 1 {
			left = append(left, "STRICT mTLS enforced only on the ports every workload-level PeerAuthentication that may select it makes STRICT")
		}
		if len(left) > 0 {
			res.Partial[key] = "labels unknown: " + strings.Join(left, "; ")
		}
		res.WorkloadSet[key] = -1
		if len(bad) > 0 {
			res.Unenforced[key] = fmt.Errorf("%w: ALLOW %s", ErrInvalidPolicy, strings.Join(bad, "; "))
			continue
		}
		if len(strict)+len(deny)+len(allow) == 0 {
			continue
		}
		chosen := slices.Concat(strict, deny, allow)
		n := 0
		for _, cp := range chosen {
			n += len(cp.atoms)
		}
		if n > MaxAtoms {
			res.Unenforced[key] = fmt.Errorf("%w: %d atoms, at most %d fit in a mask", ErrTooManyAtoms, n, MaxAtoms)
			continue
		}
		var sk strings.Builder
		for _, cp := range chosen {
			if cp.idx < 0 { // the STRICT atom: keyed by what it says
				fmt.Fprintf(&sk, "%s %s,", cp.key, cp.atoms[0].PortDesc)
				continue
			}
			fmt.Fprintf(&sk, "%d,", cp.idx)
		}
		idx, ok := memo[sk.String()]
		if !ok {
			idx = len(res.Sets)
			memo[sk.String()] = idx
			res.Sets = append(res.Sets, c.set(chosen, len(allow) > 0))
		}
		res.Sets[idx].Workloads = append(res.Sets[idx].Workloads, key)
		res.WorkloadSet[key] = idx
	}
	return res, nil
}

// identities builds the identity universe and the address map, and returns
// the workloads sorted by key with defaults filled in.
func (c *compiler) identities(ids Identities, res *Result) ([]Workload, error) {
	var workloads []Workload
	count := map[string]int{}
	for _, w := range c.in.Workloads {
		count[w.Key()]++
	}
	spiffeOf := map[IdentityID]string{}
	owner := map[netip.Addr]IdentityID{}
	conflict := map[netip.Addr]bool{}
	// A workload Compile cannot use is reported and left out; the others
	// are compiled as if it were not there.
	bad := func(w Workload, format string, args ...any) {
		err := fmt.Errorf("%w: "+format, append([]any{ErrInvalidWorkload}, args...)...)
		res.Unenforced[w.Key()] = err
		res.WorkloadSet[w.Key()] = -1
		res.Warnings = append(res.Warnings, fmt.Sprintf("workload %s: %v", w.Key(), err))
	}
	for _, w := range c.in.Workloads {
		if w.Namespace == "" || w.Name == "" {
			bad(w, "no namespace or name")
			continue
		}
		if count[w.Key()] > 1 {
			if _, done := res.Unenforced[w.Key()]; !done {
				bad(w, "%d workloads are named %s", count[w.Key()], w.Key())
			}
			continue
		}
		if w.ServiceAccount == "" {
			w.ServiceAccount = "default"
		}
		spiffe := SPIFFEID(c.in.TrustDomain, w.Namespace, w.ServiceAccount)
		id := ids.ID(spiffe)
		if id == UnknownIdentity {
			bad(w, "the identity allocator gave no number to %s", spiffe)
			continue
		}
		if other, ok := spiffeOf[id]; ok && other != spiffe {
			bad(w, "the identity allocator gave %d to both %s and %s", id, other, spiffe)
			continue
		}
		workloads = append(workloads, w)
		w := &workloads[len(workloads)-1]
		spiffeOf[id] = spiffe
		for _, ip := range w.IPs {
			if !ip.IsValid() || ip.Zone() != "" {
				res.Warnings = append(res.Warnings, fmt.Sprintf("workload %s: address %q is not usable: ignored", w.Key(), ip))
				continue
			}
			if prev, ok := owner[ip]; ok && prev != id {
				conflict[ip] = true
			}
			owner[ip] = id
		}
	}
	slices.SortFunc(workloads, func(a, b Workload) int { return cmp.Compare(a.Key(), b.Key()) })
	for _, ip := range sortedAddrs(owner) {
		if conflict[ip] {
			res.Warnings = append(res.Warnings, fmt.Sprintf("address %s belongs to workloads of different identities: judged as an unknown source", ip))
			continue
		}
		res.IPIdentity[ip] = owner[ip]
	}
	c.universe = []identity{{id: UnknownIdentity}}
	for _, id := range sortedIDs(spiffeOf) {
		c.universe = append(c.universe, identity{id: id, spiffe: spiffeOf[id]})
		res.Identities[id] = spiffeOf[id]
	}
	return workloads, nil
}

// policies translates every ALLOW and DENY policy once and lists the others
// in res.Ignored. The result is in namespace/name order.
func (c *compiler) policies(res *Result) []*compiled {
	ps := slices.Clone(c.in.Policies)
	ps = slices.DeleteFunc(ps, func(p *securityv1.AuthorizationPolicy) bool {
		if p == nil {
			res.Warnings = append(res.Warnings, "a null AuthorizationPolicy: ignored")
		}
		return p == nil
	})
	slices.SortStableFunc(ps, func(a, b *securityv1.AuthorizationPolicy) int {
		return cmp.Or(cmp.Compare(a.Namespace, b.Namespace), cmp.Compare(a.Name, b.Name))
	})
	var out []*compiled
	for i, p := range ps {
		key := p.Namespace + "/" + p.Name
		if i > 0 && ps[i-1].Namespace == p.Namespace && ps[i-1].Name == p.Name {
			res.Warnings = append(res.Warnings, fmt.Sprintf("%s: defined twice", key))
		}
		spec := &p.Spec
		ignore := func(why string) { res.Ignored = append(res.Ignored, key+": "+why) }
		var action Action
		switch spec.GetAction() {
		case securityv1beta1.AuthorizationPolicy_ALLOW:
			action = Allow
		case securityv1beta1.AuthorizationPolicy_DENY:
			action = Deny
		case securityv1beta1.AuthorizationPolicy_CUSTOM:
			ignore("CUSTOM action: enforced by the sidecar's external authorizer only")
			continue
		case securityv1beta1.AuthorizationPolicy_AUDIT:
			ignore("AUDIT action: never allows or denies")
			continue
		default:
			ignore(fmt.Sprintf("unknown action %d: Istio ignores the policy", spec.GetAction()))
			continue
		}
		if v, ok := p.Annotations[dryRunAnnotation]; ok {
			if dry, err := strconv.ParseBool(v); err == nil && dry {
				ignore("dry-run: the sidecar only logs what it would do")
				continue
			}
		}
		if err := validate(spec); err != nil {
			if action == Deny {
				ignore(fmt.Sprintf("%v: %s; the kernel does not enforce it", ErrInvalidPolicy, oneLine(err)))
				continue
			}
			out = append(out, &compiled{p: p, idx: i, key: key, action: action, invalid: err})
			continue
		}
		if len(targetRefs(spec)) > 0 && !c.in.ServiceTargetRefs {
			ignore("targetRefs: Istio's sidecars ignore policies attached by targetRefs (Service attachment is for waypoints)")
			continue
		}
		cp := c.translate(p, key, action)
		cp.idx = i
		out = append(out, cp)
	}
	return out
}

// oneLine is the message of an errors.Join on one line.
func oneLine(err error) string { return strings.ReplaceAll(err.Error(), "\n", "; ") }

// targetRefs is the policy's targetRefs or, without them, its legacy
// targetRef (Istio's GetTargetRefs).
func targetRefs(spec *securityv1beta1.AuthorizationPolicy) []*typev1beta1.PolicyTargetReference {
	refs := spec.GetTargetRefs()
	if len(refs) == 0 && spec.GetTargetRef() != nil {
		refs = []*typev1beta1.PolicyTargetReference{spec.GetTargetRef()}
	}
	return refs
}

// scope is whether a policy applies to a workload; maybeInScope when it
// depends on labels the workload did not come with.
type scope uint8

const (
	outOfScope scope = iota
	inScope
	maybeInScope
)

// applies reports whether p is in w's scope: Istio's
// AuthorizationPolicies.ListAuthorizationPolicies and
// WorkloadPolicyMatcher.ShouldAttachPolicy for a sidecar workload, plus the
// Service attachment of a waypoint when Input.ServiceTargetRefs is set.
func (c *compiler) applies(p *securityv1.AuthorizationPolicy, w Workload) scope {
	in := c.appliesByLabels(p, w)
	if w.LabelsUnknown && in == byLabels {
		return maybeInScope
	}
	if in == byLabels {
		return inScope
	}
	return in
}

// byLabels: the policy applies if the workload's labels match.
const byLabels scope = 255

func (c *compiler) appliesByLabels(p *securityv1.AuthorizationPolicy, w Workload) scope {
	if p.Namespace != c.in.RootNamespace && p.Namespace != w.Namespace {
		return outOfScope
	}
	spec := &p.Spec
	if refs := targetRefs(spec); len(refs) > 0 {
		if !c.in.ServiceTargetRefs || p.Namespace != w.Namespace {
			return outOfScope
		}
		for _, r := range refs {
			if r.GetKind() != "Service" || (r.GetGroup() != "" && r.GetGroup() != "core") ||
				(r.GetNamespace() != "" && r.GetNamespace() != p.Namespace) {
				continue
			}
			svc, ok := c.services[p.Namespace+"/"+r.GetName()]
			if ok && len(svc.Selector) > 0 && (w.LabelsUnknown || subset(svc.Selector, w.Labels)) {
				return byLabels
			}
		}
		return outOfScope
	}
	sel := spec.GetSelector().GetMatchLabels()
	switch {
	case len(sel) == 0:
		return inScope
	case w.LabelsUnknown || subset(sel, w.Labels):
		return byLabels
	}
	return outOfScope
}

func subset(want, have map[string]string) bool {
	for k, v := range want {
		if hv, ok := have[k]; !ok || hv != v {
			return false
		}
	}
	return true
}

// cond is a conjunction of L4 conditions on a connection, before it is
// resolved into an atom.
type cond struct {
	ids     []idPred
	ipAny   [][]netip.Prefix // each group ORed, groups ANDed
	ipNone  []netip.Prefix
	portIn  [][]uint16 // each group ORed, groups ANDed
	portNot []uint16
}

// idPred is one identity field or when key: in holds, per member of the
// universe, whether one of the values matches; negate is for the not- form.
type idPred struct {
	desc   string
	in     []bool
	negate bool
}

func (c cond) and(o cond) cond {
	return cond{
		ids:     append(slices.Clone(c.ids), o.ids...),
		ipAny:   append(slices.Clone(c.ipAny), o.ipAny...),
		ipNone:  append(slices.Clone(c.ipNone), o.ipNone...),
		portIn:  append(slices.Clone(c.portIn), o.portIn...),
		portNot: append(slices.Clone(c.portNot), o.portNot...),
	}
}

// matcherKind names the identity matchers; with the policy namespace (for
// service accounts) and the value it keys the match cache.
type matcherKind string

const (
	principalKind      matcherKind = "principals"
	namespaceKind      matcherKind = "namespaces"
	serviceAccountKind matcherKind = "serviceAccounts"
	trustDomainKind    matcherKind = "trustDomains"
)

// matches returns, per member of the universe, whether value matches it.
// Values repeat across rules and policies, and a regular expression per
// identity is costly, so results are cached.
func (c *compiler) matches(kind matcherKind, ns, value string) []bool {
	if kind != serviceAccountKind {
		ns = "" // only a service account depends on the policy's namespace
	}
	key := string(kind) + "\x00" + ns + "\x00" + value
	if in, ok := c.matchCache[key]; ok {
		return in
	}
	var m idMatcher
	switch kind {
	case principalKind:
		m = principalMatcher(value)
	case namespaceKind:
		m = namespaceMatcher(value)
	case serviceAccountKind:
		m = serviceAccountMatcher(ns, value)
	case trustDomainKind:
		m = trustDomainMatcher(value)
	}
	in := make([]bool, len(c.universe))
	for i, u := range c.universe {
		in[i] = m(u.spiffe)
	}
	c.matchCache[key] = in
	return in
}

// identityField adds the condition of one identity field (values and
// not-values) to k.
func (c *compiler) identityField(k *cond, name string, kind matcherKind, ns string, values, notValues []string) {
	union := func(vs []string) []bool {
		out := make([]bool, len(c.universe))
		for _, v := range vs {
			for i, m := range c.matches(kind, ns, v) {
				out[i] = out[i] || m
			}
		}
		return out
	}
	if len(values) > 0 {
		k.ids = append(k.ids, idPred{desc: fmt.Sprintf("%s [%s]", name, strings.Join(values, ", ")), in: union(values)})
	}
	if len(notValues) > 0 {
		k.ids = append(k.ids, idPred{desc: fmt.Sprintf("not %s [%s]", name, strings.Join(notValues, ", ")), in: union(notValues), negate: true})
	}
}

// ipField adds an address condition; the values were validated.
func (c *cond) ipField(values, notValues []string) {
	if len(values) > 0 {
		c.ipAny = append(c.ipAny, mustPrefixes(values))
	}
	c.ipNone = append(c.ipNone, mustPrefixes(notValues)...)
}

// portField adds a port condition; the values were validated.
func (c *cond) portField(values, notValues []string) {
	if len(values) > 0 {
		c.portIn = append(c.portIn, mustPorts(values))
	}
	c.portNot = append(c.portNot, mustPorts(notValues)...)
}

func mustPrefixes(vs []string) []netip.Prefix {
	out := make([]netip.Prefix, 0, len(vs))
	for _, v := range vs {
		p, err := parseIPBlock(v)
		if err != nil {
			panic(fmt.Sprintf("policy: unvalidated address %q", v))
		}
		out = append(out, p)
	}
	return out
}

func mustPorts(vs []string) []uint16 {
	out := make([]uint16, 0, len(vs))
	for _, v := range vs {
		p, err := parsePort(v)
		if err != nil {
			panic(fmt.Sprintf("policy: unvalidated port %q", v))
		}
		out = append(out, p)
	}
	return out
}

// l4WhenKeys are the when keys the kernel can judge. The others need the
// request (HTTP, JWT, TLS SNI, filter metadata) or an address other than the
// connection's source (remote.ip, destination.ip).
var l4WhenKeys = map[string]bool{
	"source.ip": true, "source.namespace": true, "source.principal": true,
	"source.serviceAccount": true, "source.trustDomain": true, "destination.port": true,
}

func sourceL7(s *securityv1beta1.Source) []string {
	var out []string
	for _, f := range []struct {
		name string
		n    int
	}{
		{"requestPrincipals", len(s.GetRequestPrincipals())}, {"notRequestPrincipals", len(s.GetNotRequestPrincipals())},
		{"remoteIpBlocks", len(s.GetRemoteIpBlocks())}, {"notRemoteIpBlocks", len(s.GetNotRemoteIpBlocks())},
	} {
		if f.n > 0 {
			out = append(out, f.name)
		}
	}
	return out
}

func operationL7(o *securityv1beta1.Operation) []string {
	var out []string
	for _, f := range []struct {
		name string
		n    int
	}{
		{"hosts", len(o.GetHosts())}, {"notHosts", len(o.GetNotHosts())},
		{"methods", len(o.GetMethods())}, {"notMethods", len(o.GetNotMethods())},
		{"paths", len(o.GetPaths())}, {"notPaths", len(o.GetNotPaths())},
	} {
		if f.n > 0 {
			out = append(out, f.name)
		}
	}
	return out
}

// source is the L4 condition of a from.source (L7 fields are not read).
func (c *compiler) source(ns string, s *securityv1beta1.Source) cond {
	var k cond
	c.identityField(&k, "principals", principalKind, ns, c.tds.rewritePrincipals(s.GetPrincipals()), c.tds.rewritePrincipals(s.GetNotPrincipals()))
	c.identityField(&k, "namespaces", namespaceKind, ns, s.GetNamespaces(), s.GetNotNamespaces())
	c.identityField(&k, "serviceAccounts", serviceAccountKind, ns, s.GetServiceAccounts(), s.GetNotServiceAccounts())
	c.identityField(&k, "trustDomains", trustDomainKind, ns, c.tds.expandTrustDomains(s.GetTrustDomains()), c.tds.expandTrustDomains(s.GetNotTrustDomains()))
	k.ipField(s.GetIpBlocks(), s.GetNotIpBlocks())
	return k
}

// when is the L4 condition of one when entry with an L4 key.
func (c *compiler) when(ns string, w *securityv1beta1.Condition) cond {
	var k cond
	vs, nvs := w.GetValues(), w.GetNotValues()
	switch w.GetKey() {
	case "source.ip":
		k.ipField(vs, nvs)
	case "source.namespace":
		c.identityField(&k, "source.namespace", namespaceKind, ns, vs, nvs)
	case "source.principal":
		c.identityField(&k, "source.principal", principalKind, ns, c.tds.rewritePrincipals(vs), c.tds.rewritePrincipals(nvs))
	case "source.serviceAccount":
		c.identityField(&k, "source.serviceAccount", serviceAccountKind, ns, vs, nvs)
	case "source.trustDomain":
		c.identityField(&k, "source.trustDomain", trustDomainKind, ns, c.tds.expandTrustDomains(vs), c.tds.expandTrustDomains(nvs))
	case "destination.port":
		k.portField(vs, nvs)
	}
	return k
}

// translate turns a valid ALLOW or DENY policy into atoms, applying the
// projection (see the package documentation).
func (c *compiler) translate(p *securityv1.AuthorizationPolicy, key string, action Action) *compiled {
	cp := &compiled{p: p, key: key, action: action}
	spec := &p.Spec
	note := func(format string, args ...any) { cp.notes = append(cp.notes, key+" "+fmt.Sprintf(format, args...)) }
	for ri, rule := range spec.GetRules() {
		var base cond
		var l7 []string
		for _, w := range rule.GetWhen() {
			if l4WhenKeys[w.GetKey()] {
				base = base.and(c.when(p.Namespace, w))
			} else {
				l7 = append(l7, w.GetKey())
			}
		}
		if len(l7) > 0 {
			if action == Deny {
				note("rule %d: when %s: not visible in the kernel, the rule is not enforced", ri, strings.Join(l7, ", "))
				continue
			}
			note("rule %d: when %s: not visible in the kernel, dropped (the kernel allows more)", ri, strings.Join(l7, ", "))
		}

		type part struct {
			idx int
			k   cond
		}
		sources := []part{{idx: -1}}
		if len(rule.GetFrom()) > 0 {
			sources = nil
		}
		for si, from := range rule.GetFrom() {
			s := from.GetSource()
			if l7 := sourceL7(s); len(l7) > 0 {
				if action == Deny {
					note("rule %d source %d: %s: not visible in the kernel, not enforced", ri, si, strings.Join(l7, ", "))
					continue
				}
				note("rule %d source %d: %s: not visible in the kernel, dropped (the kernel allows more)", ri, si, strings.Join(l7, ", "))
			}
			sources = append(sources, part{idx: si, k: c.source(p.Namespace, s)})
		}
		ops := []part{{idx: -1}}
		if len(rule.GetTo()) > 0 {
			ops = nil
		}
		for oi, to := range rule.GetTo() {
			o := to.GetOperation()
			if l7 := operationL7(o); len(l7) > 0 {
				if action == Deny {
					note("rule %d operation %d: %s: not visible in the kernel, not enforced", ri, oi, strings.Join(l7, ", "))
					continue
				}
				note("rule %d operation %d: %s: not visible in the kernel, dropped (the kernel allows more)", ri, oi, strings.Join(l7, ", "))
			}
			var k cond
			k.portField(o.GetPorts(), o.GetNotPorts())
			ops = append(ops, part{idx: oi, k: k})
		}
		for _, s := range sources {
			for _, o := range ops {
				a, ok := c.atom(base.and(s.k).and(o.k), action)
				if !ok {
					note("rule %d source %d operation %d: matches no connection: no atom", ri, s.idx, o.idx)
					continue
				}
				a.Action, a.Policy, a.Rule, a.Source, a.Operation = action, key, ri, s.idx, o.idx
				cp.atoms = append(cp.atoms, a)
			}
		}
	}
	return cp
}

// atom resolves a condition over the identity universe and normalizes its
// address and port parts; ok is false when it can match nothing.
//
// The unknown source is the exception to resolving: the kernel does not
// know which certificate it will present to the sidecar, so an identity
// condition can neither be taken as true nor as false for it. An ALLOW atom
// matches it whatever its identity conditions say (the kernel allows what
// some identity would be allowed), a DENY atom only when it has none (the
// kernel denies only what every identity would be denied). Its address and
// port conditions still apply.
func (c *compiler) atom(k cond, action Action) (a Atom, ok bool) {
	for i, u := range c.universe {
		match := true
		if u.id == UnknownIdentity {
			match = action == Allow || len(k.ids) == 0
		}
		for _, p := range k.ids {
			if u.id == UnknownIdentity {
				break
			}
			if p.in[i] == p.negate {
				match = false
				break
			}
		}
		if match {
			a.Identities = append(a.Identities, u.id)
		}
	}
	if len(a.Identities) == 0 {
		return a, false
	}

	a.NotIPs = coverSet(k.ipNone)
	if len(k.ipAny) > 0 {
		in := coverSet(k.ipAny[0])
		for _, g := range k.ipAny[1:] {
			in = intersect(in, g)
		}
		// Positive prefixes inside an excluded one can never match.
		in = slices.DeleteFunc(in, func(p netip.Prefix) bool {
			return slices.ContainsFunc(a.NotIPs, func(n netip.Prefix) bool { return contains(n, p) })
		})
		if len(in) == 0 {
			return a, false
		}
		// Exclusions outside every positive prefix change nothing.
		a.NotIPs = slices.DeleteFunc(a.NotIPs, func(n netip.Prefix) bool {
			return !slices.ContainsFunc(in, func(p netip.Prefix) bool { return p.Overlaps(n) })
		})
		a.IPs = in
	} else if slices.Contains(a.NotIPs, netip.MustParsePrefix("0.0.0.0/0")) && slices.Contains(a.NotIPs, netip.MustParsePrefix("::/0")) {
		return a, false
	}
	if len(a.NotIPs) == 0 {
		a.NotIPs = nil
	}

	not := sortedPorts(k.portNot)
	switch {
	case len(k.portIn) > 0:
		in := sortedPorts(k.portIn[0])
		for _, g := range k.portIn[1:] {
			g := sortedPorts(g)
			in = slices.DeleteFunc(in, func(p uint16) bool { _, found := slices.BinarySearch(g, p); return !found })
		}
		in = slices.DeleteFunc(in, func(p uint16) bool { _, found := slices.BinarySearch(not, p); return found })
		if len(in) == 0 {
			return a, false
		}
		a.PortMatch, a.Ports = InPorts, in
	case len(not) == 1<<16:
		return a, false
	case len(not) > 0:
		a.PortMatch, a.Ports = NotInPorts, not
	}

	a.IdentityDesc = c.describeIdentities(a.Identities, k.ids)
	a.IPDesc = describeIPs(a.IPs, a.NotIPs)
	a.PortDesc = describePorts(a.PortMatch, a.Ports)
	return a, true
}

func sortedPorts(ps []uint16) []uint16 {
	out := slices.Clone(ps)
	slices.Sort(out)
	return slices.Compact(out)
}

// coverSet returns the prefixes of ps that no other prefix of ps contains,
// sorted: the same set of addresses, with fewer entries.
func coverSet(ps []netip.Prefix) []netip.Prefix {
	out := slices.Clone(ps)
	slices.SortFunc(out, comparePrefix)
	out = slices.Compact(out)
	var keep []netip.Prefix
	for _, p := range out {
		if !coveredBy(p, out) {
			keep = append(keep, p)
		}
	}
	return keep
}

// coveredBy reports whether a prefix of set other than p itself contains p.
func coveredBy(p netip.Prefix, set []netip.Prefix) bool {
	for _, q := range set {
		if q != p && contains(q, p) {
			return true
		}
	}
	return false
}

// contains reports whether q contains all of p (same family only).
func contains(q, p netip.Prefix) bool {
	return q.Addr().Is4() == p.Addr().Is4() && q.Bits() <= p.Bits() && q.Contains(p.Addr())
}

// intersect returns the addresses in both a and b as a cover set: two
// prefixes intersect in the longer one, when they overlap.
func intersect(a, b []netip.Prefix) []netip.Prefix {
	var out []netip.Prefix
	for _, p := range a {
		for _, q := range b {
			switch {
			case contains(p, q):
				out = append(out, q)
			case contains(q, p):
				out = append(out, p)
			}
		}
	}
	return coverSet(out)
}

func comparePrefix(a, b netip.Prefix) int {
	return cmp.Or(a.Addr().Compare(b.Addr()), cmp.Compare(a.Bits(), b.Bits()))
}

func sortedAddrs[V any](m map[netip.Addr]V) []netip.Addr {
	out := make([]netip.Addr, 0, len(m))
	for a := range m {
		out = append(out, a)
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return out
}

// set builds the PolicySet of a workload from its DENY then ALLOW policies.
func (c *compiler) set(chosen []*compiled, hasAllow bool) PolicySet {
	var atoms []Atom
	var notes []string
	for _, cp := range chosen {
		atoms = append(atoms, cp.atoms...)
		notes = append(notes, cp.notes...)
	}
	s := buildMasks(atoms, hasAllow, c.universe)
	s.NotEnforced = notes
	return s
}

// policyIndex narrows, for a workload, the policies that may apply to it to
// those of its namespace and the root namespace whose selector could match
// its labels (policies whose selector certainly does not are left out;
// compiler.applies still decides every candidate). With 1,000 policies and
// 5,500 workloads, matching all against all was most of a compile
// (docs/kubernetes-scale.md, BenchmarkCompileScale).
type policyIndex struct {
	root string
	// all holds every policy of a namespace, for workloads whose labels
	// are unknown; always those without a label selector (none: every
	// workload; targetRefs); byLabel the others, under one "key=value" of
	// their selector (its smallest key), which a match needs.
	all, always map[string][]int
	byLabel     map[string]map[string][]int
}

func indexPolicies(policies []*compiled, root string) policyIndex {
	ix := policyIndex{root: root, all: map[string][]int{}, always: map[string][]int{}, byLabel: map[string]map[string][]int{}}
	for i, cp := range policies {
		ns := cp.p.Namespace
		ix.all[ns] = append(ix.all[ns], i)
		sel := cp.p.Spec.GetSelector().GetMatchLabels()
		if len(targetRefs(&cp.p.Spec)) > 0 || len(sel) == 0 {
			ix.always[ns] = append(ix.always[ns], i)
			continue
		}
		k := slices.Min(slices.Collect(maps.Keys(sel)))
		if ix.byLabel[ns] == nil {
			ix.byLabel[ns] = map[string][]int{}
		}
		ix.byLabel[ns][k+"="+sel[k]] = append(ix.byLabel[ns][k+"="+sel[k]], i)
	}
	return ix
}

// candidates are the indexes, in order, of the policies that may apply to
// w.
func (ix policyIndex) candidates(w Workload) []int {
	var out []int
	namespaces := []string{w.Namespace}
	if w.Namespace != ix.root {
		namespaces = append(namespaces, ix.root)
	}
	for _, ns := range namespaces {
		if w.LabelsUnknown {
			out = append(out, ix.all[ns]...)
			continue
		}
		out = append(out, ix.always[ns]...)
		if byLabel := ix.byLabel[ns]; byLabel != nil {
			for k, v := range w.Labels {
				out = append(out, byLabel[k+"="+v]...)
			}
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}
