package datapath

import (
	"errors"
	"net/netip"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/meshsplice/meshsplice/internal/testnet"
	"github.com/meshsplice/meshsplice/redirect"
)

func openTestDatapath(tb testing.TB) *Datapath {
	tb.Helper()
	testnet.RequireRoot(tb)
	cg := testnet.NewCgroup(tb)
	pin := testnet.PinDir(tb, func(dir string) error { return Detach(dir, 0) })
	d, err := Open(Options{PinDir: pin, CgroupPath: cg.Path, Node: NodeSettings{Capture: true, Splice: true}})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { d.Close() })
	return d
}

// portSet is a set with one ALLOW atom for the given ports.
func portSet(ports ...uint16) PolicySet {
	s := PolicySet{HasAllow: true, AllowMask: 1, DefaultIdentityMask: 1,
		PrefixMasks: map[netip.Prefix]uint64{netip.MustParsePrefix("0.0.0.0/0"): 1, netip.MustParsePrefix("::/0"): 1},
		PortMasks:   map[uint16]uint64{}}
	for _, p := range ports {
		s.PortMasks[p] = 1
	}
	return s
}

// fill writes entries of a set no IP uses into m until the kernel refuses
// one, leaving room for free more, and returns how many it wrote.
func fillPolPorts(tb testing.TB, m *ebpf.Map, free int) int {
	tb.Helper()
	one := uint64(1)
	n := 0
	for i := 0; ; i++ {
		k := redirect.CaptureMsPolPortKey{Set: 0xfffffff0 + uint32(i>>16), Port: uint16(i)}
		if err := m.Update(&k, &one, ebpf.UpdateNoExist); err != nil {
			break
		}
		n++
	}
	for i := 0; i < free; i++ {
		k := redirect.CaptureMsPolPortKey{Set: 0xfffffff0 + uint32((n-1-i)>>16), Port: uint16(n - 1 - i)}
		if err := m.Delete(&k); err != nil {
			tb.Fatal(err)
		}
	}
	return n - free
}

// TestFullPolicyMapKeepsThePreviousPolicy: a new policy that does not fit
// in the kernel's maps is refused as a whole: the previous one stays in
// force, no entry of the refused one is left behind, and the refusal is
// counted and reported. Checked twice: refused up front (SetPolicy counts
// the room first), and by the kernel in the middle of the swap (the write
// itself fails: what was written is undone).
func TestFullPolicyMapKeepsThePreviousPolicy(t *testing.T) {
	t.Run("refused up front", func(t *testing.T) { fullPolicyMap(t, false) })
	t.Run("refused by the kernel mid-swap", func(t *testing.T) { fullPolicyMap(t, true) })
}

func fullPolicyMap(t *testing.T, midSwap bool) {
	d := openTestDatapath(t)
	a, b := netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.0.2")
	old := Policy{Sets: []PolicySet{portSet(80)}, IPs: map[netip.Addr]IPPolicy{a: {Identity: 1, Set: 0}, b: {Identity: 2, Set: -1}}}
	if err := d.SetPolicy(old); err != nil {
		t.Fatal(err)
	}
	ipInfo := func(ip netip.Addr) redirect.CaptureMsIpInfo {
		var v redirect.CaptureMsIpInfo
		k := addrKey(ip)
		if err := d.capture.MsIpInfo.Lookup(&k, &v); err != nil {
			t.Fatalf("ms_ip_info %s: %v", ip, err)
		}
		return v
	}
	before := ipInfo(a)
	// Room for the first new set's two ports, not for the second's.
	fillPolPorts(t, d.capture.MsPolPorts, 3)

	next := Policy{Sets: []PolicySet{portSet(81, 82), portSet(83, 84)},
		IPs: map[netip.Addr]IPPolicy{a: {Identity: 1, Set: 1}, b: {Identity: 2, Set: 0}}}
	if midSwap {
		d.polMu.Lock()
		err := d.swapPolicy(next)
		d.polMu.Unlock()
		if err == nil {
			t.Fatal("swap into a full map worked")
		}
	} else if err := d.SetPolicy(next); !errors.Is(err, ErrPolicyNotApplied) {
		t.Fatalf("SetPolicy into a full map: %v, want ErrPolicyNotApplied", err)
	}
	if got := ipInfo(a); got != before {
		t.Errorf("10.0.0.1 now %+v, want the previous %+v", got, before)
	}
	if got := ipInfo(b); got.PolicySet != 0 {
		t.Errorf("10.0.0.2 points at set %d, want none (as before)", got.PolicySet)
	}
	var id uint32
	var ps redirect.CaptureMsPolSet
	var sets []uint32
	for it := d.capture.MsPolSets.Iterate(); it.Next(&id, &ps); {
		sets = append(sets, id)
	}
	if len(sets) != 1 || sets[0] != before.PolicySet {
		t.Errorf("policy sets in the kernel: %v, want only the previous %d", sets, before.PolicySet)
	}
	var pk redirect.CaptureMsPolPortKey
	var m uint64
	for it := d.capture.MsPolPorts.Iterate(); it.Next(&pk, &m); {
		if pk.Set < 0xfffffff0 && pk.Set != before.PolicySet {
			t.Errorf("ms_pol_ports keeps an entry of the refused policy: %+v", pk)
		}
	}
	if st := d.PolicyState(); !midSwap && (st.NotApplied != 1 || st.LastError == "") {
		t.Errorf("PolicyState %+v, want one refusal with its error", st)
	}
	// Room again: the next attempt applies, and says so.
	for i := 0; i < 16; i++ {
		k := redirect.CaptureMsPolPortKey{Set: 0xfffffff0, Port: uint16(i)}
		d.capture.MsPolPorts.Delete(&k)
	}
	if err := d.SetPolicy(next); err != nil {
		t.Fatalf("SetPolicy with room: %v", err)
	}
	if st := d.PolicyState(); st.LastError != "" || st.Applied != 2 {
		t.Errorf("PolicyState after success %+v", st)
	}
}
