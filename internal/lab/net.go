package lab

import (
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
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

// bridgeName is the bridge in every node namespace.
const bridgeName = "br0"

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
	err = ns.Netlink(func(h *netlink.Handle) error {
		br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{
			Name: bridgeName,
			// A fixed address keeps the bridge from taking over a port's
			// address as pods come and go.
			HardwareAddr: net.HardwareAddr{0x02, 0x6d, 0x62, 0x00, byte(subnet), 0x01},
		}}
		if err := h.LinkAdd(br); err != nil {
			return fmt.Errorf("add bridge: %w", err)
		}
		link, err := h.LinkByName(bridgeName)
		if err != nil {
			return fmt.Errorf("find bridge: %w", err)
		}
		if err := h.LinkSetUp(link); err != nil {
			return fmt.Errorf("set bridge up: %w", err)
		}
		return h.AddrAdd(link, &netlink.Addr{IPNet: ipNet(netip.PrefixFrom(n.Gateway, 24))})
	})
	if err != nil {
		return nil, fmt.Errorf("node %s: %w", name, err)
	}
	return n, nil
}

// AddPod creates the pod namespace <Prefix>-<name>, attaches it to the
// node's bridge through a veth pair (eth0 in the pod), gives it the next
// address and a default route through the bridge, and waits until the
// links are up. Removing the namespace removes the veth pair.
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
	podNS, err := netns.GetFromPath(ns.Path)
	if err != nil {
		return nil, fmt.Errorf("open netns %s: %w", ns.Name, err)
	}
	defer podNS.Close()
	hostVeth := fmt.Sprintf("vp%d", idx)
	err = n.NS.Netlink(func(h *netlink.Handle) error {
		br, err := h.LinkByName(bridgeName)
		if err != nil {
			return fmt.Errorf("find bridge: %w", err)
		}
		veth := &netlink.Veth{
			LinkAttrs:     netlink.LinkAttrs{Name: hostVeth, MasterIndex: br.Attrs().Index},
			PeerName:      "eth0",
			PeerNamespace: netlink.NsFd(int(podNS)),
		}
		if err := h.LinkAdd(veth); err != nil {
			return fmt.Errorf("add veth %s: %w", hostVeth, err)
		}
		link, err := h.LinkByName(hostVeth)
		if err != nil {
			return fmt.Errorf("find veth %s: %w", hostVeth, err)
		}
		if link.Attrs().MasterIndex != br.Attrs().Index {
			if err := h.LinkSetMaster(link, br); err != nil {
				return fmt.Errorf("attach %s to bridge: %w", hostVeth, err)
			}
		}
		return h.LinkSetUp(link)
	})
	if err != nil {
		return nil, fmt.Errorf("node %s: pod %s: %w", n.Name, name, err)
	}
	err = ns.Netlink(func(h *netlink.Handle) error {
		eth0, err := h.LinkByName("eth0")
		if err != nil {
			return fmt.Errorf("find eth0: %w", err)
		}
		if err := h.LinkSetUp(eth0); err != nil {
			return fmt.Errorf("set eth0 up: %w", err)
		}
		if err := h.AddrAdd(eth0, &netlink.Addr{IPNet: ipNet(netip.PrefixFrom(p.IP, 24))}); err != nil {
			return fmt.Errorf("add address %s: %w", p.IP, err)
		}
		if err := h.RouteAdd(&netlink.Route{LinkIndex: eth0.Attrs().Index, Gw: n.Gateway.AsSlice()}); err != nil {
			return fmt.Errorf("add default route via %s: %w", n.Gateway, err)
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("pod %s: %w", ns.Name, err)
	}
	if err := waitUp(n.NS, bridgeName, hostVeth); err != nil {
		return nil, fmt.Errorf("node %s: %w", n.Name, err)
	}
	if err := waitUp(ns, "eth0"); err != nil {
		return nil, fmt.Errorf("pod %s: %w", ns.Name, err)
	}
	return p, nil
}

// ConnectNodes joins two nodes with a veth pair between their namespaces,
// addressed 10.<a>.<b>.1/30 and .2, turns on forwarding in both and routes
// each node's pod subnet through the other: pods reach each other's pods by
// plain routing, as on two hosts of one L2 segment.
func ConnectNodes(a, b *Node) error {
	if a.Subnet == b.Subnet {
		return fmt.Errorf("connect nodes %s and %s: both use subnet %d", a.Name, b.Name, a.Subnet)
	}
	nameA, nameB := fmt.Sprintf("xn%d", b.Subnet), fmt.Sprintf("xn%d", a.Subnet)
	addrA := netip.AddrFrom4([4]byte{10, byte(a.Subnet), byte(b.Subnet), 1})
	addrB := netip.AddrFrom4([4]byte{10, byte(a.Subnet), byte(b.Subnet), 2})
	nsB, err := netns.GetFromPath(b.NS.Path)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", b.NS.Name, err)
	}
	defer nsB.Close()
	err = a.NS.Netlink(func(h *netlink.Handle) error {
		return h.LinkAdd(&netlink.Veth{
			LinkAttrs:     netlink.LinkAttrs{Name: nameA},
			PeerName:      nameB,
			PeerNamespace: netlink.NsFd(int(nsB)),
		})
	})
	if err != nil {
		return fmt.Errorf("connect %s to %s: add veth: %w", a.Name, b.Name, err)
	}
	setup := func(n *Node, link string, self, peer netip.Addr, remote *Node) error {
		if err := n.NS.Sysctl("net.ipv4.ip_forward", "1"); err != nil {
			return err
		}
		return n.NS.Netlink(func(h *netlink.Handle) error {
			l, err := h.LinkByName(link)
			if err != nil {
				return fmt.Errorf("find %s: %w", link, err)
			}
			if err := h.LinkSetUp(l); err != nil {
				return fmt.Errorf("set %s up: %w", link, err)
			}
			if err := h.AddrAdd(l, &netlink.Addr{IPNet: ipNet(netip.PrefixFrom(self, 30))}); err != nil {
				return fmt.Errorf("add address %s: %w", self, err)
			}
			r := &netlink.Route{LinkIndex: l.Attrs().Index, Dst: ipNet(remote.Prefix), Gw: peer.AsSlice()}
			if err := h.RouteAdd(r); err != nil {
				return fmt.Errorf("add route %s via %s: %w", remote.Prefix, peer, err)
			}
			return nil
		})
	}
	if err := setup(a, nameA, addrA, addrB, b); err != nil {
		return fmt.Errorf("node %s: %w", a.Name, err)
	}
	if err := setup(b, nameB, addrB, addrA, a); err != nil {
		return fmt.Errorf("node %s: %w", b.Name, err)
	}
	if err := waitUp(a.NS, nameA); err != nil {
		return err
	}
	return waitUp(b.NS, nameB)
}

// waitUp waits until the named links of ns are operationally up. The
// kernel's linkwatch may delay a fresh veth's carrier by up to a second.
func waitUp(ns *Netns, names ...string) error {
	return ns.Netlink(func(h *netlink.Handle) error {
		deadline := time.Now().Add(10 * time.Second)
		for _, name := range names {
			for {
				l, err := h.LinkByName(name)
				if err != nil {
					return fmt.Errorf("find %s: %w", name, err)
				}
				if l.Attrs().OperState == netlink.OperUp {
					break
				}
				if time.Now().After(deadline) {
					return fmt.Errorf("%s in %s not up after 10s", name, ns.Name)
				}
				time.Sleep(5 * time.Millisecond)
			}
		}
		return nil
	})
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}
