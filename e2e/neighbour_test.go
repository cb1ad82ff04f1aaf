package e2e

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math/bits"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"

	"github.com/meshsplice/meshsplice/baseline"
	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/internal/lab"
	"github.com/meshsplice/meshsplice/internal/testnet"
)

// A neighbour is another program on meshsplice's cgroup hooks, built like
// Cilium's socket load balancer: its connect4/connect6 rewrite a service
// VIP to a backend at connect time, and its sockops program watches
// connections. It counts the destination ports its connect programs see
// (key: port in network order) and the sockops ops it sees (key:
// sockopsKey|op), so a test can tell which program ran first.
type neighbour struct {
	seen, backends *ebpf.Map
	progs          map[ebpf.AttachType]*ebpf.Program
}

const (
	vipPort    = 9999
	sockopsKey = 0xffff0000
)

// u32 is the value a BPF program loads from 4 network-order bytes.
func u32(b []byte) int64 { return int64(binary.NativeEndian.Uint32(b)) }

// countKey emits: seen[key in R2] += 1. Clobbers R1-R5, uses fp-8, fp-16.
func countKey(seen *ebpf.Map, label string) asm.Instructions {
	return asm.Instructions{
		asm.StoreMem(asm.RFP, -8, asm.R2, asm.Word),
		asm.LoadMapPtr(asm.R1, seen.FD()),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, -8),
		asm.FnMapLookupElem.Call(),
		asm.JEq.Imm(asm.R0, 0, label+"_new"),
		asm.Mov.Imm(asm.R1, 1),
		asm.StoreXAdd(asm.R0, asm.R1, asm.DWord),
		asm.Ja.Label(label + "_done"),
		asm.Mov.Imm(asm.R1, 1).WithSymbol(label + "_new"),
		asm.StoreMem(asm.RFP, -16, asm.R1, asm.DWord),
		asm.LoadMapPtr(asm.R1, seen.FD()),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, -8),
		asm.Mov.Reg(asm.R3, asm.RFP),
		asm.Add.Imm(asm.R3, -16),
		asm.Mov.Imm(asm.R4, 0),
		asm.FnMapUpdateElem.Call(),
		asm.Mov.Imm(asm.R0, 0).WithSymbol(label + "_done"),
	}
}

// connectLB is a connect4/6 program that rewrites vip:vipPort to the
// backend in backends[0] (IPv4) or backends[1] (IPv6) and backendPort, as a
// socket load balancer does.
func connectLB(seen, backends *ebpf.Map, vip netip.Addr, backendPort uint16) asm.Instructions {
	ipOff, key := int16(4), int32(0) // bpf_sock_addr.user_ip4
	if vip.Is6() {
		ipOff, key = 8, 1 // user_ip6[4]
	}
	vb := vip.AsSlice()
	insns := asm.Instructions{asm.Mov.Reg(asm.R6, asm.R1)}
	insns = append(insns, asm.LoadMem(asm.R2, asm.R6, 24, asm.Word)) // user_port
	insns = append(insns, countKey(seen, "port")...)
	insns = append(insns,
		asm.LoadMem(asm.R2, asm.R6, 24, asm.Word),
		asm.JNE.Imm(asm.R2, int32(bits.ReverseBytes16(vipPort)), "out"))
	for i := 0; i < len(vb); i += 4 {
		insns = append(insns,
			asm.LoadMem(asm.R2, asm.R6, ipOff+int16(i), asm.Word),
			asm.LoadImm(asm.R3, u32(vb[i:i+4]), asm.DWord),
			asm.JNE.Reg(asm.R2, asm.R3, "out"))
	}
	insns = append(insns,
		asm.Mov.Imm(asm.R1, key),
		asm.StoreMem(asm.RFP, -8, asm.R1, asm.Word),
		asm.LoadMapPtr(asm.R1, backends.FD()),
		asm.Mov.Reg(asm.R2, asm.RFP),
		asm.Add.Imm(asm.R2, -8),
		asm.FnMapLookupElem.Call(),
		asm.JEq.Imm(asm.R0, 0, "out"))
	for i := 0; i < len(vb); i += 4 {
		insns = append(insns,
			asm.LoadMem(asm.R3, asm.R0, int16(i), asm.Word),
			asm.StoreMem(asm.R6, ipOff+int16(i), asm.R3, asm.Word))
	}
	return append(insns,
		asm.Mov.Imm(asm.R3, int32(bits.ReverseBytes16(backendPort))),
		asm.StoreMem(asm.R6, 24, asm.R3, asm.Word),
		asm.Mov.Imm(asm.R0, 1).WithSymbol("out"),
		asm.Return())
}

// sockopsWatch counts every sockops op it sees and leaves the socket alone;
// with clobber it also sets the socket's callback flags to none at
// established, as a careless program does (bpf_sock_ops_cb_flags_set sets,
// it does not add).
func sockopsWatch(seen *ebpf.Map, clobber bool) asm.Instructions {
	insns := asm.Instructions{
		asm.Mov.Reg(asm.R6, asm.R1),
		asm.LoadMem(asm.R7, asm.R1, 0, asm.Word), // op
		asm.Mov.Reg(asm.R2, asm.R7),
		asm.Or.Imm32(asm.R2, -0x10000), // sockopsKey
	}
	insns = append(insns, countKey(seen, "op")...)
	if clobber {
		insns = append(insns,
			asm.JEq.Imm(asm.R7, unix.BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, "clobber"),
			asm.JNE.Imm(asm.R7, unix.BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, "out"),
			asm.Mov.Reg(asm.R1, asm.R6).WithSymbol("clobber"),
			asm.Mov.Imm(asm.R2, 0),
			asm.FnSockOpsCbFlagsSet.Call())
	}
	return append(insns, asm.Mov.Imm(asm.R0, 1).WithSymbol("out"), asm.Return())
}

func newNeighbour(t *testing.T, vip4, vip6 netip.Addr, backendPort uint16) *neighbour {
	t.Helper()
	return newNeighbourWith(t, vip4, vip6, backendPort, false)
}

func newNeighbourWith(t *testing.T, vip4, vip6 netip.Addr, backendPort uint16, clobber bool) *neighbour {
	t.Helper()
	seen, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Hash, KeySize: 4, ValueSize: 8, MaxEntries: 1024})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { seen.Close() })
	backends, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Array, KeySize: 4, ValueSize: 16, MaxEntries: 2})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { backends.Close() })
	n := &neighbour{seen: seen, backends: backends, progs: map[ebpf.AttachType]*ebpf.Program{}}
	for at, spec := range map[ebpf.AttachType]*ebpf.ProgramSpec{
		ebpf.AttachCGroupInet4Connect: {Type: ebpf.CGroupSockAddr, Instructions: connectLB(seen, backends, vip4, backendPort)},
		ebpf.AttachCGroupInet6Connect: {Type: ebpf.CGroupSockAddr, Instructions: connectLB(seen, backends, vip6, backendPort)},
		ebpf.AttachCGroupSockOps:      {Type: ebpf.SockOps, Instructions: sockopsWatch(seen, clobber)},
	} {
		spec.AttachType, spec.License, spec.Name = at, "GPL", "neighbour"
		p, err := ebpf.NewProgram(spec)
		if err != nil {
			t.Fatalf("load the neighbour's %s program: %+v", at, err)
		}
		t.Cleanup(func() { p.Close() })
		n.progs[at] = p
	}
	return n
}

// attachMode is how the neighbour attaches.
type attachMode int

const (
	viaLink      attachMode = iota // BPF_LINK_CREATE (Cilium's first choice)
	viaMulti                       // BPF_PROG_ATTACH with BPF_F_ALLOW_MULTI
	viaExclusive                   // BPF_PROG_ATTACH with no flags (legacy)
)

func (m attachMode) String() string {
	return [...]string{"bpf_link", "BPF_F_ALLOW_MULTI", "no flags"}[m]
}

// attach attaches every program of the neighbour to cg, detached again at
// cleanup.
func (n *neighbour) attach(t *testing.T, cg string, mode attachMode) error {
	t.Helper()
	for at, p := range n.progs {
		if mode == viaLink {
			l, err := link.AttachCgroup(link.CgroupOptions{Path: cg, Attach: at, Program: p})
			if err != nil {
				return fmt.Errorf("link %s: %w", at, err)
			}
			t.Cleanup(func() { l.Close() })
			continue
		}
		flags := uint32(0)
		if mode == viaMulti {
			flags = unix.BPF_F_ALLOW_MULTI
		}
		f, err := os.Open(cg)
		if err != nil {
			return err
		}
		t.Cleanup(func() { f.Close() })
		opts := link.RawAttachProgramOptions{Target: int(f.Fd()), Program: p, Attach: at, Flags: flags}
		if err := link.RawAttachProgram(opts); err != nil {
			return fmt.Errorf("attach %s (%s): %w", at, mode, err)
		}
		t.Cleanup(func() {
			if err := link.RawDetachProgram(link.RawDetachProgramOptions{Target: int(f.Fd()), Program: p, Attach: at}); err != nil {
				t.Errorf("detach the neighbour's %s: %v", at, err)
			}
		})
	}
	return nil
}

// nestedCgroups is a test cgroup and a child of it ("pods"), removed at
// cleanup (the child first).
func nestedCgroups(t *testing.T) (parent, child *testnet.Cgroup) {
	t.Helper()
	parent = testnet.NewCgroup(t)
	child, err := lab.CreateCgroup(filepath.Join(parent.Path, "pods"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := child.Remove(); err != nil {
			t.Errorf("remove %s: %v", child.Path, err)
		}
	})
	return parent, child
}

// neighbourCgroups is nestedCgroups, with the cgroup the neighbour goes
// on: the parent or the child.
func neighbourCgroups(t *testing.T, onParent bool) (child *testnet.Cgroup, target string) {
	t.Helper()
	parent, child := nestedCgroups(t)
	if onParent {
		return child, parent.Path
	}
	return child, child.Path
}

// setBackend points the VIPs at p.
func (n *neighbour) setBackend(t *testing.T, p *testnet.Pod) {
	t.Helper()
	for key, ip := range []netip.Addr{p.IPv4, p.IPv6} {
		var v [16]byte
		copy(v[:], ip.AsSlice())
		if err := n.backends.Put(uint32(key), v); err != nil {
			t.Fatal(err)
		}
	}
}

func (n *neighbour) count(key uint32) uint64 {
	var v uint64
	if err := n.seen.Lookup(key, &v); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		panic(err)
	}
	return v
}

// TestNeighbourOnTheSameHooks (issue 14 item 10): a socket load balancer's
// connect4/connect6 and a sockops watcher attached beside meshsplice's, on
// a parent cgroup or on meshsplice's own, keep working and so does
// meshsplice: the client reaches the VIP's backend through both sidecars,
// every connection is captured and spliced as without the neighbour, and
// the neighbour sees every connection. The programs run child cgroup
// first, then parent; on one cgroup in attach order. Whoever runs first
// decides what the sidecar's SO_ORIGINAL_DST is: the VIP (meshsplice
// first, as Istio sees it when the load balancer does not act in pod
// namespaces) or the backend (the load balancer first, as Istio's iptables
// see it behind a socket load balancer in the pod).
func TestNeighbourOnTheSameHooks(t *testing.T) {
	testnet.RequireRoot(t)
	vip4, vip6 := netip.MustParseAddr("10.96.0.10"), netip.MustParseAddr("fd00:96::10")
	for _, tc := range []struct {
		name             string
		onParent         bool
		mode             attachMode
		beforeMeshsplice bool
		lbFirst          bool // the neighbour runs before meshsplice
	}{
		{"parent cgroup, link", true, viaLink, true, false},
		{"parent cgroup, ALLOW_MULTI", true, viaMulti, true, false},
		{"same cgroup, link, attached before", false, viaLink, true, true},
		{"same cgroup, ALLOW_MULTI, attached before", false, viaMulti, true, true},
		{"same cgroup, link, attached after", false, viaLink, false, false},
		{"same cgroup, ALLOW_MULTI, attached after", false, viaMulti, false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			child, target := neighbourCgroups(t, tc.onParent)
			n := newNeighbour(t, vip4, vip6, appPort)
			if tc.beforeMeshsplice {
				if err := n.attach(t, target, tc.mode); err != nil {
					t.Fatal(err)
				}
			}
			m := newMeshOn(t, child)
			if !tc.beforeMeshsplice {
				if err := n.attach(t, target, tc.mode); err != nil {
					t.Fatal(err)
				}
			}
			node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
			client := m.addPod(node, "client", injected())
			server := m.addPod(node, "server", injected())
			n.setBackend(t, server.Pod)
			before := m.counters()
			for _, vip := range []netip.Addr{vip4, vip6} {
				m.client(client, appUID, netip.AddrPortFrom(vip, vipPort), "--messages", "20")
			}
			d := m.counters().Sub(before)
			t.Logf("meshsplice counters: %v", nonZero(d))
			t.Logf("neighbour saw connects to port %d: %d, to 15001: %d, to %d: %d; sockops established: active %d passive %d",
				vipPort, n.count(uint32(bits.ReverseBytes16(vipPort))), n.count(uint32(bits.ReverseBytes16(15001))),
				appPort, n.count(uint32(bits.ReverseBytes16(appPort))),
				n.count(sockopsKey|unix.BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB), n.count(sockopsKey|unix.BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB))

			// Who ran first: the neighbour sees the app's connect to the
			// VIP only if meshsplice has not rewritten it to 15001 yet.
			sawCapture := n.count(uint32(bits.ReverseBytes16(15001)))
			if tc.lbFirst && sawCapture != 0 {
				t.Errorf("the neighbour saw %d captured connects (port 15001): meshsplice ran first", sawCapture)
			}
			if !tc.lbFirst && sawCapture != 2 {
				t.Errorf("the neighbour saw %d captured connects (port 15001), want 2: it ran before meshsplice", sawCapture)
			}
			// What the sidecars saw.
			out := waitAccepts(t, client.Sidecar, "outbound", 2)
			in := waitAccepts(t, server.Sidecar, "inbound", 2)
			for i, vip := range []netip.Addr{vip4, vip6} {
				want := netip.AddrPortFrom(vip, vipPort)
				if tc.lbFirst {
					want = netip.AddrPortFrom(server.addr(vip.Is6()), appPort)
				}
				if got := origDst(out[i].Str("orig_dst")); got != want {
					t.Errorf("client sidecar's SO_ORIGINAL_DST = %s, want %s", got, want)
				}
				if got, want := origDst(in[i].Str("orig_dst")), netip.AddrPortFrom(server.addr(vip.Is6()), appPort); got != want {
					t.Errorf("server sidecar's SO_ORIGINAL_DST = %s, want the backend %s", got, want)
				}
			}
			sidecarErrors(t, client, server)
			// meshsplice: both app connects captured, both sidecar <->
			// sidecar connections spliced; the neighbour's sockops saw
			// every connection of the pods.
			for k, v := range map[string]uint64{"connect.captured": 2, "sockops.sock_inserted": 4} {
				if d[k] != v {
					t.Errorf("%s = %d, want %d", k, d[k], v)
				}
			}
			if got := n.count(sockopsKey | unix.BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB); got < 6 {
				t.Errorf("the neighbour's sockops saw %d active connections, want >= 6", got)
			}
		})
	}
}

// TestNeighbourAttachedExclusively: a program attached the legacy way, with
// no flags (exclusive, "no further programs in the subtree"), cannot sit
// beside meshsplice. meshsplice refuses to start below or on it, with an
// error that names the hook and the cause; attached after meshsplice it is
// the neighbour's attach that fails, and meshsplice keeps working.
func TestNeighbourAttachedExclusively(t *testing.T) {
	testnet.RequireRoot(t)
	vip4, vip6 := netip.MustParseAddr("10.96.0.10"), netip.MustParseAddr("fd00:96::10")
	for _, tc := range []struct {
		name     string
		onParent bool
	}{
		{"parent cgroup", true},
		{"same cgroup", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			child, target := neighbourCgroups(t, tc.onParent)
			n := newNeighbour(t, vip4, vip6, appPort)
			if err := n.attach(t, target, viaExclusive); err != nil {
				t.Fatal(err)
			}
			pin := testnet.PinDir(t, func(dir string) error { return datapath.Detach(dir, time.Second) })
			dp, err := datapath.Open(datapath.Options{PinDir: pin, CgroupPath: child.Path,
				Node: datapath.NodeSettings{Capture: true, Splice: true}})
			if err == nil {
				dp.Close()
				t.Fatal("meshsplice attached beside an exclusive program")
			}
			if !errors.Is(err, unix.EPERM) || !strings.Contains(err.Error(), "BPF_F_ALLOW_MULTI") {
				t.Fatalf("got %v, want EPERM explained", err)
			}
		})
	}
	t.Run("same cgroup, attached after meshsplice", func(t *testing.T) {
		m := newMesh(t)
		before := attachedCgroupPrograms(t, m.cg.Path)
		n := newNeighbour(t, vip4, vip6, appPort)
		if err := n.attach(t, m.cg.Path, viaExclusive); !errors.Is(err, unix.EPERM) {
			t.Fatalf("exclusive attach beside meshsplice: %v, want EPERM", err)
		}
		if got := attachedCgroupPrograms(t, m.cg.Path); got != before {
			t.Fatalf("%d programs attached, want meshsplice's %d", got, before)
		}
		node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
		client := m.addPod(node, "client", injected())
		server := m.addPod(node, "server", injected())
		m.client(client, appUID, netip.AddrPortFrom(server.IPv4, appPort), "--messages", "5")
		if len(waitAccepts(t, client.Sidecar, "outbound", 1)) != 1 {
			t.Fatal("not captured")
		}
	})
}

// TestNeighbourUnderIstioIptables is the reference for what a sidecar's
// SO_ORIGINAL_DST says behind a socket load balancer: with Istio's own
// iptables rules in the pod, the load balancer's connect program rewrites
// the VIP before any packet exists, so REDIRECT and conntrack only ever see
// the backend, whichever cgroup the load balancer is attached to.
func TestNeighbourUnderIstioIptables(t *testing.T) {
	testnet.RequireRoot(t)
	vip4, vip6 := netip.MustParseAddr("10.96.0.10"), netip.MustParseAddr("fd00:96::10")
	parent, child := nestedCgroups(t)
	n := newNeighbour(t, vip4, vip6, appPort)
	if err := n.attach(t, parent.Path, viaLink); err != nil {
		t.Fatal(err)
	}
	m := &mesh{t: t, bin: mstest(t), cg: child}
	node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	client := m.addPod(node, "client", nil)
	server := m.addPod(node, "server", nil)
	undo, err := baseline.Apply(client.NS.Path(), baseline.Options{IPv6: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := undo(); err != nil {
			t.Errorf("remove the iptables rules: %v", err)
		}
	})
	client.Sidecar = m.start(client, "client-sidecar", 1337, "sidecar")
	if _, err := client.Sidecar.WaitEvent(waitFor, "ready"); err != nil {
		t.Fatal(err)
	}
	n.setBackend(t, server.Pod)
	for _, vip := range []netip.Addr{vip4, vip6} {
		c := m.start(client, "client-"+family(vip.Is6()), appUID, "client", "--target", netip.AddrPortFrom(vip, vipPort).String(), "--messages", "5")
		if err := c.WaitTimeout(60 * time.Second); err != nil {
			t.Fatalf("client -> %s: %v\n%s", vip, err, c.Tail())
		}
	}
	out := waitAccepts(t, client.Sidecar, "outbound", 2)
	for i, vip := range []netip.Addr{vip4, vip6} {
		if got, want := origDst(out[i].Str("orig_dst")), netip.AddrPortFrom(server.addr(vip.Is6()), appPort); got != want {
			t.Errorf("iptables sidecar's SO_ORIGINAL_DST = %s, want the backend %s", got, want)
		}
	}
	sidecarErrors(t, client)
}

// TestNeighbourClobberingSockopsFlags: a sockops program that runs after
// meshsplice's and sets the socket's callback flags to none switches off
// the close callback meshsplice cleans up with: each captured connection
// then leaves its original destination behind in ms_orig_dst (an LRU map:
// bounded, but it crowds out live entries). Traffic still works. A
// well-behaved neighbour (adds its flags) leaves nothing.
func TestNeighbourClobberingSockopsFlags(t *testing.T) {
	testnet.RequireRoot(t)
	vip4, vip6 := netip.MustParseAddr("10.96.0.10"), netip.MustParseAddr("fd00:96::10")
	for _, tc := range []struct {
		name     string
		clobber  bool
		wantLeft int
	}{
		{"well-behaved", false, 0},
		{"clobbers the flags", true, 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			child, parent := neighbourCgroups(t, true)
			n := newNeighbourWith(t, vip4, vip6, appPort, tc.clobber)
			if err := n.attach(t, parent, viaLink); err != nil {
				t.Fatal(err)
			}
			m := newMeshOn(t, child)
			node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
			client := m.addPod(node, "client", injected())
			server := m.addPod(node, "server", injected())
			for range 3 {
				m.client(client, appUID, netip.AddrPortFrom(server.IPv4, appPort), "--messages", "5")
			}
			// The kernel takes closed sockets out of the splice map itself.
			var st *datapath.Status
			eventually(t, "every connection closed", func() bool {
				var err error
				st, err = datapath.Inspect(m.pin)
				return err == nil && st.SplicedSockets == 0 && st.OrigDstEntries <= tc.wantLeft
			})
			if st.OrigDstEntries != tc.wantLeft {
				t.Errorf("%d original destinations left after 3 closed connections, want %d", st.OrigDstEntries, tc.wantLeft)
			}
		})
	}
}
