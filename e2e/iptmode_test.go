package e2e

import (
	"fmt"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/meshsplice/meshsplice/agent"
	"github.com/meshsplice/meshsplice/agent/api"
	"github.com/meshsplice/meshsplice/baseline"
	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/internal/testnet"
	"github.com/meshsplice/meshsplice/istio"
)

// Gradual adoption (issue 12, item 5): pods that Istio's own iptables
// capture (istio-iptables rules, as istio-init writes them, from package
// baseline) next to pods meshsplice captures. meshsplice must not capture
// the iptables pods a second time, and must splice their sidecar <->
// sidecar hops although the server's iptables REDIRECT changes the port its
// sidecar's socket sees (bpf/iptmode.h).

// iptablesPod is a pod registered in iptables mode (meshsplice.io/capture:
// iptables) with Istio's real sidecar rules in its netns, removed by the
// test's cleanup.
func (m *mesh) iptablesPod(node *testnet.BridgeNet, name string, ann map[string]string) *meshPod {
	m.t.Helper()
	p := m.addPod(node, name, ann)
	if !p.Traffic.IPTables || p.Traffic.Capture {
		m.t.Fatalf("pod %s: traffic %+v is not iptables mode", name, p.Traffic)
	}
	m.applyIstioRules(p)
	return p
}

// applyIstioRules loads Istio's sidecar rules (IPv4 and IPv6) into p and
// removes them at cleanup, failing the test if any is left.
func (m *mesh) applyIstioRules(p *meshPod) {
	t := m.t
	t.Helper()
	cleanup, err := baseline.Apply(p.NS.Path(), baseline.Options{IPv6: true})
	if err != nil {
		t.Fatalf("istio iptables in %s: %v", p.Name, err)
	}
	t.Cleanup(func() {
		if err := cleanup(); err != nil {
			t.Errorf("remove istio iptables of %s: %v", p.Name, err)
		}
	})
}

func iptablesMode() map[string]string { return injected(istio.AnnotationCapture, "iptables") }

// natPeers counts the entries of ms_nat_peers: what a connecting end left
// for an accepting end that never took it.
func (m *mesh) natPeers() int {
	m.t.Helper()
	nm, err := ebpf.LoadPinnedMap(filepath.Join(m.pin, "maps", "ms_nat_peers"), nil)
	if err != nil {
		m.t.Fatal(err)
	}
	defer nm.Close()
	n := 0
	k, v := make([]byte, nm.KeySize()), make([]byte, nm.ValueSize())
	it := nm.Iterate()
	for it.Next(&k, &v) {
		n++
	}
	if err := it.Err(); err != nil {
		m.t.Fatal(err)
	}
	return n
}

// oneSidecarHop asserts that the app's connection went through exactly one
// outbound hop (client sidecar) and one inbound hop (server sidecar), each
// seeing target as the original destination, and reached the server app
// once, from the inbound passthrough source.
func oneSidecarHop(t *testing.T, client, server *meshPod, target netip.AddrPort, v6 bool) {
	t.Helper()
	out := waitAccepts(t, client.Sidecar, "outbound", 1)
	if len(out) != 1 || origDst(out[0].Str("orig_dst")) != target {
		t.Errorf("client sidecar outbound accepts = %v, want one with orig_dst %s", out, target)
	}
	in := waitAccepts(t, server.Sidecar, "inbound", 1)
	if len(in) != 1 || origDst(in[0].Str("orig_dst")) != target {
		t.Errorf("server sidecar inbound accepts = %v, want one with orig_dst %s", in, target)
	}
	// A second capture would show up as a second accept: the client
	// sidecar's own connection captured again (outbound or inbound of the
	// client), or the server sidecar's passthrough captured again.
	if n := len(acceptEvents(client.Sidecar, "inbound")); n != 0 {
		t.Errorf("client sidecar got %d inbound connections, want 0", n)
	}
	if n := len(acceptEvents(server.Sidecar, "outbound")); n != 0 {
		t.Errorf("server sidecar got %d outbound connections, want 0", n)
	}
	if n := len(acceptEvents(server.Sidecar, "inbound")); n != 1 {
		t.Errorf("server sidecar got %d inbound connections, want 1", n)
	}
	apps := acceptEvents(server.App, "")
	pass := "127.0.0.6"
	if v6 {
		pass = "::6"
	}
	if len(apps) != 1 {
		t.Errorf("server app accepts = %v, want 1", apps)
	} else if p, err := netip.ParseAddrPort(apps[0].Str("peer")); err != nil || p.Addr().Unmap().String() != pass {
		t.Errorf("server app accepted from %s, want the sidecar's passthrough %s", apps[0].Str("peer"), pass)
	}
}

// TestIptablesModeSidecarToSidecar: every mix of a pod under Istio's
// iptables and a meshsplice-captured pod, IPv4 and IPv6. The app's
// checksummed echo crosses exactly one sidecar per pod, SO_ORIGINAL_DST is
// right on both sidecars, meshsplice captures only its own pods, and the
// sidecar <-> sidecar hop is spliced: through the server's REDIRECT when
// the server is an iptables pod (sockops.nat_paired/nat_matched).
func TestIptablesModeSidecarToSidecar(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		for _, tc := range []struct {
			name                   string
			clientIPT, serverIPT   bool
			wantCaptured, wantSkLk uint64
			iptAnn                 map[string]string // default iptablesMode()
		}{
			{name: "iptables-to-iptables", clientIPT: true, serverIPT: true},
			// Injected with istio-init: the status annotation says so,
			// nothing else does.
			{name: "istio-init-to-istio-init", clientIPT: true, serverIPT: true, iptAnn: map[string]string{
				istio.AnnotationStatus: `{"initContainers":["istio-init"],"containers":["istio-proxy"]}`}},
			{name: "meshsplice-to-iptables", serverIPT: true, wantCaptured: 1},
			{name: "iptables-to-meshsplice", clientIPT: true, wantSkLk: 1},
		} {
			t.Run(family(v6)+"/"+tc.name, func(t *testing.T) {
				m := newMesh(t)
				node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
				pod := func(name string, ipt bool) *meshPod {
					if ipt && tc.iptAnn != nil {
						return m.iptablesPod(node, name, tc.iptAnn)
					}
					if ipt {
						return m.iptablesPod(node, name, iptablesMode())
					}
					return m.addPod(node, name, injected())
				}
				client, server := pod("client", tc.clientIPT), pod("server", tc.serverIPT)
				before := m.counters()

				const messages, size = 200, 1000
				target := netip.AddrPortFrom(server.addr(v6), appPort)
				m.client(client, appUID, target, "--messages", fmt.Sprint(messages), "--size", fmt.Sprint(size))
				d := m.counters().Sub(before)
				t.Logf("counters: %v", nonZero(d))

				oneSidecarHop(t, client, server, target, v6)
				m.checkModes(t, map[*meshPod]bool{client: tc.clientIPT, server: tc.serverIPT})
				sidecarErrors(t, client, server)
				nat := uint64(0)
				if tc.serverIPT {
					nat = 1
				}
				for k, v := range map[string]uint64{
					"connect.captured":       tc.wantCaptured,
					"sk_lookup.captured":     tc.wantSkLk,
					"sockops.sock_inserted":  2,
					"sockops.nat_paired":     nat,
					"sockops.nat_matched":    nat,
					"sockops.nat_miss":       0,
					"sk_msg.miss_first_send": 0,
				} {
					if d[k] != v {
						t.Errorf("%s = %d, want %d", k, d[k], v)
					}
				}
				checkSpliceAccounting(t, d, 2*uint64(messages*(size+12)), 0)
				eventually(t, "the splice map and ms_nat_peers to empty", func() bool {
					st, err := datapath.Inspect(m.pin)
					return err == nil && st.SplicedSockets == 0 && m.natPeers() == 0
				})
			})
		}
	}
}

// TestIptablesModeMisses: the two ways the pairing through REDIRECT can
// miss each fall back to TCP, counted, with the echo intact:
//   - the accepting end finds no connecting end: the client app's port is
//     excluded from its capture (excludeOutboundPorts), so it reaches the
//     iptables server's sidecar without a sidecar of its own and left no
//     entry (sockops.nat_miss);
//   - the connecting end's peer is not where it computed it: the server is
//     registered in iptables mode but has no iptables rules, so nothing
//     REDIRECTs to 15006 and the client sidecar's first send misses
//     (sk_msg.miss_first_send).
func TestIptablesModeMisses(t *testing.T) {
	t.Run("accepting-end", func(t *testing.T) {
		m := newMesh(t)
		node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
		client := m.addPod(node, "client", injected(istio.AnnotationExcludeOutboundPorts, fmt.Sprint(appPort)))
		server := m.iptablesPod(node, "server", iptablesMode())
		before := m.counters()
		target := netip.AddrPortFrom(server.IPv4, appPort)
		m.client(client, appUID, target, "--messages", "50", "--size", "100")
		d := m.counters().Sub(before)
		t.Logf("counters: %v", nonZero(d))
		if d["sockops.nat_miss"] != 1 || d["sockops.sock_inserted"] != 0 || d["sk_msg.redirected"] != 0 {
			t.Errorf("nat_miss %d, sock_inserted %d, redirected %d; want 1, 0, 0",
				d["sockops.nat_miss"], d["sockops.sock_inserted"], d["sk_msg.redirected"])
		}
		if n := len(waitAccepts(t, server.Sidecar, "inbound", 1)); n != 1 {
			t.Errorf("server sidecar got %d connections, want 1", n)
		}
	})
	t.Run("connecting-end", func(t *testing.T) {
		m := newMesh(t)
		node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
		client := m.addPod(node, "client", injected())
		server := m.addPod(node, "server", iptablesMode()) // no rules
		before := m.counters()
		target := netip.AddrPortFrom(server.IPv4, appPort)
		m.client(client, appUID, target, "--messages", "50", "--size", "100")
		d := m.counters().Sub(before)
		t.Logf("counters: %v", nonZero(d))
		if d["sockops.nat_paired"] != 1 || d["sockops.sock_inserted"] != 1 ||
			d["sk_msg.miss_first_send"] != 1 || d["sk_msg.redirected"] != 0 {
			t.Errorf("nat_paired %d, sock_inserted %d, miss_first_send %d, redirected %d; want 1, 1, 1, 0",
				d["sockops.nat_paired"], d["sockops.sock_inserted"], d["sk_msg.miss_first_send"], d["sk_msg.redirected"])
		}
		if n := len(acceptEvents(server.Sidecar, "inbound")); n != 0 {
			t.Errorf("server sidecar got %d connections without iptables, want 0", n)
		}
		eventually(t, "ms_nat_peers to empty (the client's close removes its entry)", func() bool { return m.natPeers() == 0 })
	})
}

// TestIptablesPodRemovedMidStream: the iptables server pod is unregistered
// while a pipelined, checksummed stream to it is spliced. The stream ends
// intact (its sockets stay spliced until they close, as for any pod), the
// next connection goes over plain TCP through Istio's iptables, and no
// entry is left behind.
func TestIptablesPodRemovedMidStream(t *testing.T) {
	m := newMesh(t)
	node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	client := m.addPod(node, "client", injected())
	server := m.iptablesPod(node, "server", iptablesMode())
	before := m.counters()
	target := netip.AddrPortFrom(server.IPv4, appPort)
	c := m.startStream(client, target)
	deadline := time.Now().Add(20 * time.Second)
	for m.counters().Sub(before)["sk_msg.redirected"] < 2000 {
		if time.Now().After(deadline) {
			t.Fatalf("stream not spliced: %v", nonZero(m.counters().Sub(before)))
		}
		time.Sleep(5 * time.Millisecond)
	}
	if err := m.dp.RemovePod(server.Cookie); err != nil {
		t.Fatal(err)
	}
	finishedOK(t, c, "stream to the removed iptables pod")
	d := m.counters().Sub(before)
	checkSpliceAccounting(t, d, 2*20000*(100+12), 0)

	before = m.counters()
	m.client(client, appUID, target, "--messages", "50", "--size", "100")
	d = m.counters().Sub(before)
	t.Logf("after removal: %v", nonZero(d))
	if d["sockops.sock_inserted"] != 0 || d["sk_msg.redirected"] != 0 || d["sockops.nat_paired"] != 0 {
		t.Errorf("a connection to the removed pod was spliced: %v", nonZero(d))
	}
	if n := len(waitAccepts(t, server.Sidecar, "inbound", 2)); n != 2 {
		t.Errorf("server sidecar got %d connections, want 2 (Istio's iptables still capture)", n)
	}
	eventually(t, "the splice map and ms_nat_peers to empty", func() bool {
		st, err := datapath.Inspect(m.pin)
		return err == nil && st.SplicedSockets == 0 && m.natPeers() == 0
	})
}

// checkModes asserts what `meshsplice status` says of each pod's mode,
// read back from the kernel: iptables or meshsplice.
func (m *mesh) checkModes(t *testing.T, ipt map[*meshPod]bool) {
	t.Helper()
	st, err := datapath.Inspect(m.pin)
	if err != nil {
		t.Fatal(err)
	}
	reports, err := agent.ReportPods(st, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	mode := map[uint64]string{}
	for _, r := range reports {
		mode[r.Cookie] = r.Mode
	}
	for p, isIPT := range ipt {
		want := istio.ModeMeshsplice
		if isIPT {
			want = istio.ModeIPTables
		}
		if mode[p.Cookie] != want {
			t.Errorf("status says pod %s is in mode %q, want %q", p.Name, mode[p.Cookie], want)
		}
	}
}

// TestIptablesModeThroughAgent: the agent registers pods in iptables mode
// from their annotations (here the injector's status listing istio-init,
// as the CNI passes it), captures none of them, says so in /pods, and
// keeps their kernel policy: egress is judged at connect, before Istio's
// NAT; ingress arrives REDIRECTed to the sidecar's port, where the kernel
// cannot see the destination port and leaves it to the sidecar.
func TestIptablesModeThroughAgent(t *testing.T) {
	w := newPolicyWorld(t)
	db := w.pod(w.nodeA, "db")
	frontend := w.pod(w.nodeA, "frontend")
	backend := w.pod(w.nodeA, "backend")
	remote := w.pod(w.nodeB, "remote-frontend")
	w.start(map[string]string{"policies.yaml": allowFromPrincipal("db", "db", "backend"),
		"remote.yaml": fmt.Sprintf(`apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: vm-frontend, namespace: shop}
spec: {address: %s, serviceAccount: frontend}
`, remote.IPv4)})
	istioInit := map[string]string{istio.AnnotationStatus: `{"initContainers":["istio-init"],"containers":["istio-proxy"]}`}
	for _, p := range []struct {
		pod *meshPod
		sa  string
	}{{db, "db"}, {frontend, "frontend"}, {backend, "backend"}} {
		st := w.register(p.pod, api.PodRegistration{ServiceAccount: p.sa, Labels: map[string]string{"app": p.sa}, Annotations: istioInit})
		if st.Capture || st.Mode != istio.ModeIPTables || !st.Splice {
			t.Fatalf("%s registered as capture %v, mode %q, splice %v; want iptables mode, spliced", p.sa, st.Capture, st.Mode, st.Splice)
		}
		w.m.applyIstioRules(p.pod)
		p.pod.Sidecar = w.m.start(p.pod, p.sa+"-sidecar", 1337, "sidecar")
		if _, err := p.pod.Sidecar.WaitEvent(waitFor, "ready"); err != nil {
			t.Fatal(err)
		}
	}
	before, _ := datapath.ReadPinnedCounters(w.m.pin)
	w.expect("backend -> db", backend, to(db), "")
	w.expect("frontend -> db (egress)", frontend, to(db), "operation not permitted")
	w.expect("remote frontend -> db (ingress, left to the sidecar)", remote, to(db), "")
	after, _ := datapath.ReadPinnedCounters(w.m.pin)
	d := after.Sub(before)
	t.Logf("counters: %v", nonZero(d))
	if d["connect.captured"] != 0 || d["sk_lookup.captured"] != 0 {
		t.Errorf("meshsplice captured pods under Istio's iptables: %v", nonZero(d))
	}
	if d["sockops.nat_matched"] != 1 || d["sk_msg.redirected"] == 0 {
		t.Errorf("backend -> db sidecar hop not spliced: %v", nonZero(d))
	}
	if st := w.podPolicy("db"); !st.Enforced || !strings.Contains(st.Reason, "only the sidecar judges") {
		t.Errorf("db's policy status %+v, want enforced with inbound left to the sidecar", st)
	}
	if n := len(acceptEvents(db.Sidecar, "inbound")); n != 2 {
		t.Errorf("db's sidecar got %d connections, want 2 (backend's, the remote's)", n)
	}
}
