package policy

import (
	"net/netip"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"

	securityv1beta1 "istio.io/api/security/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
)

// refEvaluator is a second, direct implementation of Istio's L4
// authorization semantics with the kernel projection: it walks the policies
// for one connection, with no atoms, sets or masks. The property and fuzz
// tests hold Compile's masks to it.
//
// It shares with Compile only validate (which policies Istio accepts) and
// the trust domain rewriting (istiod's alias bundle); scope, rule
// structure, projection, the identity matchers, addresses and ports are
// written again here, in the shape of Istio's own evaluation.
type refEvaluator struct {
	in       Input
	tds      trustDomains
	services map[string]Service
}

func newRefEvaluator(in Input) *refEvaluator {
	if in.TrustDomain == "" {
		in.TrustDomain = DefaultTrustDomain
	}
	if in.RootNamespace == "" {
		in.RootNamespace = DefaultRootNamespace
	}
	r := &refEvaluator{in: in, tds: append(trustDomains{in.TrustDomain}, in.TrustDomainAliases...), services: map[string]Service{}}
	for _, s := range in.Services {
		r.services[s.Namespace+"/"+s.Name] = s
	}
	return r
}

// refRequest is one connection: its source identity ("" for a source that is
// not a known pod), source address and destination port.
type refRequest struct {
	spiffe string
	ip     netip.Addr
	port   uint16
}

// verdict is what the kernel must decide for a connection to dst: Istio's
// CUSTOM-DENY-ALLOW order without CUSTOM; DENY rules only where they are
// pure L4; ALLOW rules with their L7 parts dropped; every workload an
// invalid ALLOW policy selects left unenforced (allowed).
//
// When dst's labels are unknown, a policy that selects by labels may or may
// not apply: such a DENY is left out, such an ALLOW counts only next to an
// ALLOW that surely applies (alone it would make the default deny).
func (r *refEvaluator) verdict(dst Workload, req refRequest) bool {
	var allow, deny, maybeAllow []*securityv1.AuthorizationPolicy
	for _, p := range r.in.Policies {
		if p == nil || !r.inScope(p, dst) {
			continue
		}
		if v, err := strconv.ParseBool(p.Annotations["istio.io/dry-run"]); err == nil && v {
			continue
		}
		maybe := dst.LabelsUnknown && (len(p.Spec.GetSelector().GetMatchLabels()) > 0 ||
			len(p.Spec.GetTargetRefs()) > 0 || p.Spec.GetTargetRef() != nil)
		switch p.Spec.GetAction() {
		case securityv1beta1.AuthorizationPolicy_ALLOW:
			if validate(&p.Spec) != nil {
				return true
			}
			if maybe {
				maybeAllow = append(maybeAllow, p)
			} else {
				allow = append(allow, p)
			}
		case securityv1beta1.AuthorizationPolicy_DENY:
			if validate(&p.Spec) == nil && !maybe {
				deny = append(deny, p)
			}
		}
	}
	if len(allow) > 0 {
		allow = append(allow, maybeAllow...)
	}
	for _, p := range deny {
		for _, rule := range p.Spec.GetRules() {
			if r.ruleMatches(p.Namespace, rule, true, req) {
				return false
			}
		}
	}
	if len(allow) == 0 {
		return true
	}
	for _, p := range allow {
		for _, rule := range p.Spec.GetRules() {
			if r.ruleMatches(p.Namespace, rule, false, req) {
				return true
			}
		}
	}
	return false
}

func (r *refEvaluator) inScope(p *securityv1.AuthorizationPolicy, w Workload) bool {
	if p.Namespace != w.Namespace && p.Namespace != r.in.RootNamespace {
		return false
	}
	refs := p.Spec.GetTargetRefs()
	if len(refs) == 0 && p.Spec.GetTargetRef() != nil {
		refs = append(refs, p.Spec.GetTargetRef())
	}
	if len(refs) == 0 {
		if w.LabelsUnknown {
			return true // maybe: verdict decides
		}
		for k, v := range p.Spec.GetSelector().GetMatchLabels() {
			if got, ok := w.Labels[k]; !ok || got != v {
				return false
			}
		}
		return true
	}
	if !r.in.ServiceTargetRefs || p.Namespace != w.Namespace {
		return false // sidecars ignore targetRefs
	}
	for _, ref := range refs {
		if ref.GetKind() != "Service" || !(ref.GetGroup() == "" || ref.GetGroup() == "core") {
			continue
		}
		if ref.GetNamespace() != "" && ref.GetNamespace() != p.Namespace {
			continue
		}
		svc, ok := r.services[p.Namespace+"/"+ref.GetName()]
		if !ok || len(svc.Selector) == 0 {
			continue
		}
		selected := true
		for k, v := range svc.Selector {
			if w.LabelsUnknown {
				break
			}
			if got, ok := w.Labels[k]; !ok || got != v {
				selected = false
			}
		}
		if selected {
			return true
		}
	}
	return false
}

// ruleMatches: from, to and when ANDed; sources ORed, operations ORed. For a
// DENY rule, a part the kernel cannot see (an L7 when, or a source or
// operation with an L7 field) cannot match; for an ALLOW rule the L7 fields
// are skipped as if absent.
func (r *refEvaluator) ruleMatches(ns string, rule *securityv1beta1.Rule, isDeny bool, req refRequest) bool {
	for _, w := range rule.GetWhen() {
		switch w.GetKey() {
		case "source.ip", "source.namespace", "source.principal", "source.serviceAccount", "source.trustDomain", "destination.port":
			if !r.whenHolds(ns, w, isDeny, req) {
				return false
			}
		default:
			if isDeny {
				return false
			}
		}
	}
	return anyPart(rule.GetFrom(), func(f *securityv1beta1.Rule_From) bool {
		s := f.GetSource()
		if isDeny && len(s.RequestPrincipals)+len(s.NotRequestPrincipals)+len(s.RemoteIpBlocks)+len(s.NotRemoteIpBlocks) > 0 {
			return false
		}
		return r.sourceHolds(ns, s, isDeny, req)
	}) && anyPart(rule.GetTo(), func(t *securityv1beta1.Rule_To) bool {
		o := t.GetOperation()
		if isDeny && len(o.Hosts)+len(o.NotHosts)+len(o.Methods)+len(o.NotMethods)+len(o.Paths)+len(o.NotPaths) > 0 {
			return false
		}
		return refPortIn(o.Ports, req.port, true) && !refPortIn(o.NotPorts, req.port, false)
	})
}

// anyPart: a rule's from (or to) holds when it is empty or one of its
// sources (operations) holds.
func anyPart[T any](parts []T, holds func(T) bool) bool {
	return len(parts) == 0 || slices.ContainsFunc(parts, holds)
}

// sourceHolds: for a source the kernel does not know (spiffe ""), an
// identity field holds in an ALLOW rule (some certificate could satisfy it)
// and fails in a DENY rule (some certificate could escape it).
func (r *refEvaluator) sourceHolds(ns string, s *securityv1beta1.Source, isDeny bool, req refRequest) bool {
	p := req.spiffe
	if p == "" && len(s.Principals)+len(s.NotPrincipals)+len(s.Namespaces)+len(s.NotNamespaces)+
		len(s.ServiceAccounts)+len(s.NotServiceAccounts)+len(s.TrustDomains)+len(s.NotTrustDomains) > 0 && isDeny {
		return false
	}
	if p == "" {
		return refIPIn(s.IpBlocks, req.ip, true) && !refIPIn(s.NotIpBlocks, req.ip, false)
	}
	return refField(r.tds.rewritePrincipals(s.Principals), r.tds.rewritePrincipals(s.NotPrincipals), p, refPrincipalRegex) &&
		refField(s.Namespaces, s.NotNamespaces, p, refNamespaceRegex) &&
		refField(s.ServiceAccounts, s.NotServiceAccounts, p, func(v string) string { return refServiceAccountRegex(ns, v) }) &&
		refField(r.tds.expandTrustDomains(s.TrustDomains), r.tds.expandTrustDomains(s.NotTrustDomains), p, refTrustDomainRegex) &&
		refIPIn(s.IpBlocks, req.ip, true) && !refIPIn(s.NotIpBlocks, req.ip, false)
}

func (r *refEvaluator) whenHolds(ns string, w *securityv1beta1.Condition, isDeny bool, req refRequest) bool {
	vs, nvs, p := w.GetValues(), w.GetNotValues(), req.spiffe
	switch w.GetKey() {
	case "source.namespace", "source.principal", "source.serviceAccount", "source.trustDomain":
		if p == "" && len(vs)+len(nvs) > 0 {
			return !isDeny // see sourceHolds
		}
	}
	switch w.GetKey() {
	case "source.ip":
		return refIPIn(vs, req.ip, true) && !refIPIn(nvs, req.ip, false)
	case "destination.port":
		return refPortIn(vs, req.port, true) && !refPortIn(nvs, req.port, false)
	case "source.namespace":
		return refField(vs, nvs, p, refNamespaceRegex)
	case "source.principal":
		return refField(r.tds.rewritePrincipals(vs), r.tds.rewritePrincipals(nvs), p, refPrincipalRegex)
	case "source.serviceAccount":
		return refField(vs, nvs, p, func(v string) string { return refServiceAccountRegex(ns, v) })
	case "source.trustDomain":
		return refField(r.tds.expandTrustDomains(vs), r.tds.expandTrustDomains(nvs), p, refTrustDomainRegex)
	}
	panic("not an L4 key: " + w.GetKey())
}

// refField is Envoy's principal matching: values ORed, not-values ORed then
// negated, a connection without a peer identity matching no value.
func refField(values, notValues []string, spiffe string, regexOf func(string) string) bool {
	match := func(vs []string) bool {
		if spiffe == "" {
			return false
		}
		for _, v := range vs {
			if refRegexp(regexOf(v)).MatchString(spiffe) {
				return true
			}
		}
		return false
	}
	if len(values) > 0 && !match(values) {
		return false
	}
	return len(notValues) == 0 || !match(notValues)
}

var refRegexps sync.Map // string -> *regexp.Regexp

// refRegexp compiles re for a full match, as Envoy's safe_regex matches.
func refRegexp(re string) *regexp.Regexp {
	if r, ok := refRegexps.Load(re); ok {
		return r.(*regexp.Regexp)
	}
	r := regexp.MustCompile("^(?:" + re + ")$")
	refRegexps.Store(re, r)
	return r
}

// The Envoy matchers istiod generates, all as regular expressions.
func refPrincipalRegex(v string) string {
	switch {
	case v == "*":
		return ".+"
	case strings.HasPrefix(v, "*"):
		return "spiffe://.*" + regexp.QuoteMeta(v[1:])
	case strings.HasSuffix(v, "*"):
		return regexp.QuoteMeta("spiffe://"+v[:len(v)-1]) + ".*"
	}
	return regexp.QuoteMeta("spiffe://" + v)
}

func refNamespaceRegex(v string) string {
	var b strings.Builder
	for i, part := range strings.Split(v, "*") {
		if i > 0 {
			b.WriteString(".*")
		}
		b.WriteString(regexp.QuoteMeta(part))
	}
	return ".*/ns/" + b.String() + "/.*"
}

func refServiceAccountRegex(policyNS, v string) string {
	ns, sa := policyNS, v
	if i := strings.Index(v, "/"); i >= 0 {
		ns, sa = v[:i], v[i+1:]
	}
	return "spiffe://.+/ns/" + regexp.QuoteMeta(ns) + "/(.+/|)sa/" + regexp.QuoteMeta(sa) + "(/.+)?"
}

func refTrustDomainRegex(v string) string {
	if v == "*" {
		return "spiffe://.*"
	}
	if i := strings.Index(v, "*"); i >= 0 {
		return "spiffe://" + regexp.QuoteMeta(v[:i]) + "[^/]*" + regexp.QuoteMeta(v[i+1:]) + "/.*"
	}
	return regexp.QuoteMeta("spiffe://"+v+"/") + ".*"
}

// refIPIn reports whether ip is in one of the blocks; empty is ifEmpty.
func refIPIn(blocks []string, ip netip.Addr, ifEmpty bool) bool {
	if len(blocks) == 0 {
		return ifEmpty
	}
	// Envoy's peer address of an IPv4 connection is IPv4, also on a
	// dual-stack listener, and a CIDR never matches an address of the
	// other family (CidrRange::isInRange), v4-mapped CIDRs included.
	ip = ip.Unmap()
	for _, b := range blocks {
		var p netip.Prefix
		if strings.Contains(b, "/") {
			p = netip.MustParsePrefix(b)
		} else {
			a := netip.MustParseAddr(b)
			p = netip.PrefixFrom(a, a.BitLen())
		}
		if p.Contains(ip) {
			return true
		}
	}
	return false
}

// refPortIn reports whether port is one of ports; empty is ifEmpty.
func refPortIn(ports []string, port uint16, ifEmpty bool) bool {
	if len(ports) == 0 {
		return ifEmpty
	}
	for _, s := range ports {
		if n, err := strconv.ParseUint(s, 10, 32); err == nil && n == uint64(port) {
			return true
		}
	}
	return false
}
