package datapath

import (
	"fmt"
	"net/netip"
	"os"
	"slices"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"

	"github.com/meshsplice/meshsplice/redirect"
)

// KernelState is what the kernel maps hold, read back whole, for a drift
// check (`meshsplice check --drift`, the agent's drift gauge): the node
// switches, every registered pod with its settings, what each address
// means to policy, and the content of every policy set. It is read from
// the maps themselves, never from what a writer remembers writing.
type KernelState struct {
	Node NodeSettings
	// SpliceAvailable: the splice program is attached (a kernel without
	// sk_msg keeps the node's splice switch off, whatever the config says).
	SpliceAvailable bool
	Pods            []Pod
	IPs             map[netip.Addr]KernelIP
	Sets            map[uint32]PolicySet // by kernel set ID; Atoms are not in the kernel
}

// KernelIP is an address's entry in the kernel's policy tables.
type KernelIP struct {
	Identity uint32 // as a source (0: unknown)
	Set      uint32 // policy set as a destination (0: none)
}

// kernelStateMaps are the maps ReadKernelState reads.
var kernelStateMaps = []string{
	redirect.CaptureMapMsNodeSettings, redirect.CaptureMapMsPods, redirect.CaptureMapMsPodIps,
	redirect.CaptureMapMsPorts, redirect.CaptureMapMsRanges, redirect.CaptureMapMsIpInfo,
	redirect.CaptureMapMsPolSets, redirect.CaptureMapMsPolIds, redirect.CaptureMapMsPolPorts,
	redirect.CaptureMapMsPolBypass, redirect.CaptureMapMsPolPrefixes,
}

// ReadKernelState reads the KernelState of the datapath pinned at pinDir
// (no agent needed).
func ReadKernelState(pinDir string) (*KernelState, error) {
	if pinDir == "" {
		pinDir = DefaultPinDir
	}
	maps, err := openPinnedMaps(pinDir, kernelStateMaps...)
	if err != nil {
		return nil, err
	}
	defer closeMaps(maps)
	st, err := readKernelState(maps)
	if err != nil {
		return nil, err
	}
	_, err = os.Stat(skMsgPin(pinDir))
	st.SpliceAvailable = err == nil
	return st, nil
}

// KernelState is ReadKernelState for this datapath, through its own
// handles on the same maps.
func (d *Datapath) KernelState() (*KernelState, error) {
	c := d.capture
	st, err := readKernelState(map[string]*ebpf.Map{
		redirect.CaptureMapMsNodeSettings: c.MsNodeSettings, redirect.CaptureMapMsPods: c.MsPods,
		redirect.CaptureMapMsPodIps: c.MsPodIps, redirect.CaptureMapMsPorts: c.MsPorts,
		redirect.CaptureMapMsRanges: c.MsRanges, redirect.CaptureMapMsIpInfo: c.MsIpInfo,
		redirect.CaptureMapMsPolSets: c.MsPolSets, redirect.CaptureMapMsPolIds: c.MsPolIds,
		redirect.CaptureMapMsPolPorts: c.MsPolPorts, redirect.CaptureMapMsPolBypass: c.MsPolBypass,
		redirect.CaptureMapMsPolPrefixes: c.MsPolPrefixes,
	})
	if err != nil {
		return nil, err
	}
	st.SpliceAvailable = !d.spliceMissing()
	return st, nil
}

func readKernelState(maps map[string]*ebpf.Map) (*KernelState, error) {
	st := &KernelState{IPs: map[netip.Addr]KernelIP{}, Sets: map[uint32]PolicySet{}}
	var node redirect.CaptureMsNode
	if err := maps[redirect.CaptureMapMsNodeSettings].Lookup(uint32(0), &node); err == nil {
		st.Node = NodeSettings{
			Capture:      node.Flags&redirect.CaptureMsNodeFlagMS_NODE_CAPTURE != 0,
			Splice:       node.Flags&redirect.CaptureMsNodeFlagMS_NODE_SPLICE != 0,
			AppSpliceOff: node.Flags&redirect.CaptureMsNodeFlagMS_NODE_NO_APP_SPLICE != 0,
		}
	}
	var err error
	if st.Pods, err = readPods(maps[redirect.CaptureMapMsPods], maps[redirect.CaptureMapMsPodIps],
		maps[redirect.CaptureMapMsPorts], maps[redirect.CaptureMapMsRanges]); err != nil {
		return nil, err
	}
	var a redirect.CaptureMsAddr
	var info redirect.CaptureMsIpInfo
	it := maps[redirect.CaptureMapMsIpInfo].Iterate()
	for it.Next(&a, &info) {
		st.IPs[addrFromKey(a)] = KernelIP{Identity: info.Identity, Set: info.PolicySet}
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("read %s: %w", redirect.CaptureMapMsIpInfo, err)
	}
	if err := readSets(maps, st.Sets); err != nil {
		return nil, err
	}
	return st, nil
}

// readSets reads every policy set back into the form SetPolicy took.
func readSets(maps map[string]*ebpf.Map, sets map[uint32]PolicySet) error {
	var id uint32
	var v redirect.CaptureMsPolSet
	it := maps[redirect.CaptureMapMsPolSets].Iterate()
	for it.Next(&id, &v) {
		sets[id] = PolicySet{HasAllow: v.HasAllow != 0, AllowMask: v.AllowMask, DenyMask: v.DenyMask, PlaintextMask: v.PlaintextMask,
			DefaultIdentityMask: v.DefaultIdMask, DefaultPortMask: v.DefaultPortMask,
			IdentityMasks: map[uint32]uint64{}, PrefixMasks: map[netip.Prefix]uint64{}, PortMasks: map[uint16]uint64{}}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("read %s: %w", redirect.CaptureMapMsPolSets, err)
	}
	// Entries of a set the sets table lacks (a half-removed set) show up
	// as a set of their own: a drift, not something to hide.
	set := func(id uint32) PolicySet {
		s, ok := sets[id]
		if !ok {
			s = PolicySet{IdentityMasks: map[uint32]uint64{}, PrefixMasks: map[netip.Prefix]uint64{}, PortMasks: map[uint16]uint64{}}
			sets[id] = s
		}
		return s
	}
	var ik redirect.CaptureMsPolIdKey
	var pk redirect.CaptureMsPolPortKey
	var xk redirect.CaptureMsPolPrefixKey
	var m64 uint64
	var m8 uint8
	ids := maps[redirect.CaptureMapMsPolIds].Iterate()
	for ids.Next(&ik, &m64) {
		set(ik.Set).IdentityMasks[ik.Identity] = m64
	}
	ports := maps[redirect.CaptureMapMsPolPorts].Iterate()
	for ports.Next(&pk, &m64) {
		set(pk.Set).PortMasks[pk.Port] = m64
	}
	bypass := maps[redirect.CaptureMapMsPolBypass].Iterate()
	for bypass.Next(&pk, &m8) {
		s := set(pk.Set)
		s.BypassPorts = append(s.BypassPorts, pk.Port)
		sets[pk.Set] = s
	}
	prefixes := maps[redirect.CaptureMapMsPolPrefixes].Iterate()
	for prefixes.Next(&xk, &m64) {
		set(xk.Set).PrefixMasks[prefixFromPolKey(xk)] = m64
	}
	for name, it := range map[string]*ebpf.MapIterator{redirect.CaptureMapMsPolIds: ids,
		redirect.CaptureMapMsPolPorts: ports, redirect.CaptureMapMsPolBypass: bypass, redirect.CaptureMapMsPolPrefixes: prefixes} {
		if err := it.Err(); err != nil {
			return fmt.Errorf("read %s: %w", name, err)
		}
	}
	for id, s := range sets {
		slices.Sort(s.BypassPorts)
		sets[id] = s
	}
	return nil
}

// prefixFromPolKey is polPrefixKey's inverse.
func prefixFromPolKey(k redirect.CaptureMsPolPrefixKey) netip.Prefix {
	return prefixFromLPM(k.Ip, k.Prefixlen-polPrefixFixedBits, k.Family)
}

// prefixFromLPM is the prefix of an LPM key's address part: bits of the
// 128-bit address, IPv4 (family AF_INET) as part of ::ffff:0:0/96.
func prefixFromLPM(ip [4]uint32, bits, family uint32) netip.Prefix {
	addr := addrFromKey(redirect.CaptureMsAddr{Ip: ip})
	n := int(bits)
	if family == unix.AF_INET {
		n -= 96
	} else {
		addr = netip.AddrFrom16(addr.As16()) // ::ffff:0:0/96 stays IPv6
	}
	return netip.PrefixFrom(addr, n)
}

// HostProxyIDs are the proxy's uid and gid as the kernel's programs see
// them for a pod in the network namespace at netnsPath (its user
// namespace mapped to the host's), as AddPod writes them.
func HostProxyIDs(netnsPath string, uid, gid uint32) (uint32, uint32, error) {
	return proxyIDsOnHost(netnsPath, uid, gid)
}
