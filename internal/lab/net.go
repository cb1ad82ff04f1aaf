package lab

import (
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Node is a "node": a network namespace with a Linux bridge (br0) that its
// pods are attached to by veth pairs. The bridge holds the gateway address
// 10.<Subnet>.0.1/24; pods get 10.<Subnet>.0.2, .3, ...
type Node struct {
	// Name is the short name given to NewNode ("node-a").
	Name string
	// NS is the node's namespace.
	NS *Netns
	// Subnet is x in 10.x.0.0/24.
	Subnet int
	// Prefix is the pods' subnet; Gateway the bridge's address.
	Prefix  netip.Prefix
	Gateway netip.Addr

	lab  *Lab
	next int
}

// Pod is a network namespace attached to a node's bridge by a veth pair
// whose pod end is eth0.
type Pod struct {
	// Name is the short name given to AddPod.
	Name string
	// NS is the pod's namespace.
	NS *Netns
	// IP is eth0's address.
	IP netip.Addr
	// Node is the node the pod is attached to.
	Node *Node
}

// BridgeName is the bridge in every node namespace.
const BridgeName = "br0"

// NewNode creates the namespace <Prefix>-<name> with a bridge holding
// 10.<subnet>.0.1/24.
func (l *Lab) NewNode(name string, subnet int) (*Node, error) {
	if subnet < 1 || subnet > 254 {
		return nil, fmt.Errorf("node %s: subnet %d out of range 1-254", name, subnet)
	}
	ns, err := l.NewNetns(name)
	if err != nil {
		return nil, err
	}
	n := &Node{
		Name: name, NS: ns, Subnet: subnet, lab: l, next: 2,
		Prefix:  netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(subnet), 0, 0}), 24),
		Gateway: netip.AddrFrom4([4]byte{10, byte(subnet), 0, 1}),
	}
	mac := net.HardwareAddr{0x02, 0x6d, 0x62, 0x00, byte(subnet), 0x01}
	if err := AddBridge(ns, mac, netip.PrefixFrom(n.Gateway, 24)); err != nil {
		return nil, fmt.Errorf("node %s: %w", name, err)
	}
	return n, nil
}

// AddPod creates the pod namespace <Prefix>-<name>, attaches it to the
// node's bridge (AttachPod) with the next address. Removing the namespace
// removes the veth pair.
func (n *Node) AddPod(name string) (*Pod, error) {
	idx := n.next
	n.next++
	if idx > 254 {
		return nil, fmt.Errorf("node %s: no address left for pod %s", n.Name, name)
	}
	ns, err := n.lab.NewNetns(name)
	if err != nil {
		return nil, err
	}
	p := &Pod{Name: name, NS: ns, Node: n, IP: netip.AddrFrom4([4]byte{10, byte(n.Subnet), 0, byte(idx)})}
	err = AttachPod(n.NS, ns, PodLink{
		HostVeth: fmt.Sprintf("vp%d", idx),
		Addrs:    []netip.Prefix{netip.PrefixFrom(p.IP, 24)},
		Gateways: []netip.Addr{n.Gateway},
	})
	if err != nil {
		return nil, fmt.Errorf("node %s: pod %s: %w", n.Name, name, err)
	}
	return p, nil
}

// ConnectNodes joins two nodes with a veth pair between their namespaces
// (LinkNodes), addressed 10.<a>.<b>.1/30 and .2, and routes each node's pod
// subnet through the other: pods reach each other's pods by plain routing,
// as on two hosts of one L2 segment.
func ConnectNodes(a, b *Node) error {
	if a.Subnet == b.Subnet {
		return fmt.Errorf("connect nodes %s and %s: both use subnet %d", a.Name, b.Name, a.Subnet)
	}
	addrA := netip.AddrFrom4([4]byte{10, byte(a.Subnet), byte(b.Subnet), 1})
	addrB := netip.AddrFrom4([4]byte{10, byte(a.Subnet), byte(b.Subnet), 2})
	err := LinkNodes(
		NodeSide{NS: a.NS, Link: fmt.Sprintf("xn%d", b.Subnet), Addrs: []netip.Prefix{netip.PrefixFrom(addrA, 30)},
			Routes: []Route{{Dst: b.Prefix, Via: addrB}}},
		NodeSide{NS: b.NS, Link: fmt.Sprintf("xn%d", a.Subnet), Addrs: []netip.Prefix{netip.PrefixFrom(addrB, 30)},
			Routes: []Route{{Dst: a.Prefix, Via: addrA}}})
	if err != nil {
		return fmt.Errorf("connect nodes %s and %s: %w", a.Name, b.Name, err)
	}
	return nil
}

// AddBridge creates the bridge BridgeName in ns with a fixed MAC address (a
// bridge would otherwise take over its lowest port's address, which
// changes as pods come and go and leaves stale neighbour entries in the
// pods), brings it up and gives it addrs.
func AddBridge(ns *Netns, mac net.HardwareAddr, addrs ...netip.Prefix) error {
	return ns.Netlink(func(h *netlink.Handle) error {
		br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: BridgeName, HardwareAddr: mac}}
		if err := h.LinkAdd(br); err != nil {
			return fmt.Errorf("add bridge: %w", err)
		}
		link, err := h.LinkByName(BridgeName)
		if err != nil {
			return fmt.Errorf("find bridge: %w", err)
		}
		if err := h.LinkSetUp(link); err != nil {
			return fmt.Errorf("set bridge up: %w", err)
		}
		return addAddrs(h, link, addrs...)
	})
}

// PodLink is how AttachPod connects a pod.
type PodLink struct {
	// HostVeth names the node's end of the veth pair (15 bytes at most);
	// the pod's end is eth0.
	HostVeth string
	// Addrs are eth0's addresses.
	Addrs []netip.Prefix
	// Gateways are the pod's default routes, one per address family.
	Gateways []netip.Addr
}

// AttachPod connects the pod namespace to the bridge of the node
// namespace: a veth pair, l.HostVeth on the bridge and eth0 in the pod,
// both up, eth0 with l.Addrs and default routes via l.Gateways. It returns
// once both ends are ready (WaitLinksReady), so traffic flows at once.
func AttachPod(node, pod *Netns, l PodLink) error {
	podNS, err := netns.GetFromPath(pod.Path)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", pod.Name, err)
	}
	defer podNS.Close()
	err = node.Netlink(func(h *netlink.Handle) error {
		br, err := h.LinkByName(BridgeName)
		if err != nil {
			return fmt.Errorf("find bridge: %w", err)
		}
		veth := &netlink.Veth{
			LinkAttrs:     netlink.LinkAttrs{Name: l.HostVeth, MasterIndex: br.Attrs().Index},
			PeerName:      "eth0",
			PeerNamespace: netlink.NsFd(int(podNS)),
		}
		if err := h.LinkAdd(veth); err != nil {
			return fmt.Errorf("add veth %s: %w", l.HostVeth, err)
		}
		link, err := h.LinkByName(l.HostVeth)
		if err != nil {
			return fmt.Errorf("find veth %s: %w", l.HostVeth, err)
		}
		if link.Attrs().MasterIndex != br.Attrs().Index {
			if err := h.LinkSetMaster(link, br); err != nil {
				return fmt.Errorf("attach %s to bridge: %w", l.HostVeth, err)
			}
		}
		if err := h.LinkSetUp(link); err != nil {
			return fmt.Errorf("set %s up: %w", l.HostVeth, err)
		}
		return nil
	})
	if err != nil {
		return err
	}
	err = pod.Netlink(func(h *netlink.Handle) error {
		eth0, err := h.LinkByName("eth0")
		if err != nil {
			return fmt.Errorf("find eth0: %w", err)
		}
		if err := h.LinkSetUp(eth0); err != nil {
			return fmt.Errorf("set eth0 up: %w", err)
		}
		if err := addAddrs(h, eth0, l.Addrs...); err != nil {
			return err
		}
		for _, gw := range l.Gateways {
			if err := h.RouteAdd(&netlink.Route{LinkIndex: eth0.Attrs().Index, Gw: gw.AsSlice()}); err != nil {
				return fmt.Errorf("add default route via %s: %w", gw, err)
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("pod %s: %w", pod.Name, err)
	}
	if err := WaitLinksReady(node, BridgeName, l.HostVeth); err != nil {
		return err
	}
	return WaitLinksReady(pod, "eth0")
}

// Route is a route to Dst through the gateway Via.
type Route struct {
	Dst netip.Prefix
	Via netip.Addr
}

// NodeSide is one end of LinkNodes.
type NodeSide struct {
	NS     *Netns
	Link   string         // the veth end's name in NS
	Addrs  []netip.Prefix // its addresses
	Routes []Route        // routes through it (to the other node's pods)
}

// LinkNodes joins two node namespaces with a veth pair, addresses both
// ends, turns on IPv4 and IPv6 forwarding in both and adds each side's
// routes. It returns once both ends are ready.
func LinkNodes(a, b NodeSide) error {
	nsB, err := netns.GetFromPath(b.NS.Path)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", b.NS.Name, err)
	}
	defer nsB.Close()
	err = a.NS.Netlink(func(h *netlink.Handle) error {
		return h.LinkAdd(&netlink.Veth{
			LinkAttrs:     netlink.LinkAttrs{Name: a.Link},
			PeerName:      b.Link,
			PeerNamespace: netlink.NsFd(int(nsB)),
		})
	})
	if err != nil {
		return fmt.Errorf("add veth %s: %w", a.Link, err)
	}
	for _, s := range []NodeSide{a, b} {
		for _, key := range []string{"net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"} {
			if err := s.NS.Sysctl(key, "1"); err != nil {
				return err
			}
		}
		err := s.NS.Netlink(func(h *netlink.Handle) error {
			l, err := h.LinkByName(s.Link)
			if err != nil {
				return fmt.Errorf("find %s: %w", s.Link, err)
			}
			if err := h.LinkSetUp(l); err != nil {
				return fmt.Errorf("set %s up: %w", s.Link, err)
			}
			if err := addAddrs(h, l, s.Addrs...); err != nil {
				return err
			}
			for _, r := range s.Routes {
				route := &netlink.Route{LinkIndex: l.Attrs().Index, Dst: IPNet(r.Dst), Gw: r.Via.AsSlice()}
				if err := h.RouteAdd(route); err != nil {
					return fmt.Errorf("add route %s via %s: %w", r.Dst, r.Via, err)
				}
			}
			return nil
		})
		if err != nil {
			return fmt.Errorf("netns %s: %w", s.NS.Name, err)
		}
	}
	if err := WaitLinksReady(a.NS, a.Link); err != nil {
		return err
	}
	return WaitLinksReady(b.NS, b.Link)
}

// addAddrs adds addresses to link, IPv6 ones with IFA_F_NODAD so that they
// are usable at once.
func addAddrs(h *netlink.Handle, link netlink.Link, addrs ...netip.Prefix) error {
	for _, a := range addrs {
		addr := &netlink.Addr{IPNet: IPNet(a)}
		if a.Addr().Is6() {
			addr.Flags = unix.IFA_F_NODAD
		}
		if err := h.AddrAdd(link, addr); err != nil {
			return fmt.Errorf("add address %s to %s: %w", a, link.Attrs().Name, err)
		}
	}
	return nil
}

// WaitLinksReady waits until every named link of ns is operationally up
// and has a usable (non-tentative) IPv6 link-local address.
//
// Carrier changes are applied by the kernel's linkwatch worker, which
// handles a veth whose ifindex equals its peer's ifindex (easily the case
// for links between two fresh namespaces) as non-urgent and delays it by up
// to a second. Until then the link is not operationally up, a bridge port
// does not forward and the IPv6 link-local address does not exist, and a
// router sends no neighbour solicitation for forwarded packets without a
// link-local source address: the first routed IPv6 packets are silently
// dropped and TCP only recovers by retransmitting its SYN a second later.
func WaitLinksReady(ns *Netns, names ...string) error {
	return ns.Netlink(func(h *netlink.Handle) error {
		deadline := time.Now().Add(10 * time.Second)
		for _, name := range names {
			for {
				ready, err := linkReady(h, name)
				if err != nil {
					return err
				}
				if ready {
					break
				}
				if time.Now().After(deadline) {
					return fmt.Errorf("%s in %s not up with an IPv6 link-local address after 10s", name, ns.Name)
				}
				time.Sleep(5 * time.Millisecond)
			}
		}
		return nil
	})
}

func linkReady(h *netlink.Handle, name string) (bool, error) {
	link, err := h.LinkByName(name)
	if err != nil {
		return false, fmt.Errorf("find %s: %w", name, err)
	}
	if link.Attrs().OperState != netlink.OperUp {
		return false, nil
	}
	addrs, err := h.AddrList(link, netlink.FAMILY_V6)
	if err != nil {
		return false, fmt.Errorf("list addresses of %s: %w", name, err)
	}
	for _, a := range addrs {
		if a.IP.IsLinkLocalUnicast() && a.Flags&(unix.IFA_F_TENTATIVE|unix.IFA_F_DADFAILED) == 0 {
			return true, nil
		}
	}
	return false, nil
}

// IPNet converts a prefix for netlink.
func IPNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}
