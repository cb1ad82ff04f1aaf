package e2e

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/internal/testnet"
	"github.com/meshsplice/meshsplice/istio"
)

// allowFrom is a hand-compiled policy set: ALLOW from the given identities,
// any source address, any port (one atom).
func allowFrom(name string, ids ...uint32) datapath.PolicySet {
	s := datapath.PolicySet{
		HasAllow: true, AllowMask: 1, DefaultPortMask: 1,
		IdentityMasks: map[uint32]uint64{},
		PrefixMasks:   map[netip.Prefix]uint64{netip.MustParsePrefix("0.0.0.0/0"): 1, netip.MustParsePrefix("::/0"): 1},
		Atoms:         []string{name},
	}
	for _, id := range ids {
		s.IdentityMasks[id] = 1
	}
	return s
}

// tryConnect runs the client and returns its first error ("" when it
// worked).
func (m *mesh) tryConnect(p *meshPod, uid int, target netip.AddrPort) string {
	m.t.Helper()
	c := m.start(p, p.Name+"-probe", uid, "client", "--target", target.String(), "--messages", "3", "--timeout", "3s")
	c.WaitTimeout(20 * time.Second)
	res, err := c.WaitEvent(time.Second, "result")
	if err != nil {
		m.t.Fatalf("probe %s -> %s: %v", p.Name, target, err)
	}
	if res.Bool("ok") {
		return ""
	}
	return fmt.Sprint(res["errors"])
}

// TestKernelPolicy: the kernel enforces the workload policy for every
// process of a pod, the sidecar (uid 1337) included, on egress (EPERM at
// connect) and ingress (RST), for local and remote sources by identity, and
// a policy change closes a live connection it now forbids. The sets are
// compiled by hand here (the translation has its own tests).
func TestKernelPolicy(t *testing.T) {
	m := newMesh(t)
	nodeA := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	nodeB := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	testnet.ConnectNodes(t, nodeA, nodeB)
	ann := injected()
	frontend := m.addPod(nodeA, "frontend", ann)
	backend := m.addPod(nodeA, "backend", ann)
	db := m.addPod(nodeA, "db", ann)
	dbExtra := m.start(db, "db-app2", appUID, "echo", "--port", "5432")
	if _, err := dbExtra.WaitEvent(waitFor, "ready"); err != nil {
		t.Fatal(err)
	}
	// cache's sidecar does not capture 6379: policy cannot be enforced
	// there by the sidecar, so the kernel must not either.
	cache := m.addPod(nodeA, "cache", injected(istio.AnnotationExcludeInboundPorts, "6379"))
	cacheExtra := m.start(cache, "cache-app2", appUID, "echo", "--port", "6379")
	if _, err := cacheExtra.WaitEvent(waitFor, "ready"); err != nil {
		t.Fatal(err)
	}
	remoteBackend := m.addPod(nodeB, "rbackend", nil)   // another node: unmeshed here, known identity
	remoteFrontend := m.addPod(nodeB, "rfrontend", nil) // likewise
	outsider := m.addPod(nodeA, "outsider", nil)        // no identity at all

	const idFrontend, idBackend, idDB, idCache = 1, 2, 3, 4
	ident := map[*meshPod]uint32{frontend: idFrontend, backend: idBackend, db: idDB, cache: idCache}
	for p, id := range ident {
		if err := m.dp.AddPod(datapath.Pod{NetnsPath: p.NS.Path(), Cookie: p.Cookie,
			IPs: []netip.Addr{p.IPv4, p.IPv6}, Traffic: p.Traffic, Identity: id}); err != nil {
			t.Fatal(err)
		}
	}
	pol := datapath.Policy{
		Sets: []datapath.PolicySet{
			allowFrom("shop/backend-allow-frontend", idFrontend),
			allowFrom("shop/db-allow-backend", idBackend),
			allowFrom("shop/cache-allow-nobody"),
		},
		IPs: map[netip.Addr]datapath.IPPolicy{},
	}
	set := func(p *meshPod, id uint32, s int) {
		pol.IPs[p.IPv4] = datapath.IPPolicy{Identity: id, Set: s}
		pol.IPs[p.IPv6] = datapath.IPPolicy{Identity: id, Set: s}
	}
	set(frontend, idFrontend, -1)
	set(backend, idBackend, 0)
	set(db, idDB, 1)
	set(cache, idCache, 2)
	set(remoteBackend, idBackend, -1)
	set(remoteFrontend, idFrontend, -1)
	if err := m.dp.SetPolicy(pol); err != nil {
		t.Fatal(err)
	}
	to := func(p *meshPod, port uint16) netip.AddrPort { return netip.AddrPortFrom(p.IPv4, port) }

	for _, tc := range []struct {
		name string
		from *meshPod
		uid  int
		to   netip.AddrPort
		want string // "" allowed, else a substring of the error
	}{
		{"frontend app -> backend", frontend, appUID, to(backend, appPort), ""},
		{"backend app -> db", backend, appUID, to(db, appPort), ""},
		{"frontend app -> db", frontend, appUID, to(db, appPort), "operation not permitted"},
		{"frontend as uid 1337 (compromised sidecar) -> db", frontend, 1337, to(db, appPort), "operation not permitted"},
		{"frontend as uid 1337 -> db, another port", frontend, 1337, to(db, 5432), "operation not permitted"},
		{"frontend as uid 1337 -> db over IPv6", frontend, 1337, netip.AddrPortFrom(db.IPv6, appPort), "operation not permitted"},
		{"remote backend (node B) -> db", remoteBackend, appUID, to(db, appPort), ""},
		{"remote frontend (node B) -> db", remoteFrontend, appUID, to(db, appPort), "connection refused"},
		{"outsider without identity -> db", outsider, appUID, to(db, appPort), "connection refused"},
		{"outsider -> frontend (no policy)", outsider, appUID, to(frontend, appPort), ""},
		{"frontend -> cache, a captured port", frontend, appUID, to(cache, appPort), "operation not permitted"},
		{"frontend -> cache, a port its sidecar does not capture", frontend, appUID, to(cache, 6379), ""},
		{"outsider -> cache, a port its sidecar does not capture", outsider, appUID, to(cache, 6379), ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			start := time.Now()
			got := m.tryConnect(tc.from, tc.uid, tc.to)
			took := time.Since(start)
			switch {
			case tc.want == "" && got != "":
				t.Fatalf("denied: %s", got)
			case tc.want != "" && !strings.Contains(got, tc.want):
				t.Fatalf("got %q, want %q", got, tc.want)
			}
			t.Logf("%s in %v", map[bool]string{true: "allowed", false: "denied"}[got == ""], took.Round(time.Millisecond))
		})
	}
	d := m.dp.Denials()
	found := false
	for _, dn := range d {
		if dn.Direction == "egress" && dn.Dst == db.IPv4 && dn.UID == 1337 && dn.Reason == "no-allow-rule" &&
			len(dn.Policies) == 1 && dn.Policies[0] == "shop/db-allow-backend" {
			found = true
		}
	}
	if !found {
		t.Fatalf("no denial record for the sidecar's connect to db: %+v", d)
	}
	st, err := datapath.Inspect(m.pin)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.RecentDenials) != len(d) || st.RecentDenials[0].Dst != d[0].Dst || st.RecentDenials[0].Time.Sub(d[0].Time).Abs() > time.Second {
		t.Fatalf("status denials %+v\ndiffer from the agent's %+v", st.RecentDenials, d)
	}
	c := m.counters()
	if c["policy.egress_denied"] < 4 || c["policy.ingress_denied"] < 2 {
		t.Fatalf("policy counters: %v", nonZero(c))
	}

	// A live backend -> db stream, then a policy edit that forbids it.
	if !m.dp.TeardownSupported() {
		t.Fatalf("this kernel has bpf_sock_destroy (6.18): teardown must load")
	}
	// The kernel's counters, unlike a process's piped output, are never
	// behind: the stream reached db when sk_lookup let one more in.
	allowed := m.counters()["policy.ingress_allowed"]
	stream := m.start(backend, "backend-stream", appUID, "client", "--target", to(db, appPort).String(),
		"--messages", "100000", "--size", "100", "--interval", "1ms", "--timeout", "5s")
	eventually(t, "the stream reaching db", func() bool { return m.counters()["policy.ingress_allowed"] > allowed })
	time.Sleep(100 * time.Millisecond)
	pol.Sets[1] = allowFrom("shop/db-allow-nobody")
	if err := m.dp.SetPolicy(pol); err != nil {
		t.Fatal(err)
	}
	n, err := m.dp.TeardownForbidden()
	if err != nil {
		t.Fatal(err)
	}
	if n == 0 {
		t.Fatalf("no connection torn down: %v", nonZero(m.counters()))
	}
	if err := stream.WaitTimeout(10 * time.Second); err == nil {
		t.Fatal("the forbidden stream kept going")
	}
	res, _ := stream.WaitEvent(time.Second, "result")
	t.Logf("stream after the policy change: %v (%d sockets torn down)", res["errors"], n)
	if got := m.tryConnect(backend, appUID, to(db, appPort)); !strings.Contains(got, "operation not permitted") {
		t.Fatalf("new backend -> db after the change: %q", got)
	}
	// The frontend -> backend path is untouched by the change.
	if got := m.tryConnect(frontend, appUID, to(backend, appPort)); got != "" {
		t.Fatalf("frontend -> backend after the change: %s", got)
	}
}
