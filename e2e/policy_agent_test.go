package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshsplice/meshsplice/agent/api"
	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/internal/testnet"
)

const shopPolicies = `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: backend, namespace: shop}
spec:
  selector: {matchLabels: {app: backend}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/shop/sa/frontend"]}}]
    to: [{operation: {methods: ["GET"], ports: ["8080"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: db, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/shop/sa/backend"]}}]
`

// registerShopPod registers a pod the way meshsplice-cni does, with the
// name, namespace, service account and labels policy needs.
func registerShopPod(t *testing.T, ag *agentProc, p *meshPod, app string) {
	t.Helper()
	_, err := ag.client.AddPod(context.Background(), api.PodRegistration{
		ContainerID: "c-" + p.Name, Netns: p.NS.Path(), IfName: "eth0",
		IPs: []netip.Addr{p.IPv4, p.IPv6}, PodName: p.Name, PodNamespace: "shop",
		ServiceAccount: app, Labels: map[string]string{"app": app}, Annotations: injected(),
	})
	if err != nil {
		t.Fatalf("register %s: %v", p.Name, err)
	}
}

// TestAgentPolicy is issue 6's scenario through the agent process: three
// pods (frontend, backend, db), a policy that lets frontend reach backend
// and backend reach db, written as ordinary Istio YAML in the agent's
// folder. A process running as uid 1337 in frontend (a compromised sidecar)
// cannot reach db by any port; the legitimate paths work (the ALLOW rule's
// L7 part, GET, is projected to an L4 allow); a remote workload is judged by
// its identity; an edit of the folder flips the verdict for new
// connections and closes a now-forbidden live one.
func TestAgentPolicy(t *testing.T) {
	testnet.RequireRoot(t)
	m := &mesh{t: t, bin: mstest(t)}
	m.cg = testnet.NewCgroup(t)
	m.pin = testnet.PinDir(t, func(dir string) error { return datapath.Detach(dir, time.Second) })
	nodeA := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	nodeB := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	testnet.ConnectNodes(t, nodeA, nodeB)
	frontend := m.addPod(nodeA, "frontend", nil)
	backend := m.addPod(nodeA, "backend", nil)
	db := m.addPod(nodeA, "db", nil)
	remote := m.addPod(nodeB, "remote", nil) // a backend replica on another node

	configDir := t.TempDir()
	write := func(name, content string) {
		if err := os.WriteFile(filepath.Join(configDir, name), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// A dual-stack mesh: the pods' IPv6 is captured, so policy applies to it.
	write("mesh.yaml", "trustDomain: cluster.local\ndefaultConfig: {proxyMetadata: {ISTIO_DUAL_STACK: \"true\"}}\n")
	write("policies.yaml", shopPolicies)
	write("remote.yaml", fmt.Sprintf(`apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: backend-vm, namespace: shop}
spec: {address: %s, serviceAccount: backend, labels: {app: backend}}
`, remote.IPv4))
	ag := startAgent(t, m, configDir)
	for p, app := range map[*meshPod]string{frontend: "frontend", backend: "backend", db: "db"} {
		registerShopPod(t, ag, p, app)
		p.Sidecar = m.start(p, p.Name+"-sidecar", 1337, "sidecar")
		if _, err := p.Sidecar.WaitEvent(waitFor, "ready"); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, "sidecar listeners", func() bool {
		c, _ := datapath.ReadPinnedCounters(m.pin)
		return c["listener_iter.listener_registered"] >= 3
	})
	to := func(p *meshPod, port uint16) netip.AddrPort { return netip.AddrPortFrom(p.IPv4, port) }
	check := func(name string, from *meshPod, uid int, target netip.AddrPort, want string) {
		t.Helper()
		got := m.tryConnect(from, uid, target)
		switch {
		case want == "" && got != "":
			t.Errorf("%s: denied: %s", name, got)
		case want != "" && !strings.Contains(got, want):
			t.Errorf("%s: got %q, want %q", name, got, want)
		}
	}
	check("frontend -> backend", frontend, appUID, to(backend, appPort), "")
	check("backend -> db", backend, appUID, to(db, appPort), "")
	check("frontend -> db", frontend, appUID, to(db, appPort), "operation not permitted")
	for _, port := range []uint16{appPort, 5432, 15006, 22} {
		want := "operation not permitted"
		if port == 15006 {
			want = "" // a sidecar port: not judged, and the sidecar itself drops it (loop guard)
		}
		got := m.tryConnect(frontend, 1337, to(db, port))
		if want != "" && !strings.Contains(got, want) {
			t.Errorf("compromised sidecar -> db:%d: got %q, want EPERM", port, got)
		}
	}
	check("compromised sidecar -> db over IPv6", frontend, 1337, netip.AddrPortFrom(db.IPv6, appPort), "operation not permitted")
	check("frontend -> backend on a port the rule does not name", frontend, appUID, to(backend, 9090), "operation not permitted")
	check("remote backend (node B, WorkloadEntry identity) -> db", remote, appUID, to(db, appPort), "")

	var denials []datapath.Denial
	eventually(t, "denial records", func() bool {
		denials = ag.denials()
		return len(denials) > 0
	})
	if d := denials[0]; d.Dst != db.IPv4 || len(d.Policies) == 0 || !strings.Contains(d.Policies[0], "shop/db") {
		t.Errorf("first denial: %+v", d)
	}

	// A live backend -> db stream, then the db policy is edited to allow
	// only frontend: the stream is closed, new backend -> db connects fail.
	// The kernel's counters, unlike a process's piped output, are never
	// behind: the stream reached db when sk_lookup let one more in.
	ingress := func() uint64 {
		c, _ := datapath.ReadPinnedCounters(m.pin)
		return c["policy.ingress_allowed"]
	}
	allowed := ingress()
	stream := m.start(backend, "backend-stream", appUID, "client", "--target", to(db, appPort).String(),
		"--messages", "100000", "--size", "100", "--interval", "1ms", "--timeout", "5s")
	eventually(t, "the stream reaching db", func() bool { return ingress() > allowed })
	write("policies.yaml", strings.Replace(shopPolicies, "cluster.local/ns/shop/sa/backend", "cluster.local/ns/shop/sa/frontend", 1))
	if err := stream.WaitTimeout(20 * time.Second); err == nil {
		t.Fatal("the now-forbidden stream kept going")
	}
	res, _ := stream.WaitEvent(time.Second, "result")
	t.Logf("live stream after the edit: %v", res["errors"])
	check("backend -> db after the edit", backend, appUID, to(db, appPort), "operation not permitted")
	check("frontend -> db after the edit", frontend, appUID, to(db, appPort), "")
	if c, _ := datapath.ReadPinnedCounters(m.pin); c["policy.torn_down"] == 0 {
		t.Errorf("no connection torn down: %v", nonZero(c))
	}
	ag.stop()
}
