package testnet

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"sync"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/meshsplice/meshsplice/internal/lab"
)

// BridgeName is the name of the Linux bridge in every node namespace.
const BridgeName = lab.BridgeName

// BridgeNetOpts configures NewBridgeNet.
type BridgeNetOpts struct {
	// Name is a short prefix for the node namespace name
	// (mstest-<Name>-<random>). Default "node".
	Name string
	// Subnet is x in the node's pod subnets 10.x.0.0/24 and fd00:x::/64
	// (x is written in decimal digits, so fd00:150::/64 for x=150). Valid
	// values are 1-255; 0 picks a random value in 100-250 not used by
	// another live BridgeNet of this process. Nodes joined by ConnectNodes
	// need different values.
	Subnet int
}

// BridgeNet is a "node": a network namespace holding a Linux bridge (br0)
// that the node's pods are attached to by veth pairs. The bridge owns the
// gateway addresses 10.x.0.1/24 and fd00:x::1/64; pods get 10.x.0.N and
// fd00:x::N for N = 2, 3, ... in the order they are added.
type BridgeNet struct {
	// Node is the node's network namespace, holding the bridge.
	Node *NetNS
	// Subnet is x of 10.x.0.0/24 and fd00:x::/64.
	Subnet int
	// PrefixV4 and PrefixV6 are the pod subnets.
	PrefixV4, PrefixV6 netip.Prefix
	// GatewayV4 and GatewayV6 are the bridge's addresses, the pods'
	// default gateways.
	GatewayV4, GatewayV6 netip.Addr

	mu   sync.Mutex
	next int
	pods []*Pod
}

// Pod is a network namespace attached to a BridgeNet's bridge through a veth
// pair whose pod end is called eth0.
type Pod struct {
	// Name is the name given to AddPod.
	Name string
	// NS is the pod's network namespace.
	NS *NetNS
	// IPv4 and IPv6 are the addresses of the pod's eth0.
	IPv4, IPv6 netip.Addr
	// HostVeth is the name of the node-side end of the pod's veth pair,
	// in Net.Node.
	HostVeth string
	// Net is the node the pod belongs to.
	Net *BridgeNet
}

// subnetsInUse records the Subnet values of live BridgeNets so that random
// picks do not collide within one test binary.
var subnetsInUse = struct {
	sync.Mutex
	m map[int]int
}{m: map[int]int{}}

func reserveSubnet(x int) (int, error) {
	subnetsInUse.Lock()
	defer subnetsInUse.Unlock()
	if x == 0 {
		for range 1000 {
			c := 100 + rand.IntN(151)
			if subnetsInUse.m[c] == 0 {
				x = c
				break
			}
		}
		if x == 0 {
			return 0, errors.New("no free random subnet in 100-250")
		}
	}
	if x < 1 || x > 255 {
		return 0, fmt.Errorf("subnet %d out of range 1-255", x)
	}
	subnetsInUse.m[x]++
	return x, nil
}

func releaseSubnet(x int) {
	subnetsInUse.Lock()
	defer subnetsInUse.Unlock()
	if subnetsInUse.m[x]--; subnetsInUse.m[x] <= 0 {
		delete(subnetsInUse.m, x)
	}
}

// v6Addr returns fd00:<a>:<b>::<n> with each number spelled in decimal
// digits (so the same digits appear as in the IPv4 address).
func v6Addr(groups ...int) netip.Addr {
	s := "fd00"
	for _, g := range groups[:len(groups)-1] {
		s += fmt.Sprintf(":%d", g)
	}
	s += fmt.Sprintf("::%d", groups[len(groups)-1])
	return netip.MustParseAddr(s)
}

// NewBridgeNet creates a node namespace with a bridge br0 holding the
// gateway addresses of the node's pod subnets. The namespace, and with it
// the bridge, is removed by the test's cleanup.
func NewBridgeNet(tb testing.TB, opts BridgeNetOpts) *BridgeNet {
	tb.Helper()
	if opts.Name == "" {
		opts.Name = "node"
	}
	x, err := reserveSubnet(opts.Subnet)
	if err != nil {
		tb.Fatalf("testnet: %v", err)
	}
	tb.Cleanup(func() { releaseSubnet(x) })

	bn := &BridgeNet{
		Node:      NewNetNS(tb, opts.Name),
		Subnet:    x,
		PrefixV4:  netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(x), 0, 0}), 24),
		PrefixV6:  netip.PrefixFrom(v6Addr(x, 0), 64),
		GatewayV4: netip.AddrFrom4([4]byte{10, byte(x), 0, 1}),
		GatewayV6: v6Addr(x, 1),
		next:      2,
	}
	// Bridge MACs differ from lab's nodes' (02:6d:62:...) only for telling
	// them apart in captures.
	mac := net.HardwareAddr{0x02, 0x6d, 0x73, 0x00, byte(x), 0x01}
	err = lab.AddBridge(bn.Node.ns, mac, netip.PrefixFrom(bn.GatewayV4, 24), netip.PrefixFrom(bn.GatewayV6, 64))
	if err != nil {
		tb.Fatalf("testnet: node %s: %v", bn.Node.Name(), err)
	}
	return bn
}

// Pods returns the pods added so far.
func (bn *BridgeNet) Pods() []*Pod {
	bn.mu.Lock()
	defer bn.mu.Unlock()
	return append([]*Pod(nil), bn.pods...)
}

// AddPod creates a pod namespace mstest-<name>-<random> connected to the
// node's bridge: a veth pair with one end (Pod.HostVeth) attached to br0 in
// the node namespace and the other one named eth0 in the pod, the next free
// IPv4 and IPv6 addresses (IPv6 with IFA_F_NODAD so it is usable at once),
// and default routes through the bridge's gateway addresses. It returns
// once the links are operationally up, so traffic flows at once. Keep name
// short: it is part of the host-side link name (15 bytes at most).
func (bn *BridgeNet) AddPod(tb testing.TB, name string) *Pod {
	tb.Helper()
	bn.mu.Lock()
	n := bn.next
	bn.next++
	bn.mu.Unlock()
	if n > 254 {
		tb.Fatalf("testnet: node %s: no addresses left for pod %s", bn.Node.Name(), name)
	}

	pod := &Pod{
		Name:     name,
		NS:       NewNetNS(tb, name),
		IPv4:     netip.AddrFrom4([4]byte{10, byte(bn.Subnet), 0, byte(n)}),
		IPv6:     v6Addr(bn.Subnet, n),
		HostVeth: truncate(fmt.Sprintf("vp%d-%s", n, name), unix.IFNAMSIZ-1),
		Net:      bn,
	}

	tb.Cleanup(func() { deleteLink(bn.Node, pod.HostVeth) })
	err := lab.AttachPod(bn.Node.ns, pod.NS.ns, lab.PodLink{
		HostVeth: pod.HostVeth,
		Addrs:    []netip.Prefix{netip.PrefixFrom(pod.IPv4, 24), netip.PrefixFrom(pod.IPv6, 64)},
		Gateways: []netip.Addr{bn.GatewayV4, bn.GatewayV6},
	})
	if err != nil {
		tb.Fatalf("testnet: node %s: pod %s: %v", bn.Node.Name(), name, err)
	}

	bn.mu.Lock()
	bn.pods = append(bn.pods, pod)
	bn.mu.Unlock()
	return pod
}

// ConnectNodes joins two nodes with a veth pair between their namespaces
// (named xn<b.Subnet> in a and xn<a.Subnet> in b), addressed
// 10.<a>.<b>.1/30 and .2 and fd00:<a>:<b>::1/64 and ::2, enables IPv4 and
// IPv6 forwarding in both node namespaces and routes each node's pod
// subnets through the other node, so that pods of a reach pods of b by
// plain routing. The nodes need different Subnet values. Routes are only
// added between a and b: joining more nodes needs one call per pair, and
// traffic is not routed transitively.
func ConnectNodes(tb testing.TB, a, b *BridgeNet) {
	tb.Helper()
	if a.Subnet == b.Subnet {
		tb.Fatalf("testnet: cannot connect nodes %s and %s: both use subnet %d", a.Node.Name(), b.Node.Name(), a.Subnet)
	}
	nameA := fmt.Sprintf("xn%d", b.Subnet)
	nameB := fmt.Sprintf("xn%d", a.Subnet)
	addrA4 := netip.AddrFrom4([4]byte{10, byte(a.Subnet), byte(b.Subnet), 1})
	addrB4 := netip.AddrFrom4([4]byte{10, byte(a.Subnet), byte(b.Subnet), 2})
	addrA6 := v6Addr(a.Subnet, b.Subnet, 1)
	addrB6 := v6Addr(a.Subnet, b.Subnet, 2)

	tb.Cleanup(func() { deleteLink(a.Node, nameA) })
	err := lab.LinkNodes(
		lab.NodeSide{NS: a.Node.ns, Link: nameA,
			Addrs:  []netip.Prefix{netip.PrefixFrom(addrA4, 30), netip.PrefixFrom(addrA6, 64)},
			Routes: []lab.Route{{Dst: b.PrefixV4, Via: addrB4}, {Dst: b.PrefixV6, Via: addrB6}}},
		lab.NodeSide{NS: b.Node.ns, Link: nameB,
			Addrs:  []netip.Prefix{netip.PrefixFrom(addrB4, 30), netip.PrefixFrom(addrB6, 64)},
			Routes: []lab.Route{{Dst: a.PrefixV4, Via: addrA4}, {Dst: a.PrefixV6, Via: addrA6}}})
	if err != nil {
		tb.Fatalf("testnet: connect %s to %s: %v", a.Node.Name(), b.Node.Name(), err)
	}
}

// deleteLink removes a link if it still exists; errors are ignored because
// removing the namespace removes the link anyway.
func deleteLink(ns *NetNS, name string) {
	_ = ns.ns.Netlink(func(h *netlink.Handle) error {
		l, err := h.LinkByName(name)
		if err != nil {
			return err
		}
		return h.LinkDel(l)
	})
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n]
	}
	return s
}
