package policy

import (
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	securityv1beta1 "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
)

// FuzzCompile compiles arbitrary policies in the test world and checks that
// Compile neither panics nor fails, and that Verdict agrees with the
// reference evaluator. The first byte chooses the input form: even, the rest
// is a YAML stream of AuthorizationPolicies (seeded with the golden cases);
// odd, the rest drives a generator that builds policies from pools of
// valid, invalid, L4 and L7 values. Its higher bits choose the mesh
// settings.
func FuzzCompile(f *testing.F) {
	files, err := filepath.Glob(filepath.Join("testdata", "cases", "*.yaml"))
	if err != nil {
		f.Fatal(err)
	}
	for _, file := range files {
		data, err := os.ReadFile(file)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(append([]byte{0}, data...))
	}
	for i := range 16 {
		seed := []byte{byte(2*i + 1)}
		for j := range 64 {
			seed = append(seed, byte(i*37+j*11))
		}
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		if len(data) == 0 {
			return
		}
		in := Input{Workloads: testWorkloads(), Services: testServices()}
		mode := data[0]
		if mode&2 != 0 {
			in.ServiceTargetRefs = true
		}
		if mode&4 != 0 {
			in.TrustDomain = "example.org"
		}
		if mode&8 != 0 {
			in.TrustDomainAliases = []string{"old.org", "cluster.local"}
		}
		if mode&16 != 0 {
			in.RootNamespace = "prod"
		}
		if mode&1 == 0 {
			ps, err := parsePolicies(data[1:])
			if err != nil {
				return
			}
			in.Policies = ps
		} else {
			in.Policies = (&fuzzGen{b: data[1:]}).policies()
		}
		checkAgainstReference(t, in, seedOf(string(data)), 400)
	})
}

// fuzzGen builds policies from fuzz bytes; once the bytes run out every
// choice is the first one.
type fuzzGen struct {
	b []byte
	i int
	// sloppy is set for one policy in four: only a sloppy policy gets
	// values Istio rejects.
	sloppy bool
}

func (g *fuzzGen) n(k int) int {
	if g.i >= len(g.b) {
		return 0
	}
	v := g.b[g.i]
	g.i++
	return int(v) % k
}

func (g *fuzzGen) chance(k int) bool { return g.n(k) == 0 }

// values picks one to three values from pool or, in a sloppy policy, now
// and then one that Istio rejects from fuzzBad.
func (g *fuzzGen) values(pool []string) []string {
	out := make([]string, 1+g.n(3))
	for i := range out {
		if g.sloppy && g.chance(8) {
			out[i] = fuzzBad[g.n(len(fuzzBad))]
			continue
		}
		out[i] = pool[g.n(len(pool))]
	}
	return out
}

var (
	fuzzPrincipals = []string{"*", "cluster.local/ns/default/sa/frontend", "cluster.local/ns/default/sa/backend",
		"cluster.local/ns/prod/*", "*/sa/db", "*frontend", "old.org/ns/default/sa/frontend", "example.org/ns/prod/sa/api",
		"*/ns/legacy/sa/client", "cluster.local/ns/default/sa/*", "spiffe://cluster.local/ns/default/sa/frontend",
		"cluster.local/*", "a*b", "*local/ns/prod/sa/default", "cluster.local/ns/prod/sa/default"}
	fuzzNamespaces = []string{"*", "default", "prod", "legacy", "istio-system", "*a", "def*", "*od", "p*d", "nope", "*sa"}
	fuzzAccounts   = []string{"frontend", "backend", "prod/api", "legacy/client", "default", "prod/default", "db"}
	fuzzDomains    = []string{"cluster.local", "*", "cluster.*", "*.local", "old.org", "example.org"}
	fuzzIPs        = []string{"10.0.0.0/8", "10.0.1.0/24", "10.0.1.1", "10.0.1.2/31", "10.0.1.7/24", "0.0.0.0/0", "::/0",
		"fd00::/8", "fd00::1:0/112", "fd00::1:1", "192.0.2.0/24", "2001:db8::/32", "::ffff:10.0.1.1",
		"::ffff:10.0.0.0/104", "::/80", "::ffff:0:0/96", "::ffff:10.0.1.0/120", "10.1.0.0/16", "10.0.2.0/23", "10.0.0.10", "10.0.1.4"}
	fuzzPorts = []string{"8080", "9090", "5432", "0", "65535", "080", "22", "8081"}
	fuzzL7    = []string{"GET", "/api/*", "/{*}/x", "/{**}", "example.com", "*.example.com"}
	fuzzKeys  = []string{"source.ip", "source.namespace", "source.principal", "source.serviceAccount", "source.trustDomain",
		"destination.port", "request.headers[x-user]", "request.auth.claims[iss]", "request.auth.principal",
		"destination.ip", "connection.sni", "remote.ip", "experimental.envoy.filters.a[b]"}
	// fuzzBad are values Istio's validation rejects somewhere: an empty
	// value, a bad address or port, a bad account, trust domain, path
	// template or when key.
	fuzzBad    = []string{"", "c*l", "10.0.0.300", "fe80::1%eth0", "65536", "http", "a/b/c", "/x", "**", "a/b", "/a{b", "/{**}/{*}"}
	fuzzBadKey = []string{"request.headers", "destination.namespace", "bogus", ""}
	fuzzLabels = []map[string]string{{"app": "backend"}, {"app": "db"}, {"app": "api"}, {"version": "v2"}, {},
		{"app": "backend", "version": "v2"}, {"version": "v1", "app": "db"}, {"app": "*"}}
)

func (g *fuzzGen) policies() []*securityv1.AuthorizationPolicy {
	n := 1 + g.n(4)
	out := make([]*securityv1.AuthorizationPolicy, 0, n)
	for i := range n {
		out = append(out, g.policy(i))
	}
	return out
}

func (g *fuzzGen) policy(i int) *securityv1.AuthorizationPolicy {
	p := &securityv1.AuthorizationPolicy{}
	g.sloppy = g.chance(4)
	p.Name = "p" + strconv.Itoa(i)
	p.Namespace = []string{"default", "prod", "istio-system", "legacy", "default"}[g.n(5)]
	if g.chance(8) {
		p.Annotations = map[string]string{"istio.io/dry-run": []string{"true", "false", "nope"}[g.n(3)]}
	}
	spec := &p.Spec
	spec.Action = []securityv1beta1.AuthorizationPolicy_Action{
		securityv1beta1.AuthorizationPolicy_ALLOW, securityv1beta1.AuthorizationPolicy_DENY,
		securityv1beta1.AuthorizationPolicy_ALLOW, securityv1beta1.AuthorizationPolicy_DENY,
		securityv1beta1.AuthorizationPolicy_AUDIT, securityv1beta1.AuthorizationPolicy_CUSTOM, 7,
	}[g.n(7)]
	if g.chance(3) {
		labels := fuzzLabels[:len(fuzzLabels)-1]
		if g.sloppy {
			labels = fuzzLabels
		}
		spec.Selector = &typev1beta1.WorkloadSelector{MatchLabels: labels[g.n(len(labels))]}
	}
	if g.chance(6) {
		ref := []*typev1beta1.PolicyTargetReference{
			{Kind: "Service", Name: "backend"}, {Kind: "Service", Group: "core", Name: "db"},
			{Kind: "Gateway", Group: "gateway.networking.k8s.io", Name: "gw"}, {Kind: "Service", Name: "api", Namespace: "prod"},
			{Kind: "Service", Name: "external"},
		}[g.n(5)]
		if g.chance(2) {
			spec.TargetRef = ref
		} else {
			spec.TargetRefs = []*typev1beta1.PolicyTargetReference{ref}
		}
	}
	if g.sloppy && g.chance(4) {
		spec.ActionDetail = &securityv1beta1.AuthorizationPolicy_Provider{
			Provider: &securityv1beta1.AuthorizationPolicy_ExtensionProvider{Name: "ext"},
		}
	}
	switch rules := g.n(5); {
	case rules == 0 && g.chance(2):
		spec.Rules = []*securityv1beta1.Rule{}
	default:
		for range rules {
			spec.Rules = append(spec.Rules, g.rule())
		}
	}
	return p
}

func (g *fuzzGen) rule() *securityv1beta1.Rule {
	if g.sloppy && g.chance(16) {
		return nil
	}
	r := &securityv1beta1.Rule{}
	if g.sloppy && g.chance(16) {
		r.From = []*securityv1beta1.Rule_From{}
	}
	for range g.n(3) {
		if g.sloppy && g.chance(16) {
			r.From = append(r.From, &securityv1beta1.Rule_From{})
			continue
		}
		r.From = append(r.From, &securityv1beta1.Rule_From{Source: g.source()})
	}
	for range g.n(3) {
		r.To = append(r.To, &securityv1beta1.Rule_To{Operation: g.operation()})
	}
	for range g.n(3) {
		key := fuzzKeys[g.n(len(fuzzKeys))]
		if g.sloppy && g.chance(8) {
			key = fuzzBadKey[g.n(len(fuzzBadKey))]
		}
		pool := fuzzL7
		switch key {
		case "source.ip", "remote.ip", "destination.ip":
			pool = fuzzIPs
		case "destination.port":
			pool = fuzzPorts
		case "source.principal":
			pool = fuzzPrincipals
		case "source.namespace":
			pool = fuzzNamespaces
		case "source.serviceAccount":
			pool = fuzzAccounts
		case "source.trustDomain":
			pool = fuzzDomains
		}
		c := &securityv1beta1.Condition{Key: key}
		switch {
		case g.sloppy && g.chance(8):
			// neither values nor notValues
		case g.chance(2):
			c.Values = g.values(pool)
		case g.chance(2):
			c.NotValues = g.values(pool)
		default:
			c.Values, c.NotValues = g.values(pool), g.values(pool)
		}
		r.When = append(r.When, c)
	}
	return r
}

func (g *fuzzGen) source() *securityv1beta1.Source {
	s := &securityv1beta1.Source{}
	defer func() {
		// Istio rejects serviceAccounts next to principals or namespaces.
		if !g.sloppy && len(s.ServiceAccounts)+len(s.NotServiceAccounts) > 0 {
			s.Principals, s.NotPrincipals, s.Namespaces, s.NotNamespaces = nil, nil, nil, nil
		}
	}()
	for range 1 + g.n(3) {
		switch g.n(14) {
		case 0:
			s.Principals = g.values(fuzzPrincipals)
		case 1:
			s.NotPrincipals = g.values(fuzzPrincipals)
		case 2:
			s.Namespaces = g.values(fuzzNamespaces)
		case 3:
			s.NotNamespaces = g.values(fuzzNamespaces)
		case 4:
			s.ServiceAccounts = g.values(fuzzAccounts)
		case 5:
			s.NotServiceAccounts = g.values(fuzzAccounts)
		case 6:
			s.TrustDomains = g.values(fuzzDomains)
		case 7:
			s.NotTrustDomains = g.values(fuzzDomains)
		case 8:
			s.IpBlocks = g.values(fuzzIPs)
		case 9:
			s.NotIpBlocks = g.values(fuzzIPs)
		case 10:
			s.RemoteIpBlocks = g.values(fuzzIPs)
		case 11:
			s.NotRemoteIpBlocks = g.values(fuzzIPs)
		case 12:
			s.RequestPrincipals = g.values([]string{"*", "iss/sub"})
		case 13:
			s.NotRequestPrincipals = g.values([]string{"*", "iss/sub"})
		}
	}
	return s
}

func (g *fuzzGen) operation() *securityv1beta1.Operation {
	o := &securityv1beta1.Operation{}
	for range 1 + g.n(3) {
		switch g.n(8) {
		case 0, 1:
			o.Ports = g.values(fuzzPorts)
		case 2:
			o.NotPorts = g.values(fuzzPorts)
		case 3:
			o.Methods = g.values(fuzzL7)
		case 4:
			o.NotMethods = g.values(fuzzL7)
		case 5:
			o.Paths = g.values(fuzzL7)
		case 6:
			o.NotPaths = g.values(fuzzL7)
		case 7:
			o.Hosts = g.values(fuzzL7)
		}
	}
	return o
}

// TestGeneratedPolicies runs the fuzz generator on pseudo-random bytes, so
// that a plain go test covers many policy shapes against the reference
// evaluator without -fuzz.
func TestGeneratedPolicies(t *testing.T) {
	n := 400
	if testing.Short() {
		n = 50
	}
	rng := rand.New(rand.NewPCG(1, 2))
	probes := 0
	for i := range n {
		in, data := generatedInput(rng, i)
		in.ServiceTargetRefs = i%3 == 0
		probes += checkAgainstReference(t, in, uint64(i), 200)
		if t.Failed() {
			t.Fatalf("input %d: %x", i, data)
		}
	}
	t.Logf("%d generated inputs, %d probes agree with the reference evaluator", n, probes)
}

// generatedInput is the test world with policies the fuzz generator built
// from random bytes (returned, to report a failure); every fifth one has
// another trust domain and an alias, every fourth unknown labels for two
// workloads.
func generatedInput(rng *rand.Rand, i int) (Input, []byte) {
	data := make([]byte, 96)
	for j := range data {
		data[j] = byte(rng.Uint32())
	}
	in := Input{Workloads: testWorkloads(), Services: testServices()}
	if i%5 == 0 {
		in.TrustDomain, in.TrustDomainAliases = "example.org", []string{"old.org"}
	}
	if i%4 == 1 {
		// The runtime passed no labels for backend and db: the kernel
		// must not know them (the sidecar still does).
		for j, w := range in.Workloads {
			if w.Name == "backend" || w.Name == "db" {
				in.Workloads[j].LabelsUnknown = true
			}
		}
	}
	in.Policies = (&fuzzGen{b: data}).policies()
	return in, data
}
