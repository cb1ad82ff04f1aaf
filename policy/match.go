package policy

import (
	"regexp"
	"slices"
	"strings"
)

// This file holds the identity matchers: what istiod turns principals,
// namespaces, serviceAccounts and trustDomains into (Envoy string matchers
// on the peer's URI SAN, "spiffe://td/ns/NS/sa/SA"), evaluated on a SPIFFE
// ID. The empty string is a source without an identity: every matcher fails
// on it.

const spiffePrefix = "spiffe://"

// SPIFFEID is the identity of a workload: spiffe://TD/ns/NS/sa/SA.
func SPIFFEID(trustDomain, namespace, serviceAccount string) string {
	return spiffePrefix + trustDomain + "/ns/" + namespace + "/sa/" + serviceAccount
}

// idMatcher is one value of an identity field: true when the SPIFFE ID
// matches it.
type idMatcher func(spiffe string) bool

// principalMatcher is istiod's StringMatcherWithPrefix(v, "spiffe://"):
// "*" is any identity (regex .+), "*x" a suffix, "x*" a prefix, anything
// else exact; a '*' elsewhere is a literal.
func principalMatcher(v string) idMatcher {
	switch {
	case v == "*":
		return func(s string) bool { return s != "" }
	case strings.HasPrefix(v, "*"):
		suffix := v[1:]
		return func(s string) bool {
			return strings.HasPrefix(s, spiffePrefix) && strings.HasSuffix(s[len(spiffePrefix):], suffix)
		}
	case strings.HasSuffix(v, "*"):
		prefix := spiffePrefix + strings.TrimSuffix(v, "*")
		return func(s string) bool { return strings.HasPrefix(s, prefix) }
	default:
		exact := spiffePrefix + v
		return func(s string) bool { return s == exact }
	}
}

// regexMatcher full-matches re, as Envoy's safe_regex does.
func regexMatcher(re string) idMatcher {
	r := regexp.MustCompile("^(?:" + re + ")$")
	return func(s string) bool { return s != "" && r.MatchString(s) }
}

// namespaceMatcher is istiod's srcNamespaceGenerator: the regex
// ".*/ns/GLOB/.*" over the whole SPIFFE ID, with each '*' of the value
// turned into ".*". A '*' can therefore span '/': "*a" matches every
// identity through its "/sa/" segment. The kernel follows the sidecar.
func namespaceMatcher(v string) idMatcher {
	if !strings.Contains(v, "*") {
		// ".*/ns/NS/.*" is a substring test.
		sub := "/ns/" + v + "/"
		return func(s string) bool { return strings.Contains(s, sub) }
	}
	parts := strings.Split(v, "*")
	for i, p := range parts {
		parts[i] = regexp.QuoteMeta(p)
	}
	return regexMatcher(".*/ns/" + strings.Join(parts, ".*") + "/.*")
}

// serviceAccountMatcher is istiod's serviceAccountRegex: "sa" or "ns/sa",
// the namespace defaulting to the policy's.
func serviceAccountMatcher(policyNamespace, v string) idMatcher {
	ns, sa, ok := strings.Cut(v, "/")
	if !ok {
		ns, sa = policyNamespace, v
	}
	return regexMatcher("spiffe://.+/ns/" + regexp.QuoteMeta(ns) + "/(.+/|)sa/" + regexp.QuoteMeta(sa) + "(/.+)?")
}

// trustDomainMatcher is istiod's srcTrustDomainGenerator.
func trustDomainMatcher(v string) idMatcher {
	switch {
	case v == "*":
		return func(s string) bool { return strings.HasPrefix(s, spiffePrefix) }
	case !strings.Contains(v, "*"):
		prefix := spiffePrefix + v + "/"
		return func(s string) bool { return strings.HasPrefix(s, prefix) }
	default:
		a, b, _ := strings.Cut(v, "*")
		return regexMatcher("spiffe://" + regexp.QuoteMeta(a) + "[^/]*" + regexp.QuoteMeta(b) + "/.*")
	}
}

// trustDomains is the local trust domain and its aliases, as istiod's
// trustdomain.Bundle.
type trustDomains []string

// rewritePrincipals is istiod's Bundle.ReplaceTrustDomainAliases: a
// principal "TD/ns/N/sa/S" whose TD is the local trust domain, one of its
// aliases or "cluster.local" stands for the same principal in every one of
// the bundle's trust domains. Other principals are kept as written.
func (t trustDomains) rewritePrincipals(values []string) []string {
	var out []string
	for _, p := range values {
		parts := strings.Split(p, "/")
		if len(parts) != 5 || parts[0] == "*" {
			out = append(out, p)
			continue
		}
		td := parts[0]
		if !t.matches(td) && td != DefaultTrustDomain {
			out = append(out, p)
			continue
		}
		var expanded []string
		for _, local := range t {
			np := p
			if !suffixMatch(local, td) {
				np = local + "/" + strings.Join(parts[1:], "/")
			}
			if !slices.Contains(expanded, np) {
				expanded = append(expanded, np)
			}
		}
		out = append(out, expanded...)
	}
	return out
}

// expandTrustDomains is istiod's Bundle.ExpandTrustDomainAliases: a value
// naming one of the bundle's trust domains stands for all of them.
func (t trustDomains) expandTrustDomains(values []string) []string {
	var out []string
	for _, v := range values {
		add := []string{v}
		if slices.Contains(t, v) {
			add = t
		}
		for _, a := range add {
			if !slices.Contains(out, a) {
				out = append(out, a)
			}
		}
	}
	return out
}

// matches is istiod's trustdomain.stringMatch.
func (t trustDomains) matches(a string) bool {
	for _, s := range t {
		if a == s || s == "*" || prefixMatch(a, s) || prefixMatch(s, a) || suffixMatch(a, s) || suffixMatch(s, a) {
			return true
		}
	}
	return false
}

func prefixMatch(a, pattern string) bool {
	p, ok := strings.CutSuffix(pattern, "*")
	return ok && strings.HasPrefix(a, p)
}

func suffixMatch(a, pattern string) bool {
	p, ok := strings.CutPrefix(pattern, "*")
	return ok && strings.HasSuffix(a, p)
}
