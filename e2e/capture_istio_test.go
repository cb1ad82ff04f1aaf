package e2e

// Capture scenarios of issue 10 ("capture must equal Istio's rules"): each
// test is named after a case where the kernel once decided otherwise than
// istio-iptables (and istio/decide.go, its Go model).

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/internal/testnet"
	"github.com/meshsplice/meshsplice/istio"
	"github.com/meshsplice/meshsplice/redirect"
)

// TestOriginalDstWinsOverConntrack: in a pod whose netns has conntrack
// active (any nat rule, e.g. an istio-init that was left in place),
// conntrack answers SO_ORIGINAL_DST for every tracked connection, NATed or
// not: for the sidecar's accepted outbound socket it says 127.0.0.1:15001.
// The destination meshsplice stored at connect must win, or the sidecar
// forwards to itself and the connection is blackholed.
func TestOriginalDstWinsOverConntrack(t *testing.T) {
	m := newMesh(t)
	node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	server := m.addPod(node, "server", nil)
	client := m.addPod(node, "client", injected())
	// A REDIRECT rule for a port nobody uses turns conntrack on for the
	// namespace (a nat expression takes a conntrack reference; a bare
	// RETURN rule in a nat chain does not).
	for _, cmd := range []string{"iptables", "ip6tables"} {
		client.NS.Run(t, cmd, "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "9", "-j", "REDIRECT", "--to-ports", "9")
	}
	for _, v6 := range []bool{false, true} {
		t.Run(family(v6), func(t *testing.T) {
			target := netip.AddrPortFrom(server.addr(v6), appPort)
			seen := len(acceptEvents(client.Sidecar, "outbound"))
			before := m.counters()
			m.client(client, appUID, target, "--messages", "3")
			d := m.counters().Sub(before)
			out := waitAccepts(t, client.Sidecar, "outbound", seen+1)
			if len(out) != seen+1 || origDst(out[seen].Str("orig_dst")) != target {
				t.Fatalf("sidecar outbound accepts %v, want one for %s (counters %v)", out[seen:], target, nonZero(d))
			}
			if d["getsockopt.orig_dst_outbound"] != 1 || d["getsockopt.orig_dst_kernel"] != 0 {
				t.Fatalf("getsockopt counters: %v", nonZero(d))
			}
		})
	}
}

// TestEvictedOriginalDstFailsTheSidecar: ms_orig_dst is an LRU of
// MS_MAX_ORIG_DST entries for the whole node. When a captured connection's
// entry is evicted before the sidecar asked for it (the map filled up in
// between), the sidecar must get an error (Envoy then closes the
// connection), never its own listener's address; the miss and the eviction
// are counted.
func TestEvictedOriginalDstFailsTheSidecar(t *testing.T) {
	m := newMesh(t)
	node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	server := m.addPod(node, "server", nil)
	dir, err := os.MkdirTemp("", "mstest-gate-") // readable by the sidecar's uid 1337
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	gate := filepath.Join(dir, "gate")
	client := m.addPodWith(node, "client", injected(), "--orig-dst-gate", gate)

	before := m.counters()
	target := netip.AddrPortFrom(server.IPv4, appPort)
	c := m.start(client, "client", appUID, "client", "--target", target.String(), "--messages", "1", "--timeout", "20s")
	if _, err := client.Sidecar.WaitEvent(waitFor, "gate"); err != nil {
		t.Fatal(err)
	}
	// The connection's entry is stored (sockops at the SYN-ACK, before the
	// accept the sidecar just made). Fill the LRU with newer entries.
	if d := m.counters().Sub(before); d["sockops.orig_dst_stored"] != 1 {
		t.Fatalf("counters: %v", nonZero(d))
	}
	fillOrigDst(t, m.pin, client.Cookie)
	if err := os.WriteFile(gate, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	ev, err := client.Sidecar.WaitEvent(waitFor, "error")
	if err != nil {
		t.Fatalf("sidecar got an answer for an evicted destination: %v\n%s", err, strings.Join(client.Sidecar.Lines(), "\n"))
	}
	if ev.Str("stage") != "orig_dst" || ev.Str("errno") != "ENOENT" {
		t.Fatalf("sidecar error %v, want SO_ORIGINAL_DST failing with ENOENT", ev)
	}
	c.WaitTimeout(30 * time.Second)
	if res, err := c.WaitEvent(time.Second, "summary"); err != nil || res.Bool("ok") {
		t.Fatalf("client: %v %v, want a failed connection", err, res)
	}
	d := m.counters().Sub(before)
	if d["getsockopt.orig_dst_missing"] != 1 || d["getsockopt.orig_dst_outbound"] != 0 || d["getsockopt.orig_dst_inbound"] != 0 {
		t.Fatalf("getsockopt counters: %v", nonZero(d))
	}
	if d["sockops.orig_dst_evicted"] != 1 {
		t.Fatalf("eviction not counted at close: %v", nonZero(d))
	}
}

// fillOrigDst writes entries into the pinned ms_orig_dst, none of them a
// real socket's, until no entry of netns is left: the LRU evicts the older
// ones (it is approximate per CPU, so one round of MaxEntries writes may
// leave a few behind).
func fillOrigDst(t *testing.T, pin string, netns uint64) {
	t.Helper()
	om, err := ebpf.LoadPinnedMap(filepath.Join(pin, "maps", "ms_orig_dst"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer om.Close()
	n := int(om.MaxEntries())
	keys := make([]redirect.CaptureMsSockKey, n)
	vals := make([]redirect.CaptureMsOrig, n)
	for round := uint32(1); round <= 8; round++ {
		for i := range keys {
			keys[i].LocalPort = uint16(i)
			keys[i].RemotePort = uint16(i >> 16)
			keys[i].LocalIp[0] = round
		}
		if _, err := om.BatchUpdate(keys, vals, nil); err != nil {
			t.Fatalf("fill ms_orig_dst (%d entries): %v", n, err)
		}
		left := 0
		var k redirect.CaptureMsSockKey
		var v redirect.CaptureMsOrig
		for it := om.Iterate(); it.Next(&k, &v); {
			if k.Netns == netns {
				left++
			}
		}
		if left == 0 {
			return
		}
	}
	t.Fatalf("ms_orig_dst still holds entries of netns %d after 8 rounds of %d writes", netns, n)
}

// probe is one connection attempt for the kernel-versus-model tests.
type probe struct {
	uid, gid int
	src      netip.Addr // bound source, or none
	dst      netip.AddrPort
}

func (p probe) String() string {
	s := fmt.Sprintf("%s uid %d gid %d", p.dst, p.uid, p.gid)
	if p.src.IsValid() {
		s += " from " + p.src.String()
	}
	return s
}

// kernelTarget makes connection attempt pr from pod p and says, from the
// kernel counters, where the datapath sent it: the outbound port (connect4/6
// captured it), the inbound port (the proxy's hairpin at connect, or
// sk_lookup), or nowhere.
func (m *mesh) kernelTarget(t *testing.T, p *meshPod, pr probe) (istio.Target, datapath.Counters) {
	t.Helper()
	args := []string{m.bin, "client", "--target", pr.dst.String(), "--messages", "1", "--timeout", "2s"}
	if pr.src.IsValid() {
		args = append(args, "--source", pr.src.String())
	}
	before := m.counters()
	c := testnet.Start(t, testnet.StartOpts{
		NetNS: p.NS, Cgroup: m.cg, UID: pr.uid, GID: pr.gid, Name: "probe",
		Args: args, Env: []string{"GODEBUG=multipathtcp=0"},
	})
	c.WaitTimeout(20 * time.Second)
	d := m.counters().Sub(before)
	switch {
	case d["connect.captured"] > 0:
		return istio.TargetOutbound, d
	case d["connect.captured_hairpin"] > 0 || d["sk_lookup.captured"] > 0:
		return istio.TargetInbound, d
	}
	return istio.TargetNone, d
}

// checkKernelFollowsIstio runs each probe from pod p and compares where the
// kernel sent it with istio.Traffic.Decide for a connection made inside p.
func (m *mesh) checkKernelFollowsIstio(t *testing.T, p *meshPod, probes []probe) {
	t.Helper()
	for _, pr := range probes {
		want, why := p.Traffic.Decide(istio.Conn{Local: true, Src: pr.src, Dst: pr.dst, UID: uint32(pr.uid), GID: uint32(pr.gid)})
		t.Run(p.Name+" "+pr.String(), func(t *testing.T) {
			got, d := m.kernelTarget(t, p, pr)
			if got != want {
				t.Fatalf("kernel sent it to %v, istio says %v (%s): %v", got, want, why, nonZero(d))
			}
		})
	}
}

// checkInbound makes connection attempt pr from pod from (outside p) to p
// and compares where the kernel sent it with istio.Traffic.Decide.
func (m *mesh) checkInbound(t *testing.T, p, from *meshPod, pr probe) datapath.Counters {
	t.Helper()
	src := pr.src
	if !src.IsValid() {
		src = from.addr(pr.dst.Addr().Is6())
	}
	want, why := p.Traffic.Decide(istio.Conn{Src: src, Dst: pr.dst})
	got, d := m.kernelTarget(t, from, pr)
	if got != want {
		t.Fatalf("from %s: kernel sent it to %v, istio says %v (%s): %v", src, got, want, why, nonZero(d))
	}
	return d
}

// TestKernelFollowsIstioForOwnPodIP: an app calling its own pod IP leaves
// through lo, and istio-iptables RETURNs it ("-o lo -m owner ! --uid-owner
// 1337 -j RETURN"): not captured outbound, nor inbound. The proxy's own
// connection there goes to the inbound port ("-o lo ! -d 127.0.0.1/32 -p
// tcp ! --dport 15008 -m owner --uid-owner 1337 -j ISTIO_IN_REDIRECT"),
// with the right original destination; with an include range that is
// loopback, the app's is judged by the ranges.
func TestKernelFollowsIstioForOwnPodIP(t *testing.T) {
	m := newMesh(t)
	node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	pod := m.addPod(node, "self", injected())
	// The pod's own /32 and loopback: the app's own-IP calls are captured.
	loop := m.addPod(node, "loopinc", nil)
	loop = m.registerLate(node, loop, injected(istio.AnnotationIncludeOutboundIPRanges,
		"127.0.0.0/8,"+loop.IPv4.String()+"/32"))
	const gidOnly = 2000
	var probes []probe
	for _, ip := range []netip.Addr{pod.IPv4, pod.IPv6} {
		probes = append(probes,
			probe{uid: appUID, gid: appUID, dst: netip.AddrPortFrom(ip, appPort)},
			probe{uid: 1337, gid: 1337, dst: netip.AddrPortFrom(ip, appPort)},
			probe{uid: gidOnly, gid: 1337, dst: netip.AddrPortFrom(ip, appPort)},
		)
	}
	m.checkKernelFollowsIstio(t, pod, probes)
	m.checkKernelFollowsIstio(t, loop, []probe{
		{uid: appUID, gid: appUID, dst: netip.AddrPortFrom(loop.IPv4, appPort)},
		{uid: appUID, gid: appUID, dst: netip.AddrPortFrom(loop.IPv6, appPort)},
		{uid: gidOnly, gid: 1337, dst: netip.AddrPortFrom(loop.IPv4, appPort)},
	})

	// What each end saw: the app's own call reached the app directly
	// from the pod's own address; the proxy's came through its inbound
	// listener with the pod IP as original destination.
	t.Run("app and sidecar see the right peers", func(t *testing.T) {
		seen := len(acceptsOf(pod.App))
		in := len(acceptEvents(pod.Sidecar, "inbound"))
		m.client(pod, appUID, netip.AddrPortFrom(pod.IPv4, appPort), "--messages", "2")
		peers := waitAccepts(t, pod.App, "", seen+1)
		if got := origDst(peers[len(peers)-1].Str("peer")).Addr(); got != pod.IPv4 {
			t.Fatalf("app saw its own call from %s, want %s directly", got, pod.IPv4)
		}
		if n := len(acceptEvents(pod.Sidecar, "inbound")); n != in {
			t.Fatalf("sidecar accepted the app's own-IP call (%d new inbound accepts)", n-in)
		}
		target := netip.AddrPortFrom(pod.IPv6, appPort)
		m.client(pod, 1337, target, "--messages", "2")
		evs := waitAccepts(t, pod.Sidecar, "inbound", in+1)
		if len(evs) != in+1 || origDst(evs[in].Str("orig_dst")) != target {
			t.Fatalf("sidecar inbound accepts %v, want one for %s", evs[in:], target)
		}
	})
}

// registerLate registers an unregistered test pod with annotations ann
// (after its app started) and starts its sidecar.
func (m *mesh) registerLate(node *testnet.BridgeNet, p *meshPod, ann map[string]string) *meshPod {
	t := m.t
	t.Helper()
	tr, _, err := istio.ParseTraffic(ann, testDefaults())
	if err != nil {
		t.Fatal(err)
	}
	tr.PodIPs = []netip.Addr{p.IPv4, p.IPv6}
	return m.registerWith(p, tr)
}

// registerWith registers pod p with tr (tr.PodIPs its addresses) and starts
// its sidecar.
func (m *mesh) registerWith(p *meshPod, tr istio.Traffic) *meshPod {
	t := m.t
	t.Helper()
	p.Traffic = tr
	if err := redirect.PreparePodNetns(p.NS.Path()); err != nil {
		t.Fatal(err)
	}
	if err := m.dp.AddPod(datapath.Pod{NetnsPath: p.NS.Path(), Cookie: p.Cookie, IPs: tr.PodIPs, Traffic: tr}); err != nil {
		t.Fatal(err)
	}
	p.Sidecar = m.start(p, p.Name+"-sidecar", 1337, "sidecar")
	if _, err := p.Sidecar.WaitEvent(waitFor, "ready"); err != nil {
		t.Fatal(err)
	}
	if err := m.dp.WaitListener(p.Cookie, waitFor); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestKernelFollowsIstioForIPv6Ranges: an IPv6 range (::/0, ::/80) never
// matches an IPv4 destination, although the kernel keeps IPv4 addresses in
// their v4-mapped IPv6 form (::ffff:a.b.c.d, inside ::/80).
func TestKernelFollowsIstioForIPv6Ranges(t *testing.T) {
	m := newMesh(t)
	node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	server := m.addPod(node, "server", nil)
	pods := []*meshPod{
		m.addPod(node, "excl-all6", injected(istio.AnnotationExcludeOutboundIPRanges, "::/0")),
		m.addPod(node, "excl-80", injected(istio.AnnotationExcludeOutboundIPRanges, "::/80")),
		m.addPod(node, "incl-all6", injected(istio.AnnotationIncludeOutboundIPRanges, "::/0")),
		m.addPod(node, "incl-mapped", injected(istio.AnnotationIncludeOutboundIPRanges, "::ffff:0:0/96")),
	}
	for _, p := range pods {
		var probes []probe
		for _, ip := range []netip.Addr{server.IPv4, server.IPv6} {
			probes = append(probes, probe{uid: appUID, gid: appUID, dst: netip.AddrPortFrom(ip, appPort)})
		}
		m.checkKernelFollowsIstio(t, p, probes)
	}
}

// TestKernelFollowsIstioIPv6Enablement: istio-iptables writes ip6tables
// rules only for an IPv6-only pod, or a dual-stack one with
// ISTIO_DUAL_STACK; otherwise the pod's IPv6 is never captured, in or out.
func TestKernelFollowsIstioIPv6Enablement(t *testing.T) {
	m := newMesh(t)
	node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	server := m.addPod(node, "server", nil)
	client := m.addPod(node, "client", nil)
	for _, tc := range []struct {
		name      string
		dualStack bool
		v6Only    bool // register the IPv6 address only
	}{
		{"dual-stack pod, ISTIO_DUAL_STACK", true, false},
		{"dual-stack pod, no ISTIO_DUAL_STACK", false, false},
		{"IPv6-only pod", false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := m.addPod(node, fmt.Sprintf("p%v%v", tc.dualStack, tc.v6Only), nil)
			d := istio.DefaultDefaults()
			d.DualStack = tc.dualStack
			tr, _, err := istio.ParseTraffic(injected(), d)
			if err != nil {
				t.Fatal(err)
			}
			tr.PodIPs = []netip.Addr{p.IPv4, p.IPv6}
			if tc.v6Only {
				tr.PodIPs = []netip.Addr{p.IPv6}
			}
			m.registerWith(p, tr)
			m.checkKernelFollowsIstio(t, p, []probe{
				{uid: appUID, gid: appUID, dst: netip.AddrPortFrom(server.IPv4, appPort)},
				{uid: appUID, gid: appUID, dst: netip.AddrPortFrom(server.IPv6, appPort)},
			})
			for _, ip := range []netip.Addr{p.IPv4, p.IPv6} {
				if !slices.Contains(tr.PodIPs, ip) {
					continue // not the pod's registered address: never captured
				}
				dst := netip.AddrPortFrom(ip, appPort)
				t.Run("inbound "+dst.String(), func(t *testing.T) {
					m.checkInbound(t, p, client, probe{uid: appUID, gid: appUID, dst: dst})
				})
			}
		})
	}
}

// TestPassthroughSourceOnlyOverLo: Envoy's passthrough source (::6) is
// exempt from inbound capture only on connections the pod makes to itself.
// A SYN from ::6 that arrives on eth0 (another namespace, over the veth,
// with ::6 as its source) is judged like any other: captured, and subject to
// policy, as istio-iptables' REDIRECT mode does (its ::6 rule is "-o lo").
func TestPassthroughSourceOnlyOverLo(t *testing.T) {
	m := newMesh(t)
	node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	server := m.addPod(node, "server", injected())
	spoofer := m.addPod(node, "spoofer", nil)
	// ::6 as an address of the spoofer's eth0: its SYNs leave with it.
	spoofer.NS.Run(t, "ip", "-6", "addr", "add", "::6/128", "dev", "eth0", "nodad")
	dst := netip.AddrPortFrom(server.IPv6, appPort)
	d := m.checkInbound(t, server, spoofer, probe{uid: appUID, gid: appUID, src: netip.MustParseAddr("::6"), dst: dst})
	if d["sk_lookup.skip_passthrough_source"] != 0 {
		t.Fatalf("a SYN from eth0 got the passthrough exemption: %v", nonZero(d))
	}
	// The sidecar's own passthrough (from ::6 over lo) still reaches the
	// app, not the sidecar again.
	client := m.addPod(node, "client", nil)
	before := m.counters()
	m.client(client, appUID, dst, "--messages", "2")
	d = m.counters().Sub(before)
	if d["sk_lookup.captured"] != 1 || d["sk_lookup.skip_passthrough_source"] != 1 {
		t.Fatalf("inbound via the sidecar: %v", nonZero(d))
	}
}

// TestProxyInPodUserNamespaceIsNotCapturedAgain: a pod with its own user
// namespace (Kubernetes hostUsers: false) runs Envoy as uid 1337 inside,
// which the kernel sees as 101337 here. iptables' owner match reads
// "--uid-owner 1337" in that namespace, so Envoy's own connects are left
// alone; compared with the host's view, they would be captured again (a
// loop). The app's connects (uid 1000 inside) are still captured.
func TestProxyInPodUserNamespaceIsNotCapturedAgain(t *testing.T) {
	m := newMesh(t)
	const base = 100000
	// A process holding a user namespace (inside 0-65535 = outside
	// 100000-165535) and a network namespace that it owns.
	holder := exec.Command("sleep", "1000000")
	idMap := []syscall.SysProcIDMap{{ContainerID: 0, HostID: base, Size: 65536}}
	holder.SysProcAttr = &syscall.SysProcAttr{
		Cloneflags:  syscall.CLONE_NEWUSER | syscall.CLONE_NEWNET,
		UidMappings: idMap, GidMappings: idMap,
	}
	if err := holder.Start(); err != nil {
		t.Fatalf("start a process in a new user namespace: %v", err)
	}
	t.Cleanup(func() { holder.Process.Kill(); holder.Wait() })
	pid := holder.Process.Pid
	netnsPath := fmt.Sprintf("/proc/%d/ns/net", pid)
	if out, err := exec.Command("nsenter", "--net="+netnsPath, "ip", "link", "set", "lo", "up").CombinedOutput(); err != nil {
		t.Fatalf("lo up: %v\n%s", err, out)
	}
	cookie, err := datapath.NetnsCookie(netnsPath)
	if err != nil {
		t.Fatal(err)
	}
	tr, _, err := istio.ParseTraffic(injected(), testDefaults())
	if err != nil {
		t.Fatal(err)
	}
	if err := m.dp.AddPod(datapath.Pod{NetnsPath: netnsPath, Cookie: cookie,
		IPs: []netip.Addr{netip.MustParseAddr("192.0.2.10")}, Traffic: tr}); err != nil {
		t.Fatalf("register the pod: %v", err)
	}
	for _, tc := range []struct {
		name    string
		uid     int // inside the pod's user namespace
		counter string
	}{
		{"proxy uid 1337 inside", 1337, "connect.skip_proxy"},
		{"app uid 1000 inside", 1000, "connect.captured"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := m.counters()
			c := testnet.Start(t, testnet.StartOpts{Name: "probe", Cgroup: m.cg, Env: []string{"GODEBUG=multipathtcp=0"}, Args: []string{
				"nsenter", "--target", fmt.Sprint(pid), "--user", "--net",
				"--setuid", fmt.Sprint(tc.uid), "--setgid", fmt.Sprint(tc.uid), "--",
				m.bin, "client", "--target", "198.51.100.1:80", "--messages", "1", "--timeout", "1s",
			}})
			c.WaitTimeout(20 * time.Second)
			d := m.counters().Sub(before)
			if d["connect.meshed"] != 1 || d[tc.counter] != 1 {
				t.Fatalf("want %s: %v\n%s", tc.counter, nonZero(d), strings.Join(c.Lines(), "\n"))
			}
		})
	}

	// Once no process is left in the user namespace (the netns kept
	// alive by a bind mount), its uid_map cannot be read: the pod is
	// refused, saying why, rather than registered with the wrong ids.
	t.Run("user namespace without a process", func(t *testing.T) {
		pin := filepath.Join(t.TempDir(), "netns")
		if err := os.WriteFile(pin, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := syscall.Mount(netnsPath, pin, "", syscall.MS_BIND, ""); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { syscall.Unmount(pin, syscall.MNT_DETACH) })
		holder.Process.Kill()
		holder.Wait()
		err := m.dp.AddPod(datapath.Pod{NetnsPath: pin, Cookie: cookie,
			IPs: []netip.Addr{netip.MustParseAddr("192.0.2.10")}, Traffic: tr})
		if !errors.Is(err, datapath.ErrUserNamespace) {
			t.Fatalf("AddPod = %v, want ErrUserNamespace", err)
		}
		t.Log(err)
	})
}

// TestInboundListenerFamilies: sk_lookup hands an IPv4 SYN to the sidecar's
// IPv4 listener, else to its dual-stack [::] one; an IPv6 SYN only to an
// IPv6 listener. That fallback is one-way on purpose: an AF_INET listener
// cannot take an IPv6 connection (bpf_sk_assign refuses it with
// EAFNOSUPPORT), just as istio-iptables' REDIRECT of an IPv6 connection to
// a sidecar listening on 0.0.0.0:15006 only is refused. Either way the app
// is never reached around the sidecar.
func TestInboundListenerFamilies(t *testing.T) {
	m := newMesh(t)
	node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	dual := m.addPod(node, "dual", injected())
	v4only := m.addPodWith(node, "v4only", injected(), "--listen-v4only")
	client := m.addPod(node, "client", nil)
	for _, tc := range []struct {
		pod     *meshPod
		v6      bool
		counter string
	}{
		{dual, false, "sk_lookup.captured"},
		{dual, true, "sk_lookup.captured"},
		{v4only, false, "sk_lookup.captured"},
		{v4only, true, "sk_lookup.refused_no_listener"},
	} {
		dst := netip.AddrPortFrom(tc.pod.addr(tc.v6), appPort)
		t.Run(tc.pod.Name+" "+family(tc.v6), func(t *testing.T) {
			seen := len(acceptsOf(tc.pod.App))
			_, d := m.kernelTarget(t, client, probe{uid: appUID, gid: appUID, dst: dst})
			if d[tc.counter] != 1 {
				t.Fatalf("want %s: %v", tc.counter, nonZero(d))
			}
			if tc.counter != "sk_lookup.captured" && len(acceptsOf(tc.pod.App)) != seen {
				t.Fatalf("the app was reached around the sidecar")
			}
		})
	}
}
