package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/meshsplice/meshsplice/agent/api"
	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/internal/lab"
	"github.com/meshsplice/meshsplice/internal/testnet"
	"github.com/meshsplice/meshsplice/istio"
	"github.com/meshsplice/meshsplice/redirect"
)

// Registrations (issue 10, items 14-16): who owns a pod IP, what a failed
// or repeated registration leaves in the kernel, and how a sidecar's
// inbound listener always ends up in ms_listeners.

// registerAs registers pod p under container ID id, claiming ips.
func (a *agentProc) registerAs(id string, p *meshPod, ips []netip.Addr) (api.PodStatus, error) {
	return a.client.AddPod(context.Background(), api.PodRegistration{
		ContainerID: id, Netns: p.NS.Path(), IfName: "eth0", IPs: ips,
		PodName: p.Name, PodNamespace: "default", Annotations: injected(),
	})
}

// changeConfig edits the config folder (node splice off, then on again)
// and waits until the agent applied each edit: every registered pod is
// programmed again each time.
func (a *agentProc) changeConfig(dir, pin string) {
	a.t.Helper()
	ms := filepath.Join(dir, "meshsplice.yaml")
	if err := os.WriteFile(ms, []byte("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: meshsplice}\ndata: {splice: disabled}\n"), 0o644); err != nil {
		a.t.Fatal(err)
	}
	eventually(a.t, "splice switched off", func() bool { return !a.status(pin).Node.Splice })
	os.Remove(ms)
	eventually(a.t, "splice switched back on", func() bool { return a.status(pin).Node.Splice })
}

// ipOwner returns the netns cookie the kernel's ms_pod_ips gives ip.
func ipOwner(t *testing.T, pin string, ip netip.Addr) uint64 {
	t.Helper()
	st, err := datapath.Inspect(pin)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range st.Pods {
		if slices.Contains(p.IPs, ip) {
			return p.Cookie
		}
	}
	return 0
}

func kernelHasPod(t *testing.T, pin string, cookie uint64) bool {
	t.Helper()
	st, err := datapath.Inspect(pin)
	if err != nil {
		t.Fatal(err)
	}
	return slices.ContainsFunc(st.Pods, func(p datapath.Pod) bool { return p.Cookie == cookie })
}

func agentPods(t *testing.T, a *agentProc) []api.PodStatus {
	t.Helper()
	var out []api.PodStatus
	if err := json.Unmarshal([]byte(a.get("/pods")), &out); err != nil {
		t.Fatal(err)
	}
	return out
}

// ip runs `ip -n NS args...`.
func ip(t *testing.T, ns *testnet.NetNS, args ...string) {
	t.Helper()
	ns.Run(t, append([]string{"ip"}, args...)...)
}

// dialFrom connects from the test process inside ns (not captured: the
// test is in no meshsplice cgroup; inbound capture is per netns) and
// returns the connection's error.
func dialFrom(ns *testnet.NetNS, target netip.AddrPort) error {
	return ns.Do(func() error {
		c, err := net.DialTimeout("tcp", target.String(), 3*time.Second)
		if err != nil {
			return err
		}
		return c.Close()
	})
}

// testListeners opens n SO_REUSEPORT listeners on [::]:port inside ns (a
// sidecar with one listener per worker, as Envoy has) and accepts on
// them, reporting on the returned channel which listener accepted.
func testListeners(t *testing.T, ns *testnet.NetNS, port, n int) ([]*net.TCPListener, <-chan int) {
	t.Helper()
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
		})
		return errors.Join(err, serr)
	}}
	lc.SetMultipathTCP(false) // a sockmap refuses MPTCP listeners
	accepted := make(chan int, 64)
	var lns []*net.TCPListener
	for i := range n {
		var ln net.Listener
		err := ns.Do(func() error {
			var err error
			ln, err = lc.Listen(context.Background(), "tcp", fmt.Sprintf("[::]:%d", port))
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		lns = append(lns, ln.(*net.TCPListener))
		go func() {
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				c.Close()
				accepted <- i
			}
		}()
	}
	return lns, accepted
}

func socketCookie(t *testing.T, ln *net.TCPListener) uint64 {
	t.Helper()
	rc, err := ln.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var cookie uint64
	var serr error
	if err := rc.Control(func(fd uintptr) {
		cookie, serr = unix.GetsockoptUint64(int(fd), unix.SOL_SOCKET, unix.SO_COOKIE)
	}); err != nil || serr != nil {
		t.Fatal(err, serr)
	}
	return cookie
}

// listenerSlots maps the socket cookies in ms_listeners to their index.
func listenerSlots(t *testing.T, pin string) map[uint64]uint32 {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(filepath.Join(pin, "maps", "ms_listeners"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	out := map[uint64]uint32{}
	for i := uint32(0); i < 16; i++ {
		var cookie uint64
		if err := m.Lookup(&i, &cookie); err == nil {
			out[cookie] = i
		}
	}
	return out
}

// TestStaleRegistrationNeverTakesANewOwnersIP: the CNI DEL of a pod is
// missed while the agent is down; its netns lingers (a process still holds
// it) but its interface and IP are gone. The IP goes to a new pod. The old
// registration must not take the IP back at the next config change: the
// new pod's inbound connections would be judged as the old pod's, which has
// no sidecar any more (RST).
func TestStaleRegistrationNeverTakesANewOwnersIP(t *testing.T) {
	m, ag, configDir := agentMesh(t)
	node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	old := m.addPod(node, "old", nil)
	fresh := m.addPod(node, "fresh", nil)
	client := m.addPod(node, "client", nil)
	ag.register(old, injected())

	ag.stop()
	// CNI DEL, missed by the agent: the interface (and its IP) goes.
	ip(t, node.Node, "link", "del", old.HostVeth)
	ag.start()

	// The address goes to the new pod.
	ip(t, fresh.NS, "addr", "add", netip.PrefixFrom(old.IPv4, 24).String(), "dev", "eth0")
	if _, err := ag.registerAs("c-fresh", fresh, []netip.Addr{old.IPv4}); err != nil {
		t.Fatalf("register the IP's new owner: %v", err)
	}
	for _, p := range agentPods(t, ag) {
		if p.Pod.ContainerID == "c-old" && slices.Contains(p.Pod.IPs, old.IPv4) {
			t.Fatalf("the stale registration still claims %s: %+v", old.IPv4, p)
		}
	}
	fresh.Sidecar = m.start(fresh, "fresh-sidecar", 1337, "sidecar")
	if _, err := fresh.Sidecar.WaitEvent(waitFor, "ready"); err != nil {
		t.Fatal(err)
	}
	if got := ipOwner(t, m.pin, old.IPv4); got != fresh.Cookie {
		t.Fatalf("after registration %s belongs to netns %d, want the new pod's %d", old.IPv4, got, fresh.Cookie)
	}
	ag.changeConfig(configDir, m.pin)
	if got := ipOwner(t, m.pin, old.IPv4); got != fresh.Cookie {
		t.Fatalf("after a config change %s belongs to netns %d (old pod %d), want the new pod's %d", old.IPv4, got, old.Cookie, fresh.Cookie)
	}
	m.client(client, appUID, netip.AddrPortFrom(old.IPv4, appPort), "--messages", "5")
	if len(acceptEvents(fresh.Sidecar, "inbound")) == 0 {
		t.Fatal("the new owner's sidecar never saw the connection")
	}
}

// TestTwoLivePodsCannotClaimOneIP: a second live pod that holds and claims
// an address a registered pod still holds is refused with a clear error,
// and the kernel keeps the first owner.
func TestTwoLivePodsCannotClaimOneIP(t *testing.T) {
	m, ag, _ := agentMesh(t)
	node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	first := m.addPod(node, "first", nil)
	second := m.addPod(node, "second", nil)
	ag.register(first, injected())
	ip(t, second.NS, "addr", "add", netip.PrefixFrom(first.IPv4, 32).String(), "dev", "lo")
	_, err := ag.registerAs("c-second", second, []netip.Addr{second.IPv4, first.IPv4})
	if !errors.Is(err, api.ErrConflict) || !strings.Contains(err.Error(), first.IPv4.String()) {
		t.Fatalf("second claim of %s: got %v, want a conflict naming the address", first.IPv4, err)
	}
	if got := ipOwner(t, m.pin, first.IPv4); got != first.Cookie {
		t.Fatalf("%s belongs to netns %d, want the first pod's %d", first.IPv4, got, first.Cookie)
	}
	if kernelHasPod(t, m.pin, second.Cookie) {
		t.Fatal("the refused pod reached the kernel")
	}
}

// TestRegistrationForgottenWhenNetnsGoes: a pod whose netns disappears
// while the agent runs (its DEL never came) is forgotten at the next config
// change and by the periodic sweep, in the agent and in the kernel.
func TestRegistrationForgottenWhenNetnsGoes(t *testing.T) {
	for _, viaConfig := range []bool{true, false} {
		t.Run(fmt.Sprintf("config_change=%v", viaConfig), func(t *testing.T) {
			m, ag, configDir := agentMesh(t)
			node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
			gone := m.addPod(node, "gone", nil)
			ag.register(gone, injected())
			if err := lab.RemoveNetns(gone.NS.Path()); err != nil {
				t.Fatal(err)
			}
			if viaConfig {
				ag.changeConfig(configDir, m.pin)
			}
			waitLong(t, "the agent forgets the pod", func() bool {
				return len(agentPods(t, ag)) == 0 && !kernelHasPod(t, m.pin, gone.Cookie)
			})
		})
	}
}

// waitLong is eventually for what a periodic pass does (every few seconds).
func waitLong(t *testing.T, what string, cond func() bool) {
	t.Helper()
	waitUntil(t, what, 30*time.Second, cond)
}

// TestReRegisterWithAnotherNetnsForgetsTheOld: the same container ID
// registered again with another netns (a sandbox re-created under the same
// ID) leaves nothing of the old netns in the kernel.
func TestReRegisterWithAnotherNetnsForgetsTheOld(t *testing.T) {
	m, ag, _ := agentMesh(t)
	node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	first := m.addPod(node, "first", nil)
	second := m.addPod(node, "second", nil)
	if _, err := ag.registerAs("c-same", first, []netip.Addr{first.IPv4, first.IPv6}); err != nil {
		t.Fatal(err)
	}
	// The new sandbox kept one address of the old one (static IPAM).
	ip(t, second.NS, "addr", "add", netip.PrefixFrom(first.IPv6, 128).String(), "dev", "lo")
	if _, err := ag.registerAs("c-same", second, []netip.Addr{second.IPv4, first.IPv6}); err != nil {
		t.Fatal(err)
	}
	if kernelHasPod(t, m.pin, first.Cookie) || ipOwner(t, m.pin, first.IPv4) != 0 {
		t.Fatal("the old netns of the re-registered container is still in the kernel")
	}
	if !kernelHasPod(t, m.pin, second.Cookie) || ipOwner(t, m.pin, second.IPv4) != second.Cookie || ipOwner(t, m.pin, first.IPv6) != second.Cookie {
		t.Fatal("the new netns is not registered with its addresses")
	}
	if pins, _ := filepath.Glob(filepath.Join(m.pin, "links", "netns", fmt.Sprint(first.Cookie))); len(pins) != 0 {
		t.Fatalf("sk_lookup link of the old netns still pinned: %v", pins)
	}
}

// podKeys counts the port and range rules of a netns cookie in the kernel.
func podKeys(t *testing.T, pin string, cookie uint64) (ports, ranges int) {
	t.Helper()
	pm, err := ebpf.LoadPinnedMap(filepath.Join(pin, "maps", "ms_ports"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer pm.Close()
	var pk redirect.CaptureMsPortKey
	var v uint8
	for it := pm.Iterate(); it.Next(&pk, &v); {
		if pk.Netns == cookie {
			ports++
		}
	}
	rm, err := ebpf.LoadPinnedMap(filepath.Join(pin, "maps", "ms_ranges"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer rm.Close()
	var rk redirect.CaptureMsRangeKey
	for it := rm.Iterate(); it.Next(&rk, &v); {
		if rk.Netns == cookie {
			ranges++
		}
	}
	return ports, ranges
}

// TestFailedRegistrationLeavesNoTrace: a registration that fails half-way
// (ms_ports fills up; a netns path that is not there) leaves the kernel as
// it was: a new pod leaves no rule, address or link, a registered pod keeps
// its previous settings.
func TestFailedRegistrationLeavesNoTrace(t *testing.T) {
	m := newMesh(t)
	node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	pod := m.addPod(node, "pod", injected(istio.AnnotationExcludeOutboundPorts, "9000"))
	allPorts := make([]uint16, 0, 65535)
	for p := 1; p <= 65535; p++ {
		allPorts = append(allPorts, uint16(p))
	}
	huge := pod.Traffic
	huge.IncludeInboundPorts = allPorts
	huge.ExcludeOutboundPorts = allPorts
	huge.ExcludeOutboundRanges = []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}
	other := testnet.NewNetNS(t, "other")
	otherCookie, err := other.Cookie()
	if err != nil {
		t.Fatal(err)
	}
	spare := netip.MustParseAddr("192.0.2.77")
	for _, tc := range []struct {
		name string
		pod  datapath.Pod
	}{
		{"new pod, map full", datapath.Pod{NetnsPath: other.Path(), Cookie: otherCookie, IPs: []netip.Addr{spare}, Traffic: huge}},
		{"new pod, netns missing", datapath.Pod{NetnsPath: "/run/netns/mstest-not-there", Cookie: 777, IPs: []netip.Addr{spare}, Traffic: huge}},
		{"registered pod, map full", datapath.Pod{NetnsPath: pod.NS.Path(), Cookie: pod.Cookie, IPs: []netip.Addr{pod.IPv4, spare}, Traffic: huge}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before, err := m.dp.Pods()
			if err != nil {
				t.Fatal(err)
			}
			wantPorts, wantRanges := podKeys(t, m.pin, tc.pod.Cookie)
			if err := m.dp.AddPod(tc.pod); err == nil {
				t.Fatal("registration succeeded")
			} else {
				t.Logf("registration failed as it should: %v", err)
			}
			after, err := m.dp.Pods()
			if err != nil {
				t.Fatal(err)
			}
			if fmt.Sprint(after) != fmt.Sprint(before) {
				t.Fatalf("pods changed:\nbefore %+v\nafter  %+v", before, after)
			}
			if p, r := podKeys(t, m.pin, tc.pod.Cookie); p != wantPorts || r != wantRanges {
				t.Fatalf("rules of netns %d: %d ports, %d ranges; want %d, %d", tc.pod.Cookie, p, r, wantPorts, wantRanges)
			}
			if o := ipOwner(t, m.pin, spare); o != 0 {
				t.Fatalf("%s left registered to netns %d", spare, o)
			}
			if tc.pod.Cookie != pod.Cookie {
				if pins, _ := filepath.Glob(filepath.Join(m.pin, "links", "netns", fmt.Sprint(tc.pod.Cookie))); len(pins) != 0 {
					t.Fatalf("sk_lookup link left pinned: %v", pins)
				}
			}
		})
	}
	// The registered pod still works as before.
	client := m.addPod(node, "client", nil)
	m.client(client, appUID, netip.AddrPortFrom(pod.IPv4, appPort), "--messages", "5")
}

// TestNetnsPathIsCheckedAgainstCookie: a registration whose netns path now
// names another namespace (a reused /proc/PID/ns/net, a re-created name)
// is refused; it must not run the listener iterator there, which would put
// the other pod's sidecar listener into this pod's slot and hand this
// pod's inbound connections to the other pod.
func TestNetnsPathIsCheckedAgainstCookie(t *testing.T) {
	m := newMesh(t)
	node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	victim := m.addPod(node, "victim", nil)
	other := m.addPod(node, "other", injected())
	client := m.addPod(node, "client", nil)
	reg := datapath.Pod{NetnsPath: victim.NS.Path(), Cookie: victim.Cookie,
		IPs: []netip.Addr{victim.IPv4, victim.IPv6}, Traffic: other.Traffic}
	if err := m.dp.AddPod(reg); err != nil {
		t.Fatal(err)
	}
	reg.NetnsPath = other.NS.Path()
	err := m.dp.AddPod(reg)
	if !errors.Is(err, datapath.ErrNetnsMismatch) {
		t.Fatalf("registration with another pod's netns path: %v, want ErrNetnsMismatch", err)
	}
	if ok, err := m.dp.ListenerReady(victim.Cookie); err != nil || ok {
		t.Fatalf("the victim pod has a listener (another pod's): %v %v", ok, err)
	}
	seen := len(acceptEvents(other.Sidecar, "inbound"))
	if err := dialFrom(client.NS, netip.AddrPortFrom(victim.IPv4, appPort)); err == nil {
		t.Fatal("connection to a pod without sidecar succeeded")
	}
	if n := len(acceptEvents(other.Sidecar, "inbound")); n != seen {
		t.Fatal("another pod's sidecar accepted the victim's connection")
	}
}

// TestFreedListenerSlotNeverServesTheNextPod: the listener iterator that
// raced RemovePod put the removed pod's listener back into its freed slot;
// the next pod given that slot must not have its inbound connections
// handed to that listener, in another namespace.
func TestFreedListenerSlotNeverServesTheNextPod(t *testing.T) {
	m := newMesh(t)
	node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	removed := m.addPod(node, "removed", nil)
	next := m.addPod(node, "next", nil)
	client := m.addPod(node, "client", nil)
	tr, _, err := istio.ParseTraffic(injected(), istio.DefaultDefaults())
	if err != nil {
		t.Fatal(err)
	}
	lns, accepted := testListeners(t, removed.NS, int(tr.InboundPort), 1)
	if err := m.dp.AddPod(datapath.Pod{NetnsPath: removed.NS.Path(), Cookie: removed.Cookie,
		IPs: []netip.Addr{removed.IPv4}, Traffic: tr}); err != nil {
		t.Fatal(err)
	}
	cookie := socketCookie(t, lns[0])
	idx, ok := listenerSlots(t, m.pin)[cookie]
	if !ok {
		t.Fatal("the listener was not registered")
	}
	if err := m.dp.RemovePod(removed.Cookie); err != nil {
		t.Fatal(err)
	}
	// What the racing iterator did.
	lm, err := ebpf.LoadPinnedMap(filepath.Join(m.pin, "maps", "ms_listeners"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer lm.Close()
	rc, _ := lns[0].SyscallConn()
	var uerr error
	rc.Control(func(fd uintptr) { uerr = lm.Update(&idx, uint64(fd), ebpf.UpdateAny) })
	if uerr != nil {
		t.Fatal(uerr)
	}
	if err := m.dp.AddPod(datapath.Pod{NetnsPath: next.NS.Path(), Cookie: next.Cookie,
		IPs: []netip.Addr{next.IPv4}, Traffic: tr}); err != nil {
		t.Fatal(err)
	}
	before := m.counters()
	err = dialFrom(client.NS, netip.AddrPortFrom(next.IPv4, appPort))
	d := m.counters().Sub(before)
	t.Logf("connection to the next pod: %v; counters %v", err, nonZero(d))
	select {
	case <-accepted:
		t.Fatal("the next pod's connection was accepted by the removed pod's listener")
	default:
	}
	// Refused at once, as for any pod whose sidecar is not listening: not
	// handed to a listener in another namespace (where the handshake dies).
	if !errors.Is(err, unix.ECONNREFUSED) || d["sk_lookup.refused_no_listener"] == 0 || d["sk_lookup.captured"] != 0 {
		t.Fatalf("want connection refused for lack of a listener, got %v", err)
	}
}
