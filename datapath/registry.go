package datapath

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/hashicorp/go-multierror"
	"golang.org/x/sys/unix"

	"github.com/meshsplice/meshsplice/internal/netnsutil"
	"github.com/meshsplice/meshsplice/istio"
	"github.com/meshsplice/meshsplice/redirect"
)

// ErrUnknownPod is returned for a network namespace that is not registered.
var ErrUnknownPod = errors.New("pod not registered")

// NodeSettings are the node-wide switches. Flipping one acts on new
// connections at once; live ones keep the path they started on.
type NodeSettings struct {
	Capture bool // capture outbound and inbound connections of meshed pods
	Splice  bool // splice app <-> sidecar and sidecar <-> sidecar
}

// Pod is a meshed pod as the kernel knows it: a network namespace.
type Pod struct {
	// NetnsPath names the pod's network namespace (/run/netns/x,
	// /proc/PID/ns/net); AddPod attaches the inbound capture there.
	NetnsPath string
	// Cookie is the namespace's cookie, the key of every kernel table. AddPod
	// fills it in from NetnsPath when zero.
	Cookie uint64
	// IPs are the pod's addresses: inbound capture and sidecar <-> sidecar
	// splicing find the pod by them.
	IPs []netip.Addr
	// Traffic is what Istio says about capturing this pod's traffic.
	Traffic istio.Traffic
	// Identity is the pod's workload identity for policy (0: none yet).
	Identity uint32
}

// SetNode writes the node-wide switches.
func (d *Datapath) SetNode(s NodeSettings) error {
	var node redirect.CaptureMsNode
	if s.Capture {
		node.Flags |= redirect.CaptureMsNodeFlagMS_NODE_CAPTURE
	}
	if s.Splice {
		node.Flags |= redirect.CaptureMsNodeFlagMS_NODE_SPLICE
	}
	if err := d.capture.MsNodeSettings.Update(uint32(0), &node, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("write node settings: %w", err)
	}
	return nil
}

// SetNodeDrain switches every spliced connection to TCP for the rest of its
// life (what Detach does first), or back for new ones.
func (d *Datapath) SetNodeDrain(on bool) error {
	var node redirect.CaptureMsNode
	if err := d.capture.MsNodeSettings.Lookup(uint32(0), &node); err != nil {
		return fmt.Errorf("read node settings: %w", err)
	}
	if on {
		node.Flags |= redirect.CaptureMsNodeFlagMS_NODE_DRAIN
	} else {
		node.Flags &^= redirect.CaptureMsNodeFlagMS_NODE_DRAIN
	}
	if err := d.capture.MsNodeSettings.Update(uint32(0), &node, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("write node settings: %w", err)
	}
	return nil
}

// Node reads the node-wide switches.
func (d *Datapath) Node() (NodeSettings, error) {
	var node redirect.CaptureMsNode
	if err := d.capture.MsNodeSettings.Lookup(uint32(0), &node); err != nil {
		return NodeSettings{}, fmt.Errorf("read node settings: %w", err)
	}
	return NodeSettings{
		Capture: node.Flags&redirect.CaptureMsNodeFlagMS_NODE_CAPTURE != 0,
		Splice:  node.Flags&redirect.CaptureMsNodeFlagMS_NODE_SPLICE != 0,
	}, nil
}

// NetnsCookie returns the cookie of the network namespace at path, the same
// value bpf_get_netns_cookie() gives inside it.
func NetnsCookie(path string) (uint64, error) {
	var cookie uint64
	err := netnsutil.Do(path, func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		cookie, err = unix.GetsockoptUint64(fd, unix.SOL_SOCKET, unix.SO_NETNS_COOKIE)
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("netns cookie of %s: %w", path, err)
	}
	return cookie, nil
}

// AddPod registers a pod, or updates it in place when its namespace is
// registered already. Tables are written before the pod entry that switches
// them on, and stale rules are removed after, so a connection never sees a
// half-written pod.
func (d *Datapath) AddPod(p Pod) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if p.Cookie == 0 {
		c, err := NetnsCookie(p.NetnsPath)
		if err != nil {
			return fmt.Errorf("add pod: %w", err)
		}
		p.Cookie = c
	}
	t := p.Traffic
	// The proxy's ids as the programs see them (the host's view), before
	// anything is written: a pod meshsplice cannot map is refused whole.
	proxyUID, proxyGID := t.ProxyUID, t.ProxyGID
	if p.NetnsPath != "" {
		var err error
		if proxyUID, proxyGID, err = proxyIDsOnHost(p.NetnsPath, t.ProxyUID, t.ProxyGID); err != nil {
			return fmt.Errorf("add pod %d: %w", p.Cookie, err)
		}
	}
	if len(t.PodIPs) == 0 {
		t.PodIPs = p.IPs // what istio-iptables decides IPv6 capture from
	}
	ports := map[redirect.CaptureMsPortKey]bool{}
	addPorts := func(kind redirect.CaptureMsPortKind, list []uint16) {
		for _, port := range list {
			ports[redirect.CaptureMsPortKey{Netns: p.Cookie, Kind: kind, Port: port}] = true
		}
	}
	addPorts(redirect.CaptureMsPortKindMS_PORT_OUT_INCLUDE, t.IncludeOutboundPorts)
	addPorts(redirect.CaptureMsPortKindMS_PORT_OUT_EXCLUDE, t.ExcludeOutboundPorts)
	addPorts(redirect.CaptureMsPortKindMS_PORT_IN_INCLUDE, t.IncludeInboundPorts)
	addPorts(redirect.CaptureMsPortKindMS_PORT_IN_EXCLUDE, t.ExcludeInboundPorts)
	ranges := map[redirect.CaptureMsRangeKey]bool{}
	addRanges := func(kind redirect.CaptureMsRangeKind, list []netip.Prefix) {
		for _, r := range list {
			ranges[rangeKey(p.Cookie, kind, r)] = true
		}
	}
	addRanges(redirect.CaptureMsRangeKindMS_RANGE_OUT_INCLUDE, t.IncludeOutboundRanges)
	addRanges(redirect.CaptureMsRangeKindMS_RANGE_OUT_EXCLUDE, t.ExcludeOutboundRanges)

	one := uint8(1)
	for k := range ports {
		if err := d.capture.MsPorts.Update(&k, &one, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("add pod %d: port rule %d: %w", p.Cookie, k.Port, err)
		}
	}
	for k := range ranges {
		if err := d.capture.MsRanges.Update(&k, &one, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("add pod %d: range rule: %w", p.Cookie, err)
		}
	}
	for _, ip := range p.IPs {
		a := addrKey(ip)
		if err := d.capture.MsPodIps.Update(&a, &p.Cookie, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("add pod %d: ip %s: %w", p.Cookie, ip, err)
		}
	}
	if p.NetnsPath != "" {
		if err := d.attachNetns(p.Cookie, p.NetnsPath); err != nil {
			return fmt.Errorf("add pod %d: %w", p.Cookie, err)
		}
	}
	pod := podValue(t)
	pod.Identity = p.Identity
	pod.ProxyUid, pod.ProxyGid = proxyUID, proxyGID
	for _, ip := range p.IPs {
		if ip.Unmap().Is4() && pod.Ip4 == (redirect.CaptureMsAddr{}) {
			pod.Ip4 = addrKey(ip)
		} else if !ip.Unmap().Is4() && pod.Ip6 == (redirect.CaptureMsAddr{}) {
			pod.Ip6 = addrKey(ip)
		}
	}
	slot, err := d.listenerSlot(p.Cookie)
	if err != nil {
		return fmt.Errorf("add pod %d: %w", p.Cookie, err)
	}
	pod.ListenerSlot = slot
	if err := d.capture.MsPods.Update(&p.Cookie, &pod, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("add pod %d: %w", p.Cookie, err)
	}
	if p.NetnsPath != "" {
		d.netns[p.Cookie] = p.NetnsPath
		// A sidecar that listened before the pod was registered.
		if err := d.syncListeners(p.Cookie, p.NetnsPath); err != nil {
			return fmt.Errorf("add pod %d: %w", p.Cookie, err)
		}
	}
	// Drop what the previous version of this pod had and this one lacks.
	return d.prune(p.Cookie, ports, ranges, p.IPs)
}

// RemovePod forgets a pod: new connections in its namespace are left alone
// at once. Live connections keep working: captured ones still reach the
// sidecar they were sent to, spliced ones stay spliced until they close.
// Removing a pod that is not registered is not an error.
func (d *Datapath) RemovePod(cookie uint64) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	var result *multierror.Error
	var old redirect.CaptureMsPod
	hadPod := d.capture.MsPods.Lookup(&cookie, &old) == nil
	if err := d.capture.MsPods.Delete(&cookie); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		result = multierror.Append(result, fmt.Errorf("remove pod %d: %w", cookie, err))
	}
	delete(d.netns, cookie)
	if hadPod {
		// Free the listener slots for the next pod.
		for _, idx := range []uint32{2 * old.ListenerSlot, 2*old.ListenerSlot + 1} {
			// An empty sockmap slot answers EINVAL, not ENOENT.
			if err := d.capture.MsListeners.Delete(&idx); err != nil &&
				!errors.Is(err, ebpf.ErrKeyNotExist) && !errors.Is(err, unix.EINVAL) {
				result = multierror.Append(result, fmt.Errorf("remove pod %d: clear listener slot: %w", cookie, err))
			}
		}
	}
	if err := d.prune(cookie, nil, nil, nil); err != nil {
		result = multierror.Append(result, err)
	}
	pin := filepath.Join(netnsLinkDir(d.pinDir), strconv.FormatUint(cookie, 10))
	if l, err := link.LoadPinnedLink(pin, nil); err == nil {
		if err := l.Unpin(); err != nil {
			result = multierror.Append(result, fmt.Errorf("remove pod %d: unpin sk_lookup: %w", cookie, err))
		}
		l.Close()
	} else if !errors.Is(err, os.ErrNotExist) {
		os.Remove(pin)
	}
	return result.ErrorOrNil()
}

// listenerSlot keeps the slot of a registered pod, or gives a new pod the
// lowest free one (pods x 2 entries of ms_listeners).
func (d *Datapath) listenerSlot(cookie uint64) (uint32, error) {
	var c uint64
	var v redirect.CaptureMsPod
	used := map[uint32]bool{}
	for it := d.capture.MsPods.Iterate(); it.Next(&c, &v); {
		if c == cookie {
			return v.ListenerSlot, nil
		}
		used[v.ListenerSlot] = true
	}
	max := d.capture.MsListeners.MaxEntries() / 2
	for slot := uint32(0); slot < max; slot++ {
		if !used[slot] {
			return slot, nil
		}
	}
	return 0, fmt.Errorf("no free listener slot: %d pods registered", len(used))
}

// prune deletes the rules and addresses of the pod that are not in keep.
func (d *Datapath) prune(cookie uint64, keepPorts map[redirect.CaptureMsPortKey]bool,
	keepRanges map[redirect.CaptureMsRangeKey]bool, keepIPs []netip.Addr) error {
	var result *multierror.Error
	var pk redirect.CaptureMsPortKey
	var v uint8
	var stalePorts []redirect.CaptureMsPortKey
	for it := d.capture.MsPorts.Iterate(); it.Next(&pk, &v); {
		if pk.Netns == cookie && !keepPorts[pk] {
			stalePorts = append(stalePorts, pk)
		}
	}
	for _, k := range stalePorts {
		if err := d.capture.MsPorts.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			result = multierror.Append(result, fmt.Errorf("delete port rule: %w", err))
		}
	}
	var rk redirect.CaptureMsRangeKey
	var staleRanges []redirect.CaptureMsRangeKey
	for it := d.capture.MsRanges.Iterate(); it.Next(&rk, &v); {
		if rk.Netns == cookie && !keepRanges[rk] {
			staleRanges = append(staleRanges, rk)
		}
	}
	for _, k := range staleRanges {
		if err := d.capture.MsRanges.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			result = multierror.Append(result, fmt.Errorf("delete range rule: %w", err))
		}
	}
	keep := map[redirect.CaptureMsAddr]bool{}
	for _, ip := range keepIPs {
		keep[addrKey(ip)] = true
	}
	var a redirect.CaptureMsAddr
	var owner uint64
	var staleIPs []redirect.CaptureMsAddr
	for it := d.capture.MsPodIps.Iterate(); it.Next(&a, &owner); {
		if owner == cookie && !keep[a] {
			staleIPs = append(staleIPs, a)
		}
	}
	for _, k := range staleIPs {
		if err := d.capture.MsPodIps.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			result = multierror.Append(result, fmt.Errorf("delete pod ip: %w", err))
		}
	}
	return result.ErrorOrNil()
}

// attachNetns attaches inbound capture (sk_lookup) to the pod's namespace,
// or updates the pinned link of an earlier run in place.
func (d *Datapath) attachNetns(cookie uint64, path string) error {
	pin := filepath.Join(netnsLinkDir(d.pinDir), strconv.FormatUint(cookie, 10))
	if l, err := link.LoadPinnedLink(pin, nil); err == nil {
		err := l.Update(d.capture.MsSkLookup)
		l.Close()
		if err == nil {
			return nil
		}
		os.Remove(pin)
	}
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("open netns: %w", err)
	}
	defer f.Close()
	l, err := link.AttachNetNs(int(f.Fd()), d.capture.MsSkLookup)
	if err != nil {
		return fmt.Errorf("attach sk_lookup to %s: %w", path, err)
	}
	defer l.Close()
	if err := l.Pin(pin); err != nil {
		return fmt.Errorf("pin sk_lookup link: %w", err)
	}
	return nil
}

// updateNetnsLinks points the sk_lookup links of registered pods at the
// program just loaded, and drops links whose namespace is gone.
func (d *Datapath) updateNetnsLinks() error {
	entries, err := os.ReadDir(netnsLinkDir(d.pinDir))
	if err != nil {
		return fmt.Errorf("list netns links: %w", err)
	}
	for _, e := range entries {
		pin := filepath.Join(netnsLinkDir(d.pinDir), e.Name())
		l, err := link.LoadPinnedLink(pin, nil)
		if err != nil {
			os.Remove(pin)
			continue
		}
		if err := l.Update(d.capture.MsSkLookup); err != nil {
			// The namespace died: the link is defunct.
			l.Unpin()
		}
		l.Close()
	}
	return nil
}

// Pods lists the registered pods as the kernel tables hold them.
func (d *Datapath) Pods() ([]Pod, error) {
	return readPods(d.capture.MsPods, d.capture.MsPodIps, d.capture.MsPorts, d.capture.MsRanges)
}

func readPods(podsMap, ipsMap, portsMap, rangesMap *ebpf.Map) ([]Pod, error) {
	byCookie := map[uint64]*Pod{}
	var cookie uint64
	var pv redirect.CaptureMsPod
	for it := podsMap.Iterate(); it.Next(&cookie, &pv); {
		byCookie[cookie] = &Pod{Cookie: cookie, Traffic: trafficFromValue(pv), Identity: pv.Identity}
	}
	var a redirect.CaptureMsAddr
	for it := ipsMap.Iterate(); it.Next(&a, &cookie); {
		if p := byCookie[cookie]; p != nil {
			p.IPs = append(p.IPs, addrFromKey(a))
		}
	}
	var pk redirect.CaptureMsPortKey
	var one uint8
	for it := portsMap.Iterate(); it.Next(&pk, &one); {
		p := byCookie[pk.Netns]
		if p == nil {
			continue
		}
		switch pk.Kind {
		case redirect.CaptureMsPortKindMS_PORT_OUT_INCLUDE:
			p.Traffic.IncludeOutboundPorts = append(p.Traffic.IncludeOutboundPorts, pk.Port)
		case redirect.CaptureMsPortKindMS_PORT_OUT_EXCLUDE:
			p.Traffic.ExcludeOutboundPorts = append(p.Traffic.ExcludeOutboundPorts, pk.Port)
		case redirect.CaptureMsPortKindMS_PORT_IN_INCLUDE:
			p.Traffic.IncludeInboundPorts = append(p.Traffic.IncludeInboundPorts, pk.Port)
		case redirect.CaptureMsPortKindMS_PORT_IN_EXCLUDE:
			p.Traffic.ExcludeInboundPorts = append(p.Traffic.ExcludeInboundPorts, pk.Port)
		}
	}
	var rk redirect.CaptureMsRangeKey
	for it := rangesMap.Iterate(); it.Next(&rk, &one); {
		p := byCookie[rk.Netns]
		if p == nil {
			continue
		}
		r := prefixFromRangeKey(rk)
		switch rk.Kind {
		case redirect.CaptureMsRangeKindMS_RANGE_OUT_INCLUDE:
			p.Traffic.IncludeOutboundRanges = append(p.Traffic.IncludeOutboundRanges, r)
		case redirect.CaptureMsRangeKindMS_RANGE_OUT_EXCLUDE:
			p.Traffic.ExcludeOutboundRanges = append(p.Traffic.ExcludeOutboundRanges, r)
		}
	}
	pods := make([]Pod, 0, len(byCookie))
	for _, p := range byCookie {
		t := &p.Traffic
		for _, s := range [][]uint16{t.IncludeOutboundPorts, t.ExcludeOutboundPorts, t.IncludeInboundPorts, t.ExcludeInboundPorts} {
			slices.Sort(s)
		}
		slices.SortFunc(p.IPs, netip.Addr.Compare)
		slices.SortFunc(t.IncludeOutboundRanges, comparePrefix)
		slices.SortFunc(t.ExcludeOutboundRanges, comparePrefix)
		pods = append(pods, *p)
	}
	slices.SortFunc(pods, func(a, b Pod) int { return compareU64(a.Cookie, b.Cookie) })
	return pods, nil
}

func compareU64(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

func comparePrefix(a, b netip.Prefix) int {
	if c := a.Addr().Compare(b.Addr()); c != 0 {
		return c
	}
	return a.Bits() - b.Bits()
}

func podValue(t istio.Traffic) redirect.CaptureMsPod {
	v := redirect.CaptureMsPod{
		ProxyUid:     t.ProxyUID,
		ProxyGid:     t.ProxyGID,
		OutboundPort: t.OutboundPort,
		InboundPort:  t.InboundPort,
	}
	set := func(on bool, f redirect.CaptureMsPodFlag) {
		if on {
			v.Flags |= f
		}
	}
	set(t.Capture, redirect.CaptureMsPodFlagMS_POD_CAPTURE)
	set(t.Splice, redirect.CaptureMsPodFlagMS_POD_SPLICE)
	set(t.AppSplice, redirect.CaptureMsPodFlagMS_POD_APP_SPLICE)
	set(t.IncludeAllOutbound, redirect.CaptureMsPodFlagMS_POD_INCLUDE_ALL_OUT)
	set(t.IncludeAllInbound, redirect.CaptureMsPodFlagMS_POD_INCLUDE_ALL_IN)
	set(t.IncludeOutboundLoopback, redirect.CaptureMsPodFlagMS_POD_INCLUDE_LOOPBACK)
	set(t.CaptureIPv6(), redirect.CaptureMsPodFlagMS_POD_CAPTURE_IPV6)
	return v
}

func trafficFromValue(v redirect.CaptureMsPod) istio.Traffic {
	has := func(f redirect.CaptureMsPodFlag) bool { return v.Flags&f != 0 }
	return istio.Traffic{
		Capture:                 has(redirect.CaptureMsPodFlagMS_POD_CAPTURE),
		Splice:                  has(redirect.CaptureMsPodFlagMS_POD_SPLICE),
		AppSplice:               has(redirect.CaptureMsPodFlagMS_POD_APP_SPLICE),
		IncludeAllOutbound:      has(redirect.CaptureMsPodFlagMS_POD_INCLUDE_ALL_OUT),
		IncludeAllInbound:       has(redirect.CaptureMsPodFlagMS_POD_INCLUDE_ALL_IN),
		IncludeOutboundLoopback: has(redirect.CaptureMsPodFlagMS_POD_INCLUDE_LOOPBACK),
		// Read back with the pod's IPs, this gives the kernel's answer
		// for CaptureIPv6 (an IPv6-only pod's is true either way).
		DualStack:    has(redirect.CaptureMsPodFlagMS_POD_CAPTURE_IPV6),
		ProxyUID:     v.ProxyUid,
		ProxyGID:     v.ProxyGid,
		OutboundPort: v.OutboundPort,
		InboundPort:  v.InboundPort,
	}
}

// addrKey is the kernel's form of an address: 16 bytes in network order,
// IPv4 v4-mapped. The words are stored in memory order, hence NativeEndian.
func addrKey(ip netip.Addr) redirect.CaptureMsAddr {
	b := ip.As16() // IPv4 comes out as ::ffff:a.b.c.d
	var a redirect.CaptureMsAddr
	for i := range a.Ip {
		a.Ip[i] = binary.NativeEndian.Uint32(b[4*i:])
	}
	return a
}

func addrFromKey(a redirect.CaptureMsAddr) netip.Addr {
	var b [16]byte
	for i, w := range a.Ip {
		binary.NativeEndian.PutUint32(b[4*i:], w)
	}
	return netip.AddrFrom16(b).Unmap()
}

// rangeFixedBits is MS_RANGE_FIXED_BITS (bpf/common.h): kind, netns and
// family, matched exactly.
const rangeFixedBits = 128

// rangeKey is an LPM key: the fixed bits (kind, netns, family) then the
// prefix of the 128-bit address, IPv4 prefixes as part of ::ffff:0:0/96. The
// family keeps IPv6 ranges such as ::/0 from matching v4-mapped addresses.
func rangeKey(cookie uint64, kind redirect.CaptureMsRangeKind, p netip.Prefix) redirect.CaptureMsRangeKey {
	bits, family := p.Bits(), uint32(unix.AF_INET6)
	if p.Addr().Is4() {
		bits, family = bits+96, unix.AF_INET
	}
	return redirect.CaptureMsRangeKey{
		Prefixlen: uint32(rangeFixedBits + bits),
		Kind:      kind,
		Netns:     cookie,
		Family:    family,
		Ip:        addrKey(p.Masked().Addr()).Ip,
	}
}

func prefixFromRangeKey(k redirect.CaptureMsRangeKey) netip.Prefix {
	addr := addrFromKey(redirect.CaptureMsAddr{Ip: k.Ip})
	bits := int(k.Prefixlen) - rangeFixedBits
	if k.Family == unix.AF_INET {
		bits -= 96
	} else {
		addr = netip.AddrFrom16(addr.As16()) // ::ffff:0:0/96 stays IPv6
	}
	return netip.PrefixFrom(addr, bits)
}
