package e2e

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	securityv1beta1 "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshsplice/meshsplice/agent/api"
	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/internal/testnet"
	"github.com/meshsplice/meshsplice/istio"
	"github.com/meshsplice/meshsplice/policy"
)

// compiledPolicy compiles in and converts the result to the kernel's form
// as the agent does: every known address with its identity and set, and
// the plaintext addresses flagged (added with the unknown identity when
// policy does not know them).
func compiledPolicy(t *testing.T, in policy.Input, ids *policy.Allocator, plaintext ...netip.Addr) (datapath.Policy, policy.Result) {
	t.Helper()
	res, err := policy.Compile(in, ids)
	if err != nil {
		t.Fatal(err)
	}
	dp := datapath.Policy{IPs: map[netip.Addr]datapath.IPPolicy{}}
	for _, s := range res.Sets {
		k := datapath.PolicySet{
			HasAllow: s.HasAllow, AllowMask: s.AllowMask, DenyMask: s.DenyMask, PlaintextMask: s.PlaintextMask,
			DefaultIdentityMask: s.DefaultIdentityMask, DefaultPortMask: s.DefaultPortMask,
			IdentityMasks: map[uint32]uint64{}, PrefixMasks: s.PrefixMasks, PortMasks: s.PortMasks,
			BypassPorts: istio.ProxyPorts,
		}
		for id, m := range s.IdentityMasks {
			k.IdentityMasks[uint32(id)] = m
		}
		for _, a := range s.Atoms {
			k.Atoms = append(k.Atoms, a.Policy)
		}
		dp.Sets = append(dp.Sets, k)
	}
	owner := map[netip.Addr]string{}
	for _, w := range in.Workloads {
		for _, ip := range w.IPs {
			owner[ip] = w.Key()
		}
	}
	for ip, id := range res.IPIdentity {
		dp.IPs[ip] = datapath.IPPolicy{Identity: uint32(id), Set: res.WorkloadSet[owner[ip]]}
	}
	for _, ip := range plaintext {
		v, ok := dp.IPs[ip]
		if !ok {
			v.Set = -1
		}
		v.Plaintext = true
		dp.IPs[ip] = v
	}
	return dp, res
}

func webPeerAuth(mode securityv1beta1.PeerAuthentication_MutualTLS_Mode) *securityv1.PeerAuthentication {
	return &securityv1.PeerAuthentication{
		ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "web"},
		Spec: securityv1beta1.PeerAuthentication{
			Selector: &typev1beta1.WorkloadSelector{MatchLabels: map[string]string{"app": "web"}},
			Mtls:     &securityv1beta1.PeerAuthentication_MutualTLS{Mode: mode},
		},
	}
}

// TestKernelPeerAuthStrict: a workload whose PeerAuthentication is STRICT
// refuses, in the kernel, pods known to have no sidecar on the ports its
// sidecar captures: one of another node (not registered here, known
// through the cluster's pods; RST from sk_lookup) and one of this node
// registered without a sidecar (EPERM at connect). It lets through, on
// the same port, a meshed pod and a source it does not know; on a port
// excluded from inbound capture, the known plaintext pods too (the
// sidecar never sees that traffic); and everything once the policy is
// PERMISSIVE. The sets are compiled by package policy.
func TestKernelPeerAuthStrict(t *testing.T) {
	m := newMesh(t)
	nodeA := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	nodeB := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	testnet.ConnectNodes(t, nodeA, nodeB)
	const excluded = 9090
	web := m.addPod(nodeA, "web", injected(istio.AnnotationExcludeInboundPorts, fmt.Sprint(excluded)))
	webExtra := m.start(web, "web-app2", appUID, "echo", "--port", fmt.Sprint(excluded))
	if _, err := webExtra.WaitEvent(waitFor, "ready"); err != nil {
		t.Fatal(err)
	}
	frontend := m.addPod(nodeA, "frontend", injected())
	// Registered by the CNI plugin with its annotations, none of them
	// Istio's: a pod of this node known to have no sidecar.
	plainLocal := m.addPod(nodeA, "plain", map[string]string{"app": "plain"})
	plainRemote := m.addPod(nodeB, "rplain", nil) // another node's pod, not injected
	outsider := m.addPod(nodeB, "outsider", nil)  // not known at all
	// A STRICT replica of web on another node: this node does not know
	// which of its ports are captured, so it never refuses plaintext to it
	// (that node's kernel judges it).
	webRemote := m.addPod(nodeB, "rweb", nil)

	ids := policy.NewAllocator()
	workloads := []policy.Workload{
		{Namespace: "shop", Name: "web", ServiceAccount: "web", Labels: map[string]string{"app": "web"}, IPs: []netip.Addr{web.IPv4, web.IPv6}},
		{Namespace: "shop", Name: "frontend", ServiceAccount: "frontend", Labels: map[string]string{"app": "frontend"}, IPs: []netip.Addr{frontend.IPv4, frontend.IPv6}},
		{Namespace: "shop", Name: "web-remote", ServiceAccount: "web", Labels: map[string]string{"app": "web"}, IPs: []netip.Addr{webRemote.IPv4, webRemote.IPv6}},
	}
	plain := []netip.Addr{plainLocal.IPv4, plainLocal.IPv6, plainRemote.IPv4, plainRemote.IPv6}
	apply := func(mode securityv1beta1.PeerAuthentication_MutualTLS_Mode) policy.Result {
		t.Helper()
		in := policy.Input{Workloads: workloads, PeerAuthentications: []*securityv1.PeerAuthentication{webPeerAuth(mode)}}
		pol, res := compiledPolicy(t, in, ids, plain...)
		if err := m.dp.SetPolicy(pol); err != nil {
			t.Fatal(err)
		}
		return res
	}
	res := apply(securityv1beta1.PeerAuthentication_MutualTLS_STRICT)
	if res.WorkloadSet["shop/web"] < 0 || res.WorkloadSet["shop/web-remote"] < 0 || res.WorkloadSet["shop/frontend"] >= 0 {
		t.Fatalf("sets: %v, want one for web and its replica only", res.WorkloadSet)
	}
	for _, p := range []*meshPod{web, frontend} {
		id := res.IPIdentity[p.IPv4]
		if err := m.dp.AddPod(datapath.Pod{NetnsPath: p.NS.Path(), Cookie: p.Cookie,
			IPs: []netip.Addr{p.IPv4, p.IPv6}, Traffic: p.Traffic, Identity: uint32(id)}); err != nil {
			t.Fatal(err)
		}
	}
	to := func(p *meshPod, port uint16) netip.AddrPort { return netip.AddrPortFrom(p.IPv4, port) }
	type probe struct {
		name string
		from *meshPod
		to   netip.AddrPort
		want string // "" allowed, else a substring of the error
	}
	run := func(probes []probe) {
		t.Helper()
		for _, tc := range probes {
			got := m.tryConnect(tc.from, appUID, tc.to)
			switch {
			case tc.want == "" && got != "":
				t.Errorf("%s: denied: %s", tc.name, got)
			case tc.want != "" && !strings.Contains(got, tc.want):
				t.Errorf("%s: got %q, want %q", tc.name, got, tc.want)
			}
		}
	}
	before := m.counters()
	run([]probe{
		{"plaintext pod of another node -> web, captured port", plainRemote, to(web, appPort), "connection refused"},
		{"plaintext pod of another node -> web over IPv6", plainRemote, netip.AddrPortFrom(web.IPv6, appPort), "connection refused"},
		{"plaintext pod of this node -> web, captured port", plainLocal, to(web, appPort), "operation not permitted"},
		{"plaintext pod of another node -> web, excluded port", plainRemote, to(web, excluded), ""},
		{"plaintext pod of this node -> web, excluded port", plainLocal, to(web, excluded), ""},
		{"unknown source -> web, captured port", outsider, to(web, appPort), ""},
		{"meshed frontend -> web, captured port", frontend, to(web, appPort), ""},
		{"plaintext pod -> frontend (no STRICT there)", plainRemote, to(frontend, appPort), ""},
		{"plaintext pod of this node -> web's replica on another node", plainLocal, to(webRemote, appPort), ""},
	})
	after := m.counters()
	if after["policy.ingress_denied"]-before["policy.ingress_denied"] < 2 || after["policy.egress_denied"]-before["policy.egress_denied"] < 1 {
		t.Errorf("policy counters did not move: before %v, after %v", nonZero(before), nonZero(after))
	}
	found := false
	for _, d := range m.dp.Denials() {
		if d.Dst == web.IPv4 && d.Src == plainRemote.IPv4 && d.Direction == "ingress" && d.Reason == "deny-rule" &&
			len(d.Policies) == 1 && d.Policies[0] == "PeerAuthentication shop/web" {
			found = true
		}
	}
	if !found {
		t.Errorf("no denial record naming the PeerAuthentication: %+v", m.dp.Denials())
	}

	apply(securityv1beta1.PeerAuthentication_MutualTLS_PERMISSIVE)
	run([]probe{
		{"PERMISSIVE: plaintext pod of another node -> web", plainRemote, to(web, appPort), ""},
		{"PERMISSIVE: plaintext pod of this node -> web", plainLocal, to(web, appPort), ""},
	})
}

func peerAuthYAML(mode string) string {
	return fmt.Sprintf(`apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  mtls: {mode: %s}
`, mode)
}

// TestAgentPeerAuthStrict is the STRICT scenario through the agent process
// in standalone mode: a PeerAuthentication in the config folder, a pod
// registered with annotations that show no sidecar (known plaintext), a
// meshed pod and a pod the agent does not know. The plaintext pod is
// refused on web's captured port and let through on its excluded one; an
// edit of the folder to PERMISSIVE lets it through everywhere.
func TestAgentPeerAuthStrict(t *testing.T) {
	w := newPolicyWorld(t)
	web := w.pod(w.nodeA, "web")
	extra := w.m.start(web, "web-app2", appUID, "echo", "--port", "9090")
	if _, err := extra.WaitEvent(waitFor, "ready"); err != nil {
		t.Fatal(err)
	}
	frontend := w.pod(w.nodeA, "frontend")
	plain := w.pod(w.nodeA, "plain")
	outsider := w.pod(w.nodeB, "outsider")
	w.start(map[string]string{"peerauth.yaml": peerAuthYAML("STRICT")})
	w.register(web, api.PodRegistration{ServiceAccount: "web", Labels: map[string]string{"app": "web"},
		Annotations: injected(istio.AnnotationExcludeInboundPorts, "9090")})
	w.register(frontend, api.PodRegistration{ServiceAccount: "frontend", Labels: map[string]string{"app": "frontend"}, Annotations: injected()})
	w.register(plain, api.PodRegistration{ServiceAccount: "plain", Labels: map[string]string{"app": "plain"},
		Annotations: map[string]string{"kubernetes.io/config.source": "api"}})
	if st := w.podPolicy("web"); !st.Enforced {
		t.Fatalf("web's policy: %+v, want enforced", st)
	}
	w.expect("plaintext pod -> web, captured port", plain, to(web), "operation not permitted")
	w.expect("plaintext pod -> web, excluded port", plain, netip.AddrPortFrom(web.IPv4, 9090), "")
	w.expect("unknown source -> web", outsider, to(web), "")
	w.expect("meshed frontend -> web", frontend, to(web), "")
	if d := w.ag.get("/denials"); !strings.Contains(d, "PeerAuthentication shop/web") {
		t.Errorf("/denials does not name the PeerAuthentication: %s", d)
	}

	w.write("peerauth.yaml", peerAuthYAML("PERMISSIVE"))
	eventually(t, "the PERMISSIVE edit applied", func() bool {
		c := w.m.start(plain, "plain-poll", appUID, "client", "--target", to(web).String(), "--messages", "1", "--timeout", "3s")
		c.WaitTimeout(10 * time.Second)
		res, err := c.WaitEvent(time.Second, "result")
		return err == nil && res.Bool("ok")
	})
	w.expect("PERMISSIVE: plaintext pod -> web", plain, to(web), "")
}
