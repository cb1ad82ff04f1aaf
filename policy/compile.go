package policy

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	securityv1beta1 "istio.io/api/security/v1beta1"
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
		in:       in,
		tds:      append(trustDomains{in.TrustDomain}, in.TrustDomainAliases...),
		services: map[string]Service{},
	}
	res := Result{
		WorkloadSet: map[string]int{},
		Unenforced:  map[string]error{},
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

	memo := map[string]int{} // applicable policies -> set
	for _, w := range workloads {
		key := w.Key()
		var deny, allow []*compiled
		var bad []string
		for _, cp := range policies {
			if !c.applies(cp.p, w) {
				continue
			}
			switch {
			case cp.invalid != nil:
				bad = append(bad, fmt.Sprintf("%s: %v", cp.key, cp.invalid))
			case cp.action == Deny:
				deny = append(deny, cp)
			default:
				allow = append(allow, cp)
			}
		}
		res.WorkloadSet[key] = -1
		if len(bad) > 0 {
			res.Unenforced[key] = fmt.Errorf("%w: ALLOW %s", ErrInvalidPolicy, strings.Join(bad, "; "))
			continue
		}
		if len(deny)+len(allow) == 0 {
			continue
		}
		chosen := slices.Concat(deny, allow)
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
	workloads := slices.Clone(c.in.Workloads)
	seen := map[string]bool{}
	spiffeOf := map[IdentityID]string{}
	owner := map[netip.Addr]IdentityID{}
	conflict := map[netip.Addr]bool{}
	for i := range workloads {
		w := &workloads[i]
		if w.Namespace == "" || w.Name == "" {
			return nil, fmt.Errorf("%w: workload %q without namespace or name", ErrInvalidInput, w.Key())
		}
		if seen[w.Key()] {
			return nil, fmt.Errorf("%w: two workloads named %s", ErrInvalidInput, w.Key())
		}
		seen[w.Key()] = true
		if w.ServiceAccount == "" {
			w.ServiceAccount = "default"
		}
		spiffe := SPIFFEID(c.in.TrustDomain, w.Namespace, w.ServiceAccount)
		id := ids.ID(spiffe)
		if id == UnknownIdentity {
			return nil, fmt.Errorf("%w: identity allocator gave no number to %s", ErrInvalidInput, spiffe)
		}
		if other, ok := spiffeOf[id]; ok && other != spiffe {
			return nil, fmt.Errorf("%w: identity allocator gave %d to both %s and %s", ErrInvalidInput, id, other, spiffe)
		}
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
				ignore(fmt.Sprintf("%v: %v; the kernel does not enforce it", ErrInvalidPolicy, err))
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

func targetRefs(spec *securityv1beta1.AuthorizationPolicy) []string {
	refs := spec.GetTargetRefs()
	if len(refs) == 0 && spec.GetTargetRef() != nil {
		refs = append(refs, spec.GetTargetRef())
	}
	var out []string
	for _, r := range refs {
		out = append(out, r.GetGroup()+"/"+r.GetKind()+"/"+r.GetName())
	}
	return out
}

// applies reports whether p is in w's scope: Istio's
// AuthorizationPolicies.ListAuthorizationPolicies and
// WorkloadPolicyMatcher.ShouldAttachPolicy for a sidecar workload, plus the
// Service attachment of a waypoint when Input.ServiceTargetRefs is set.
func (c *compiler) applies(p *securityv1.AuthorizationPolicy, w Workload) bool {
	if p.Namespace != c.in.RootNamespace && p.Namespace != w.Namespace {
		return false
	}
	spec := &p.Spec
	refs := spec.GetTargetRefs()
	if len(refs) == 0 && spec.GetTargetRef() != nil {
		refs = append(refs, spec.GetTargetRef())
	}
	if len(refs) > 0 {
		if !c.in.ServiceTargetRefs || p.Namespace != w.Namespace {
			return false
		}
		for _, r := range refs {
			if r.GetKind() != "Service" || (r.GetGroup() != "" && r.GetGroup() != "core") ||
				(r.GetNamespace() != "" && r.GetNamespace() != p.Namespace) {
				continue
			}
			svc, ok := c.services[p.Namespace+"/"+r.GetName()]
			if ok && len(svc.Selector) > 0 && subset(svc.Selector, w.Labels) {
				return true
			}
		}
		return false
	}
	sel := spec.GetSelector()
	return sel == nil || subset(sel.GetMatchLabels(), w.Labels)
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

type idPred struct {
	desc   string
	match  idMatcher
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

// identityField adds the condition of one identity field (values and
// not-values) to c.
func (c *cond) identityField(name string, values, notValues []string, matcher func(string) idMatcher) {
	mk := func(vs []string) idMatcher {
		ms := make([]idMatcher, len(vs))
		for i, v := range vs {
			ms[i] = matcher(v)
		}
		return anyOf(ms)
	}
	if len(values) > 0 {
		c.ids = append(c.ids, idPred{desc: fmt.Sprintf("%s [%s]", name, strings.Join(values, ", ")), match: mk(values)})
	}
	if len(notValues) > 0 {
		c.ids = append(c.ids, idPred{desc: fmt.Sprintf("not %s [%s]", name, strings.Join(notValues, ", ")), match: mk(notValues), negate: true})
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

// The fields and when keys the kernel cannot see: they need the request
// (HTTP, JWT, TLS SNI) or an address other than the connection's source.
var (
	l4WhenKeys = map[string]bool{
		"source.ip": true, "source.namespace": true, "source.principal": true,
		"source.serviceAccount": true, "source.trustDomain": true, "destination.port": true,
	}
)

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
	k.identityField("principals", c.tds.rewritePrincipals(s.GetPrincipals()), c.tds.rewritePrincipals(s.GetNotPrincipals()), principalMatcher)
	k.identityField("namespaces", s.GetNamespaces(), s.GetNotNamespaces(), namespaceMatcher)
	k.identityField("serviceAccounts", s.GetServiceAccounts(), s.GetNotServiceAccounts(), func(v string) idMatcher { return serviceAccountMatcher(ns, v) })
	k.identityField("trustDomains", c.tds.expandTrustDomains(s.GetTrustDomains()), c.tds.expandTrustDomains(s.GetNotTrustDomains()), trustDomainMatcher)
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
		k.identityField("source.namespace", vs, nvs, namespaceMatcher)
	case "source.principal":
		k.identityField("source.principal", c.tds.rewritePrincipals(vs), c.tds.rewritePrincipals(nvs), principalMatcher)
	case "source.serviceAccount":
		k.identityField("source.serviceAccount", vs, nvs, func(v string) idMatcher { return serviceAccountMatcher(ns, v) })
	case "source.trustDomain":
		k.identityField("source.trustDomain", c.tds.expandTrustDomains(vs), c.tds.expandTrustDomains(nvs), trustDomainMatcher)
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
				note("rule %d: when %s is not visible in the kernel: the rule is not enforced", ri, strings.Join(l7, ", "))
				continue
			}
			note("rule %d: when %s dropped: allowed for its L4 part", ri, strings.Join(l7, ", "))
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
					note("rule %d source %d: %s is not visible in the kernel: not enforced", ri, si, strings.Join(l7, ", "))
					continue
				}
				note("rule %d source %d: %s dropped: allowed for its L4 part", ri, si, strings.Join(l7, ", "))
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
					note("rule %d operation %d: %s is not visible in the kernel: not enforced", ri, oi, strings.Join(l7, ", "))
					continue
				}
				note("rule %d operation %d: %s dropped: allowed for its L4 part", ri, oi, strings.Join(l7, ", "))
			}
			var k cond
			k.portField(o.GetPorts(), o.GetNotPorts())
			ops = append(ops, part{idx: oi, k: k})
		}
		for _, s := range sources {
			for _, o := range ops {
				a, ok := c.atom(base.and(s.k).and(o.k))
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
func (c *compiler) atom(k cond) (a Atom, ok bool) {
	for _, u := range c.universe {
		match := true
		for _, p := range k.ids {
			if p.match(u.spiffe) == p.negate {
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
