package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshsplice/meshsplice/agent/api"
	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/internal/testnet"
)

// The policy safety net's rule, "the kernel never denies what the sidecar
// would allow", through the agent process: scenarios of issue 10 (items
// 8-13), each with the agent compiling ordinary Istio YAML.

// policyWorld is an agent with a config folder, two nodes on one network
// and pods that are not registered yet.
type policyWorld struct {
	m            *mesh
	ag           *agentProc
	nodeA, nodeB *testnet.BridgeNet
	dir          string
	sidecars     uint64 // sidecars started: listeners the kernel must register
}

func newPolicyWorld(t *testing.T) *policyWorld {
	t.Helper()
	testnet.RequireRoot(t)
	w := &policyWorld{m: &mesh{t: t, bin: mstest(t)}, dir: t.TempDir()}
	w.m.cg = testnet.NewCgroup(t)
	w.m.pin = testnet.PinDir(t, func(dir string) error { return datapath.Detach(dir, time.Second) })
	w.nodeA = testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	w.nodeB = testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	testnet.ConnectNodes(t, w.nodeA, w.nodeB)
	w.write("mesh.yaml", "trustDomain: cluster.local\n")
	return w
}

// start writes files into the config folder and starts the agent.
func (w *policyWorld) start(files map[string]string) {
	w.m.t.Helper()
	for name, content := range files {
		w.write(name, content)
	}
	w.ag = startAgent(w.m.t, w.m, w.dir)
	w.m.t.Cleanup(w.ag.stop)
}

func (w *policyWorld) write(name, content string) {
	w.m.t.Helper()
	if err := os.WriteFile(filepath.Join(w.dir, name), []byte(content), 0o644); err != nil {
		w.m.t.Fatal(err)
	}
}

// pod creates a pod on node with an echo app on appPort (not registered).
func (w *policyWorld) pod(node *testnet.BridgeNet, name string) *meshPod {
	return w.m.addPod(node, name, nil)
}

// register registers p with the agent the way meshsplice-cni does; a
// sidecar is started (once) when the pod is injected and captured.
func (w *policyWorld) register(p *meshPod, reg api.PodRegistration) api.PodStatus {
	t := w.m.t
	t.Helper()
	if reg.ContainerID == "" {
		reg.ContainerID = "c-" + p.Name
	}
	if reg.PodName == "" {
		reg.PodName = p.Name
	}
	reg.Netns, reg.IfName = p.NS.Path(), "eth0"
	if reg.PodNamespace == "" {
		reg.PodNamespace = "shop"
	}
	if len(reg.IPs) == 0 {
		reg.IPs = []netip.Addr{p.IPv4, p.IPv6}
	}
	st, err := w.ag.client.AddPod(context.Background(), reg)
	if err != nil {
		t.Fatalf("register %s: %v", p.Name, err)
	}
	if st.Capture && p.Sidecar == nil {
		p.Sidecar = w.m.start(p, p.Name+"-sidecar", 1337, "sidecar")
		if _, err := p.Sidecar.WaitEvent(waitFor, "ready"); err != nil {
			t.Fatal(err)
		}
		w.sidecars++
		eventually(t, p.Name+"'s sidecar listener", func() bool {
			c, _ := datapath.ReadPinnedCounters(w.m.pin)
			return c["listener_iter.listener_registered"] >= w.sidecars
		})
	}
	return st
}

// expect connects from p as the app and checks the outcome: "" for a
// working exchange, else a part of the error.
func (w *policyWorld) expect(name string, from *meshPod, target netip.AddrPort, want string, args ...string) {
	t := w.m.t
	t.Helper()
	c := w.m.start(from, from.Name+"-probe", appUID, append([]string{"client", "--target", target.String(),
		"--messages", "3", "--timeout", "3s"}, args...)...)
	c.WaitTimeout(20 * time.Second)
	res, err := c.WaitEvent(time.Second, "result")
	if err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	got := ""
	if !res.Bool("ok") {
		got = fmt.Sprint(res["errors"])
	}
	switch {
	case want == "" && got != "":
		t.Errorf("%s: denied: %s", name, got)
	case want != "" && (got == "" || !strings.Contains(got, want)):
		t.Errorf("%s: got %q, want %q", name, got, want)
	}
}

// podPolicy reads a pod's policy status from the agent's /pods.
func (w *policyWorld) podPolicy(name string) api.PolicyStatus {
	t := w.m.t
	t.Helper()
	var pods []api.PodStatus
	if err := json.Unmarshal([]byte(w.ag.get("/pods")), &pods); err != nil {
		t.Fatalf("/pods: %v", err)
	}
	for _, p := range pods {
		if p.Pod.PodName == name {
			if p.Policy == nil {
				t.Fatalf("/pods: %s has no policy status", name)
			}
			return *p.Policy
		}
	}
	t.Fatalf("/pods: no pod %s", name)
	return api.PolicyStatus{}
}

func allowFromPrincipal(name, app, sa string) string {
	return fmt.Sprintf(`apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: %s, namespace: shop}
spec:
  selector: {matchLabels: {app: %s}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/shop/sa/%s"]}}]
`, name, app, sa)
}

func to(p *meshPod) netip.AddrPort { return netip.AddrPortFrom(p.IPv4, appPort) }

// TestUnknownRemoteSourceAllowedByPrincipal (item 8): a backend replica on
// another node that the agent was never told about connects to db, whose
// policy allows backend's principal. Its sidecar would present backend's
// certificate and be allowed, so the kernel must not refuse it; a known
// pod of another identity is still refused.
func TestUnknownRemoteSourceAllowedByPrincipal(t *testing.T) {
	w := newPolicyWorld(t)
	db := w.pod(w.nodeA, "db")
	frontend := w.pod(w.nodeA, "frontend")
	remote := w.pod(w.nodeB, "remote-backend") // not registered, no WorkloadEntry
	w.start(map[string]string{"policies.yaml": allowFromPrincipal("db", "db", "backend")})
	w.register(db, api.PodRegistration{ServiceAccount: "db", Labels: map[string]string{"app": "db"}, Annotations: injected()})
	w.register(frontend, api.PodRegistration{ServiceAccount: "frontend", Labels: map[string]string{"app": "frontend"}, Annotations: injected()})
	w.expect("unknown remote backend -> db", remote, to(db), "")
	w.expect("frontend (known, not allowed) -> db", frontend, to(db), "operation not permitted")

	// A live connection of the unknown source survives the teardown that
	// a policy change runs.
	stream := w.m.start(remote, "remote-stream", appUID, "client", "--target", to(db).String(),
		"--messages", "100000", "--size", "100", "--interval", "1ms", "--timeout", "5s")
	eventually(t, "the stream reaching db", func() bool {
		c, _ := datapath.ReadPinnedCounters(w.m.pin)
		return c["policy.ingress_allowed"] >= 2
	})
	w.write("policies.yaml", allowFromPrincipal("db", "db", "backend")+"---\n"+allowFromPrincipal("db-frontend", "db", "frontend"))
	eventually(t, "the edit applied", func() bool {
		c := w.m.start(frontend, "frontend-poll", appUID, "client", "--target", to(db).String(), "--messages", "1", "--timeout", "3s")
		c.WaitTimeout(10 * time.Second)
		res, err := c.WaitEvent(time.Second, "result")
		return err == nil && res.Bool("ok")
	})
	w.ag.get("/pods") // answers once the config, teardown included, is applied
	if stream.ExitCode() != -1 {
		res, _ := stream.WaitEvent(time.Second, "result")
		t.Errorf("the unknown source's live stream was closed by the policy change: %v", res)
	}
	if c, _ := datapath.ReadPinnedCounters(w.m.pin); c["policy.torn_down"] != 0 {
		t.Errorf("torn down: %v", nonZero(c))
	}
}

// TestPolicyEnforcedWithCaptureDisabled (item 11): with meshsplice's
// capture off (pod annotation, then the node switch) Istio's own iptables
// capture for the sidecar, which still authorizes: the kernel keeps
// enforcing on both ends, and /pods says the policy is enforced.
func TestPolicyEnforcedWithCaptureDisabled(t *testing.T) {
	w := newPolicyWorld(t)
	db := w.pod(w.nodeA, "db")
	frontend := w.pod(w.nodeA, "frontend")
	backend := w.pod(w.nodeA, "backend")
	remote := w.pod(w.nodeB, "remote-frontend") // frontend's identity by a WorkloadEntry
	w.start(map[string]string{"policies.yaml": allowFromPrincipal("db", "db", "backend"),
		"remote.yaml": fmt.Sprintf(`apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm-frontend, namespace: shop}
spec: {address: %s, serviceAccount: frontend}
`, remote.IPv4)})
	off := injected("meshsplice.io/capture", "disabled")
	w.register(db, api.PodRegistration{ServiceAccount: "db", Labels: map[string]string{"app": "db"}, Annotations: off})
	w.register(frontend, api.PodRegistration{ServiceAccount: "frontend", Labels: map[string]string{"app": "frontend"}, Annotations: off})
	w.register(backend, api.PodRegistration{ServiceAccount: "backend", Labels: map[string]string{"app": "backend"}, Annotations: off})
	check := func(when string) {
		t.Helper()
		w.expect(when+": backend -> db", backend, to(db), "")
		w.expect(when+": frontend -> db (egress)", frontend, to(db), "operation not permitted")
		w.expect(when+": remote frontend -> db (ingress)", remote, to(db), "connection refused")
		if st := w.podPolicy("db"); !st.Enforced || !strings.Contains(st.Reason, "capture is off") {
			t.Errorf("%s: db's policy status %+v, want enforced with capture off", when, st)
		}
		// The same from the pins alone, as `meshsplice status` reads it.
		kernel, err := datapath.ReadPodPolicies(w.m.pin)
		if kp := kernel[db.Cookie]; err != nil || !kp.Enforced || kp.Reason != datapath.ReasonCaptureOff {
			t.Errorf("%s: ReadPodPolicies: db %+v, %v", when, kp, err)
		}
	}
	check("pod capture disabled")
	w.write("switches.yaml", "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: meshsplice}\ndata: {capture: disabled}\n")
	eventually(t, "the node switch applied", func() bool {
		n, err := w.m.nodeSettings()
		return err == nil && !n.Capture
	})
	check("node capture disabled")
}

func (m *mesh) nodeSettings() (datapath.NodeSettings, error) {
	st, err := datapath.Inspect(m.pin)
	if err != nil {
		return datapath.NodeSettings{}, err
	}
	return st.Node, nil
}

// TestTeardownOnIdentityChange (item 12): a registration that changes an
// address's identity changes the policy as much as an edit does: a live
// connection the new identity may not have is closed at once.
func TestTeardownOnIdentityChange(t *testing.T) {
	w := newPolicyWorld(t)
	db := w.pod(w.nodeA, "db")
	client := w.pod(w.nodeA, "client")
	w.start(map[string]string{"policies.yaml": allowFromPrincipal("db", "db", "backend")})
	w.register(db, api.PodRegistration{ServiceAccount: "db", Labels: map[string]string{"app": "db"}, Annotations: injected()})
	off := injected("meshsplice.io/capture", "disabled")
	w.register(client, api.PodRegistration{ServiceAccount: "backend", Labels: map[string]string{"app": "client"}, Annotations: off})
	ingress := func() uint64 {
		c, _ := datapath.ReadPinnedCounters(w.m.pin)
		return c["policy.ingress_allowed"]
	}
	allowed := ingress()
	stream := w.m.start(client, "client-stream", appUID, "client", "--target", to(db).String(),
		"--messages", "100000", "--size", "100", "--interval", "1ms", "--timeout", "5s")
	eventually(t, "the stream reaching db", func() bool { return ingress() > allowed })
	// The same pod again, now running as frontend.
	w.register(client, api.PodRegistration{ServiceAccount: "frontend", Labels: map[string]string{"app": "client"}, Annotations: off})
	// A timeout is no answer: the stream must have ended, torn down.
	err := stream.WaitTimeout(20 * time.Second)
	if stream.ExitCode() == -1 {
		t.Fatalf("the stream of an identity the policy no longer allows kept going: %v", err)
	}
	if c, _ := datapath.ReadPinnedCounters(w.m.pin); c["policy.torn_down"] == 0 {
		t.Errorf("the stream ended (%v) but no connection was torn down: %v", err, nonZero(c))
	}
	w.expect("client as frontend -> db", client, to(db), "operation not permitted")
}

// TestConnectJudgesTheBoundSource (item 12): a pod with two IPv4 addresses
// whose app binds the second: connect judges the address the connection
// really leaves from, as sk_lookup and teardown do, not the pod's first.
func TestConnectJudgesTheBoundSource(t *testing.T) {
	w := newPolicyWorld(t)
	db := w.pod(w.nodeA, "db")
	client := w.pod(w.nodeA, "client")
	second := client.IPv4.Next().Next().Next().Next().Next()
	for second == db.IPv4 {
		second = second.Next()
	}
	if out, err := exec.Command("nsenter", "--net="+client.NS.Path(), "ip", "addr", "add", second.String()+"/32", "dev", "eth0").CombinedOutput(); err != nil {
		t.Fatalf("add %s: %v: %s", second, err, out)
	}
	w.start(map[string]string{"policies.yaml": fmt.Sprintf(`apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: db, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  action: ALLOW
  rules:
  - from: [{source: {ipBlocks: ["%s/32"]}}]
`, second)})
	w.register(db, api.PodRegistration{ServiceAccount: "db", Labels: map[string]string{"app": "db"}, Annotations: injected()})
	w.register(client, api.PodRegistration{ServiceAccount: "client", Labels: map[string]string{"app": "client"},
		Annotations: injected("meshsplice.io/capture", "disabled"), IPs: []netip.Addr{client.IPv4, second, client.IPv6}})
	w.expect("client from its second address -> db", client, to(db), "", "--source", second.String())
	w.expect("client from its first address -> db", client, to(db), "operation not permitted", "--source", client.IPv4.String())
}

// TestDuplicateWorkloadAffectsOnlyItself (item 10): two registrations with
// one pod name make that name ambiguous; they are reported, and every
// other pod's policy still applies.
func TestDuplicateWorkloadAffectsOnlyItself(t *testing.T) {
	w := newPolicyWorld(t)
	a1 := w.pod(w.nodeA, "twin-a")
	a2 := w.pod(w.nodeA, "twin-b")
	db := w.pod(w.nodeA, "db")
	frontend := w.pod(w.nodeA, "frontend")
	w.start(map[string]string{"policies.yaml": allowFromPrincipal("db", "db", "backend")})
	w.register(a1, api.PodRegistration{PodName: "twin", ServiceAccount: "twin", Annotations: injected()})
	w.register(a2, api.PodRegistration{PodName: "twin", ServiceAccount: "twin", Annotations: injected()})
	w.register(db, api.PodRegistration{ServiceAccount: "db", Labels: map[string]string{"app": "db"}, Annotations: injected()})
	w.register(frontend, api.PodRegistration{ServiceAccount: "frontend", Labels: map[string]string{"app": "frontend"}, Annotations: injected()})
	w.expect("frontend -> db", frontend, to(db), "operation not permitted")
	if st := w.podPolicy("db"); !st.Enforced {
		t.Errorf("db's policy status %+v, want enforced", st)
	}
	if st := w.podPolicy("twin"); st.Enforced || !strings.Contains(st.Reason, "workloads are named shop/twin") {
		t.Errorf("twin's policy status %+v, want not enforced, naming the duplicate", st)
	}
	metrics := w.ag.get("/metrics")
	for _, want := range []string{`meshsplice_policy_pods{enforced="true"} 1`, "meshsplice_policy_applied 1", "meshsplice_policy_not_applied_total 0"} {
		if !strings.Contains(metrics, want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
}

// TestUnknownLabelsNeverDenyMore (item 9): a pod registered without labels
// (the runtime does not fill the labels capability) under a root
// allow-nothing and an ALLOW that selects it: the kernel must not turn that
// into "deny all"; the ALLOW is applied as if it selected the pod.
func TestUnknownLabelsNeverDenyMore(t *testing.T) {
	w := newPolicyWorld(t)
	db := w.pod(w.nodeA, "db")
	backend := w.pod(w.nodeA, "backend")
	frontend := w.pod(w.nodeA, "frontend")
	w.start(map[string]string{"policies.yaml": `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: istio-system}
spec: {}
---
` + allowFromPrincipal("db", "db", "backend")})
	w.register(db, api.PodRegistration{ServiceAccount: "db", Annotations: injected()}) // no labels
	off := injected("meshsplice.io/capture", "disabled")
	w.register(backend, api.PodRegistration{ServiceAccount: "backend", Annotations: off})
	w.register(frontend, api.PodRegistration{ServiceAccount: "frontend", Annotations: off})
	w.expect("backend -> db (labels unknown)", backend, to(db), "")
	w.expect("frontend -> db (labels unknown)", frontend, to(db), "operation not permitted")
	if st := w.podPolicy("db"); !st.Enforced || !strings.Contains(st.Reason, "labels unknown") {
		t.Errorf("db's policy status %+v, want enforced, saying its labels are unknown", st)
	}
}
