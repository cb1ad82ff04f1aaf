package policy

import (
	"net/netip"
	"slices"
	"testing"
)

// TestRewritePrincipals checks the trust domain rewriting against the
// behaviour of istiod's trustdomain.Bundle.ReplaceTrustDomainAliases.
func TestRewritePrincipals(t *testing.T) {
	for _, tc := range []struct {
		name       string
		tds        trustDomains
		principals []string
		want       []string
	}{
		{"local only", trustDomains{"cluster.local"}, []string{"cluster.local/ns/foo/sa/bar"}, []string{"cluster.local/ns/foo/sa/bar"}},
		{"any", trustDomains{"cluster.local"}, []string{"*"}, []string{"*"}},
		{"any trust domain", trustDomains{"cluster.local"}, []string{"*/ns/foo/sa/bar"}, []string{"*/ns/foo/sa/bar"}},
		{"alias", trustDomains{"td2", "td1"}, []string{"td1/ns/foo/sa/bar"}, []string{"td2/ns/foo/sa/bar", "td1/ns/foo/sa/bar"}},
		{"cluster.local means the mesh", trustDomains{"example.org"}, []string{"cluster.local/ns/foo/sa/bar"}, []string{"example.org/ns/foo/sa/bar"}},
		{"two aliases", trustDomains{"td2", "td1", "cluster.local"}, []string{"cluster.local/ns/foo/sa/bar", "td1/ns/yyy/sa/zzz"},
			[]string{"td2/ns/foo/sa/bar", "td1/ns/foo/sa/bar", "cluster.local/ns/foo/sa/bar", "td2/ns/yyy/sa/zzz", "td1/ns/yyy/sa/zzz", "cluster.local/ns/yyy/sa/zzz"}},
		{"suffix trust domain", trustDomains{"td2", "foo-td1", "cluster.local"}, []string{"*-td1/ns/foo/sa/bar"},
			[]string{"td2/ns/foo/sa/bar", "*-td1/ns/foo/sa/bar", "cluster.local/ns/foo/sa/bar"}},
		{"foreign", trustDomains{"td1", "td2"}, []string{"some-td/ns/foo/sa/bar"}, []string{"some-td/ns/foo/sa/bar"}},
		{"not five parts", trustDomains{"td1"}, []string{"spiffe://td1/ns/foo/sa/bar", "/ns/a/sa/b"}, []string{"spiffe://td1/ns/foo/sa/bar", "/ns/a/sa/b"}},
		{"no duplicates", trustDomains{"new-td", "old-td"}, []string{"*-td/ns/some-ns/sa/some-sa"}, []string{"*-td/ns/some-ns/sa/some-sa"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := tc.tds.rewritePrincipals(tc.principals); !slices.Equal(got, tc.want) {
				t.Errorf("got %q, want %q", got, tc.want)
			}
		})
	}
}

func TestIdentityMatchers(t *testing.T) {
	const (
		fe  = "spiffe://cluster.local/ns/default/sa/frontend"
		api = "spiffe://cluster.local/ns/prod/sa/api"
	)
	for _, tc := range []struct {
		name string
		m    idMatcher
		yes  []string
		no   []string
	}{
		{"principal any", principalMatcher("*"), []string{fe, api}, []string{""}},
		{"principal exact", principalMatcher("cluster.local/ns/default/sa/frontend"), []string{fe}, []string{api, ""}},
		{"principal prefix", principalMatcher("cluster.local/ns/prod/*"), []string{api}, []string{fe}},
		{"principal suffix", principalMatcher("*/sa/frontend"), []string{fe}, []string{api}},
		{"principal inner star is literal", principalMatcher("cluster.local/ns/*/sa/api"), nil, []string{api}},
		{"namespace exact", namespaceMatcher("prod"), []string{api}, []string{fe, ""}},
		{"namespace prefix", namespaceMatcher("def*"), []string{fe}, []string{api}},
		{"namespace suffix", namespaceMatcher("*od"), []string{api}, []string{fe}},
		// Istio's regex lets the star run into the /sa/ segment.
		{"namespace star spans slash", namespaceMatcher("*a"), []string{fe, api}, []string{""}},
		{"service account local", serviceAccountMatcher("default", "frontend"), []string{fe}, []string{api}},
		{"service account qualified", serviceAccountMatcher("default", "prod/api"), []string{api}, []string{fe}},
		{"trust domain", trustDomainMatcher("cluster.local"), []string{fe}, []string{"spiffe://cluster.localx/ns/a/sa/b", ""}},
		{"trust domain glob", trustDomainMatcher("*.local"), []string{fe}, []string{"spiffe://example.org/ns/a/sa/b"}},
		{"trust domain any", trustDomainMatcher("*"), []string{fe}, []string{""}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, s := range tc.yes {
				if !tc.m(s) {
					t.Errorf("%q does not match, want a match", s)
				}
			}
			for _, s := range tc.no {
				if tc.m(s) {
					t.Errorf("%q matches, want none", s)
				}
			}
		})
	}
}

// TestLongestPrefixMasks checks nested exclusions directly: an allow of
// 10/8 but not 10.1/16, and of 10.1.2/24 again, gives each address the
// mask of its longest match.
func TestLongestPrefixMasks(t *testing.T) {
	pfx := netip.MustParsePrefix
	atoms := []Atom{
		{Action: Allow, Identities: []IdentityID{0}, IPs: []netip.Prefix{pfx("10.0.0.0/8")}, NotIPs: []netip.Prefix{pfx("10.1.0.0/16")}},
		{Action: Allow, Identities: []IdentityID{0}, IPs: []netip.Prefix{pfx("10.1.2.0/24")}},
		{Action: Deny, Identities: []IdentityID{0}, IPs: []netip.Prefix{pfx("10.1.2.3/32")}, PortMatch: InPorts, Ports: []uint16{22}},
	}
	s := buildMasks(atoms, true, []identity{{id: 0}})
	for _, tc := range []struct {
		ip    string
		port  uint16
		allow bool
		atom  int
	}{
		{"10.9.9.9", 80, true, 0},
		{"10.1.9.9", 80, false, -1},
		{"10.1.2.9", 80, true, 1},
		{"10.1.2.3", 80, true, 1},
		{"10.1.2.3", 22, false, 2},
		{"11.0.0.1", 80, false, -1},
		{"::ffff:10.9.9.9", 80, true, 0}, // v4-mapped is IPv4, as in the kernel
	} {
		allow, atom := s.Verdict(0, netip.MustParseAddr(tc.ip), tc.port)
		if allow != tc.allow || atom != tc.atom {
			t.Errorf("%s port %d: allow=%v atom %d, want allow=%v atom %d", tc.ip, tc.port, allow, atom, tc.allow, tc.atom)
		}
	}
	if _, ok := s.PrefixMasks[pfx("0.0.0.0/0")]; !ok {
		t.Error("no 0.0.0.0/0 entry")
	}
	if _, ok := s.PrefixMasks[pfx("::/0")]; !ok {
		t.Error("no ::/0 entry")
	}
}
