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
	// AppSpliceOff keeps every app socket out of the splice map, even in
	// pods with app-splice (the node switch app-splice: disabled); only
	// sidecar <-> sidecar is spliced then. Live connections keep their path.
	AppSpliceOff bool
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
	if s.Splice && !d.spliceMissing() { // a kernel without sk_msg: off
		node.Flags |= redirect.CaptureMsNodeFlagMS_NODE_SPLICE
	}
	if s.AppSpliceOff {
		node.Flags |= redirect.CaptureMsNodeFlagMS_NODE_NO_APP_SPLICE
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
		Capture:      node.Flags&redirect.CaptureMsNodeFlagMS_NODE_CAPTURE != 0,
		Splice:       node.Flags&redirect.CaptureMsNodeFlagMS_NODE_SPLICE != 0,
		AppSpliceOff: node.Flags&redirect.CaptureMsNodeFlagMS_NODE_NO_APP_SPLICE != 0,
	}, nil
}

// ErrIPInUse is returned by AddPod for an address that belongs to another
// registered pod: two pods never claim one address silently (the kernel
// finds a pod by its addresses). Unregister, or re-register without it, the
// pod that holds it first.
var ErrIPInUse = errors.New("address registered to another pod")

// AddPod registers a pod, or updates it in place when its namespace is
// registered already. Nothing is applied half-way: rules, addresses and the
// sk_lookup link are staged before the pod entry that switches them on, a
// failure removes what was staged (the pod's previous state stays in force),
// and stale rules of the previous version are removed only after the new
// one is in force. The netns path is checked against the cookie first.
func (d *Datapath) AddPod(p Pod) (err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if p.Cookie == 0 {
		c, err := NetnsCookie(p.NetnsPath)
		if err != nil {
			return fmt.Errorf("add pod: %w", err)
		}
		p.Cookie = c
	} else if p.NetnsPath != "" {
		if err := doInPod(p.Cookie, p.NetnsPath, func() error { return nil }); err != nil {
			return fmt.Errorf("add pod %d: %w", p.Cookie, err)
		}
	}
	if err := d.checkIPOwners(p.Cookie, p.IPs); err != nil {
		return fmt.Errorf("add pod %d: %w", p.Cookie, err)
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

	var undo rollback
	defer func() {
		if err != nil {
			if rerr := undo.run(); rerr != nil {
				err = fmt.Errorf("%w; rolling back: %w", err, rerr)
			}
		}
	}()
	for k := range ports {
		if err := stageKey(&undo, d.capture.MsPorts, &k); err != nil {
			return fmt.Errorf("add pod %d: port rule %d: %w", p.Cookie, k.Port, err)
		}
	}
	for k := range ranges {
		if err := stageKey(&undo, d.capture.MsRanges, &k); err != nil {
			return fmt.Errorf("add pod %d: range rule: %w", p.Cookie, err)
		}
	}
	for _, ip := range p.IPs {
		if err := stageValue(&undo, d.capture.MsPodIps, addrKey(ip), p.Cookie); err != nil {
			return fmt.Errorf("add pod %d: ip %s: %w", p.Cookie, ip, err)
		}
	}
	if p.NetnsPath != "" {
		if err := d.attachNetns(&undo, p.Cookie, p.NetnsPath); err != nil {
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
	slot, isNew, err := d.listenerSlot(p.Cookie)
	if err != nil {
		return fmt.Errorf("add pod %d: %w", p.Cookie, err)
	}
	if isNew {
		// A free slot holds nothing: whatever is left there (a listener
		// iterator that raced RemovePod) belongs to another namespace.
		if err := d.clearListenerSlot(slot); err != nil {
			return fmt.Errorf("add pod %d: %w", p.Cookie, err)
		}
	}
	pod.ListenerSlot = slot
	if err := stageValue(&undo, d.capture.MsPods, p.Cookie, pod); err != nil {
		return fmt.Errorf("add pod %d: %w", p.Cookie, err)
	}
	// In force. What follows no longer undoes the registration.
	undo = rollback{}
	if p.NetnsPath != "" {
		d.netns[p.Cookie] = p.NetnsPath
		// A sidecar that listened before the pod was registered. A failure
		// is retried by the periodic listener pass (ResyncListeners).
		if err := d.syncListeners(p.Cookie, p.NetnsPath); err != nil {
			d.log.Warn("register sidecar listener; retried by the next listener pass", "netns_cookie", p.Cookie, "error", err)
		}
	}
	// Drop what the previous version of this pod had and this one lacks.
	return d.prune(p.Cookie, ports, ranges, p.IPs)
}

// checkIPOwners refuses addresses that another registered pod holds. An
// address whose owner is no registered pod (a leftover) may be taken.
func (d *Datapath) checkIPOwners(cookie uint64, ips []netip.Addr) error {
	var result *multierror.Error
	for _, ip := range ips {
		a := addrKey(ip)
		var owner uint64
		if err := d.capture.MsPodIps.Lookup(&a, &owner); err != nil || owner == cookie {
			continue
		}
		var other redirect.CaptureMsPod
		if d.capture.MsPods.Lookup(&owner, &other) == nil {
			result = multierror.Append(result, fmt.Errorf("%w: %s belongs to the pod of netns %d", ErrIPInUse, ip, owner))
		}
	}
	return result.ErrorOrNil()
}

// rollback undoes staged kernel writes, newest first.
type rollback struct{ steps []func() error }

func (r *rollback) add(step func() error) { r.steps = append(r.steps, step) }

// run undoes every step, past failures, and reports them all.
func (r *rollback) run() error {
	var result *multierror.Error
	for i := len(r.steps) - 1; i >= 0; i-- {
		if err := r.steps[i](); err != nil {
			result = multierror.Append(result, err)
		}
	}
	r.steps = nil
	return result.ErrorOrNil()
}

// stageKey adds a set member (value 1) unless it is there already.
func stageKey[K any](undo *rollback, m *ebpf.Map, k *K) error {
	var v uint8
	if m.Lookup(k, &v) == nil {
		return nil
	}
	if err := m.Update(k, uint8(1), ebpf.UpdateAny); err != nil {
		return err
	}
	undo.add(func() error { return deleteIfThere(m, k) })
	return nil
}

// stageValue writes k = v, remembering the previous value to restore.
func stageValue[K, V comparable](undo *rollback, m *ebpf.Map, k K, v V) error {
	var prev V
	had := m.Lookup(&k, &prev) == nil
	if had && prev == v {
		return nil
	}
	if err := m.Update(&k, &v, ebpf.UpdateAny); err != nil {
		return err
	}
	undo.add(func() error {
		if had {
			return m.Update(&k, &prev, ebpf.UpdateAny)
		}
		return deleteIfThere(m, &k)
	})
	return nil
}

func deleteIfThere(m *ebpf.Map, k any) error {
	if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
		return fmt.Errorf("delete from %s: %w", m, err)
	}
	return nil
}

// clearListenerSlot empties both entries of a listener slot.
func (d *Datapath) clearListenerSlot(slot uint32) error {
	var result *multierror.Error
	for _, idx := range []uint32{2 * slot, 2*slot + 1} {
		// An empty sockmap slot answers EINVAL, not ENOENT.
		if err := d.capture.MsListeners.Delete(&idx); err != nil &&
			!errors.Is(err, ebpf.ErrKeyNotExist) && !errors.Is(err, unix.EINVAL) {
			result = multierror.Append(result, fmt.Errorf("clear listener slot %d: %w", slot, err))
		}
	}
	return result.ErrorOrNil()
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
	delete(d.unregistrable, cookie)
	if hadPod {
		// Free the listener slots for the next pod.
		if err := d.clearListenerSlot(old.ListenerSlot); err != nil {
			result = multierror.Append(result, fmt.Errorf("remove pod %d: %w", cookie, err))
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
		if err := os.Remove(pin); err != nil && !errors.Is(err, os.ErrNotExist) {
			result = multierror.Append(result, fmt.Errorf("remove pod %d: remove stale sk_lookup pin: %w", cookie, err))
		}
	}
	return result.ErrorOrNil()
}

// listenerSlot keeps the slot of a registered pod, or gives a new pod the
// lowest free one (pods x 2 entries of ms_listeners); isNew says which.
func (d *Datapath) listenerSlot(cookie uint64) (slot uint32, isNew bool, err error) {
	var c uint64
	var v redirect.CaptureMsPod
	used := map[uint32]bool{}
	for it := d.capture.MsPods.Iterate(); it.Next(&c, &v); {
		if c == cookie {
			return v.ListenerSlot, false, nil
		}
		used[v.ListenerSlot] = true
	}
	max := d.capture.MsListeners.MaxEntries() / 2
	for slot := uint32(0); slot < max; slot++ {
		if !used[slot] {
			return slot, true, nil
		}
	}
	return 0, false, fmt.Errorf("no free listener slot: %d pods registered", len(used))
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
// or updates the pinned link of an earlier run in place (the pin is named
// by the cookie it was checked against). A new link is undone by undo.
func (d *Datapath) attachNetns(undo *rollback, cookie uint64, path string) error {
	pin := filepath.Join(netnsLinkDir(d.pinDir), strconv.FormatUint(cookie, 10))
	if l, err := link.LoadPinnedLink(pin, nil); err == nil {
		err := l.Update(d.capture.MsSkLookup)
		l.Close()
		if err == nil {
			return nil
		}
		os.Remove(pin)
	}
	f, err := openPodNetns(cookie, path)
	if err != nil {
		return err
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
	// Removing the pin releases the link (detaches) once l is closed.
	undo.add(func() error {
		if err := os.Remove(pin); err != nil {
			return fmt.Errorf("unpin sk_lookup link: %w", err)
		}
		return nil
	})
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
			if err := l.Unpin(); err != nil {
				d.log.Warn("unpin a defunct sk_lookup link", "pin", pin, "error", err)
			}
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
	set(t.Sidecar || t.Capture, redirect.CaptureMsPodFlagMS_POD_SIDECAR)
	set(t.CaptureIPv6(), redirect.CaptureMsPodFlagMS_POD_CAPTURE_IPV6)
	set(t.IPTables, redirect.CaptureMsPodFlagMS_POD_IPTABLES)
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
		Sidecar:                 has(redirect.CaptureMsPodFlagMS_POD_SIDECAR),
		IPTables:                has(redirect.CaptureMsPodFlagMS_POD_IPTABLES),
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
	return prefixFromLPM(k.Ip, k.Prefixlen-rangeFixedBits, k.Family)
}
