package datapath

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"net/netip"
	"os"
	"slices"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/ringbuf"
	"github.com/hashicorp/go-multierror"
	"golang.org/x/sys/unix"

	"github.com/meshsplice/meshsplice/redirect"
)

// The identity policy safety net, kernel side. The agent compiles Istio
// AuthorizationPolicy (package policy) into sets of at most 64 atoms and
// hands them here as a Policy; the programs judge every new connection of a
// registered pod (egress, connect4/6, any uid, the sidecar included) and
// every new connection to one with a sidecar (ingress, sk_lookup, any
// source), whether meshsplice captures it or not, with the destination
// workload's set, and a policy change tears down live connections it now
// forbids (Linux >= 6.5).

// PolicySet is one compiled policy set, as the kernel evaluates it:
// m = IdentityMasks[src identity] & PrefixMasks[longest match of src IP] &
// PortMasks[dst port]; DENY if m&DenyMask, else DENY if HasAllow and
// m&AllowMask == 0.
type PolicySet struct {
	HasAllow            bool
	AllowMask, DenyMask uint64
	// PlaintextMask is ORed into the identity mask of a source whose
	// IPPolicy says Plaintext, where the destination's sidecar surely sees
	// the connection (PeerAuthentication STRICT).
	PlaintextMask       uint64
	DefaultIdentityMask uint64
	DefaultPortMask     uint64
	IdentityMasks       map[uint32]uint64
	// PrefixMasks must hold 0.0.0.0/0 and ::/0 (else those sources match
	// no atom). IPv4 prefixes are IPv4, not v4-mapped.
	PrefixMasks map[netip.Prefix]uint64
	PortMasks   map[uint16]uint64
	// BypassPorts are never judged: the workload's sidecar ports and the
	// inbound ports its sidecar does not capture.
	BypassPorts []uint16
	// Atoms names each atom (bit i), for the denial record.
	Atoms []string
}

// IPPolicy is what the kernel knows of one workload IP.
type IPPolicy struct {
	Identity uint32 // its identity as a source (0: unknown)
	Set      int    // index into Policy.Sets of its policy as a destination; -1: none
	// Plaintext: a pod known to have no sidecar (its connections are
	// plaintext, refused on STRICT ports).
	Plaintext bool
}

// Policy is the whole kernel policy state.
type Policy struct {
	Sets []PolicySet
	IPs  map[netip.Addr]IPPolicy
}

// Denial is one denied connection, as the kernel recorded it.
type Denial struct {
	Time        time.Time  `json:"time"`
	Direction   string     `json:"direction"` // egress, ingress, teardown
	Reason      string     `json:"reason"`    // deny-rule, no-allow-rule
	Src         netip.Addr `json:"src"`
	Dst         netip.Addr `json:"dst"`
	Port        uint16     `json:"port"`
	SrcIdentity uint32     `json:"src_identity"`
	UID         uint32     `json:"uid,omitempty"` // egress: the process's uid
	Netns       uint64     `json:"netns_cookie"`
	// PolicySet and DenyHits are the kernel's view: the set that judged
	// and the DENY atoms (bits) that matched.
	PolicySet uint32 `json:"policy_set"`
	DenyHits  uint64 `json:"deny_hits,omitempty"`
	// Policies are the atoms that decided (for a DENY rule) or every
	// ALLOW atom of the set (none matched); only the agent that compiled
	// the set can name them.
	Policies []string `json:"policies,omitempty"`
}

const maxDenials = 256

// ErrPolicyNotApplied is wrapped by SetPolicy's error when the new policy
// was refused as a whole (it does not fit in the kernel's maps, or a write
// failed): the kernel keeps the previous policy, unchanged.
var ErrPolicyNotApplied = errors.New("policy not applied; the kernel keeps the previous policy")

// PolicyState says whether the last SetPolicy was applied.
type PolicyState struct {
	// Applied counts the policies SetPolicy installed, NotApplied those it
	// refused (ErrPolicyNotApplied) since the datapath was opened.
	Applied    uint64 `json:"applied"`
	NotApplied uint64 `json:"not_applied"`
	// LastError is why the last SetPolicy was refused; "" when it was
	// applied (or none was attempted).
	LastError string `json:"last_error,omitempty"`
}

// PolicyState returns the outcome of the SetPolicy calls so far.
func (d *Datapath) PolicyState() PolicyState {
	d.polMu.Lock()
	defer d.polMu.Unlock()
	return d.polState
}

// SetPolicy replaces the kernel's policy state. New sets are written
// before any IP points at them and old ones removed after, so a new
// connection is always judged by one complete set, old or new. A policy
// that does not fit, or whose writes fail, is refused as a whole: what was
// written of it is removed and every IP points where it did before
// (ErrPolicyNotApplied, counted in PolicyState).
func (d *Datapath) SetPolicy(p Policy) error {
	d.polMu.Lock()
	defer d.polMu.Unlock()
	err := d.policyFits(p)
	if err == nil {
		err = d.swapPolicy(p)
	}
	if err != nil {
		d.polState.NotApplied++
		d.polState.LastError = err.Error()
		return fmt.Errorf("%w: %w", ErrPolicyNotApplied, err)
	}
	d.polState.Applied++
	d.polState.LastError = ""
	// Forget IPs no longer known, then the old sets. The new policy is in
	// force already: a failure here leaves unused entries behind, no more.
	var result *multierror.Error
	var k redirect.CaptureMsAddr
	var v redirect.CaptureMsIpInfo
	var stale []redirect.CaptureMsAddr
	for it := d.capture.MsIpInfo.Iterate(); it.Next(&k, &v); {
		if _, ok := p.IPs[addrFromKey(k)]; !ok {
			stale = append(stale, k)
		}
	}
	for _, k := range stale {
		if err := d.capture.MsIpInfo.Delete(&k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			result = multierror.Append(result, err)
		}
	}
	var old []uint32
	for id := range d.sets {
		if _, kept := d.newSets[id]; !kept {
			old = append(old, id)
		}
	}
	if err := d.deleteSets(old); err != nil {
		result = multierror.Append(result, err)
	}
	d.sets, d.newSets = d.newSets, nil
	return result.ErrorOrNil()
}

// swapPolicy writes p's sets and points the IPs at them; on failure it
// undoes both and returns why.
func (d *Datapath) swapPolicy(p Policy) error {
	ids := make([]uint32, len(p.Sets))
	d.newSets = map[uint32]PolicySet{}
	undoSets := func() {
		var written []uint32
		for id := range d.newSets {
			written = append(written, id)
		}
		d.deleteSets(written)
		d.newSets = nil
	}
	for i, s := range p.Sets {
		d.nextSet++
		if d.nextSet == 0 {
			d.nextSet = 1
		}
		ids[i] = d.nextSet
		d.newSets[ids[i]] = s
		if err := d.writeSet(ids[i], s); err != nil {
			undoSets()
			return err
		}
	}
	// Point the IPs at the new sets, remembering what each held.
	type prev struct {
		k   redirect.CaptureMsAddr
		v   redirect.CaptureMsIpInfo
		had bool
	}
	var undo []prev
	for ip, ipp := range p.IPs {
		v := redirect.CaptureMsIpInfo{Identity: ipp.Identity}
		if ipp.Plaintext {
			v.Flags |= redirect.CaptureMsIpFlagMS_IP_PLAINTEXT
		}
		if ipp.Set >= 0 && ipp.Set < len(ids) {
			v.PolicySet = ids[ipp.Set]
		}
		k := addrKey(ip)
		pr := prev{k: k}
		pr.had = d.capture.MsIpInfo.Lookup(&k, &pr.v) == nil
		if err := d.capture.MsIpInfo.Update(&k, &v, ebpf.UpdateAny); err != nil {
			var undoErr *multierror.Error
			for _, u := range slices.Backward(undo) {
				var uerr error
				if u.had {
					uerr = d.capture.MsIpInfo.Update(&u.k, &u.v, ebpf.UpdateAny)
				} else {
					uerr = d.capture.MsIpInfo.Delete(&u.k)
				}
				if uerr != nil {
					undoErr = multierror.Append(undoErr, fmt.Errorf("restore ip %s: %w", addrFromKey(u.k), uerr))
				}
			}
			undoSets()
			if uerr := undoErr.ErrorOrNil(); uerr != nil {
				return fmt.Errorf("policy: ip %s: %w (and the previous policy could not be restored everywhere: %w)", ip, err, uerr)
			}
			return fmt.Errorf("policy: ip %s: %w", ip, err)
		}
		undo = append(undo, pr)
	}
	return nil
}

// policyFits checks, before anything is written, that p's entries fit in
// each map beside those of the policy in force (a swap holds both for a
// moment).
func (d *Datapath) policyFits(p Policy) error {
	need := map[*ebpf.Map]int{}
	for _, s := range p.Sets {
		need[d.capture.MsPolSets]++
		need[d.capture.MsPolIds] += len(s.IdentityMasks)
		need[d.capture.MsPolPorts] += len(s.PortMasks)
		need[d.capture.MsPolBypass] += len(s.BypassPorts)
		need[d.capture.MsPolPrefixes] += len(s.PrefixMasks)
	}
	newIPs := 0
	for ip := range p.IPs {
		k := addrKey(ip)
		var v redirect.CaptureMsIpInfo
		if d.capture.MsIpInfo.Lookup(&k, &v) != nil {
			newIPs++
		}
	}
	need[d.capture.MsIpInfo] = newIPs
	var result *multierror.Error
	for m, n := range need {
		if n == 0 {
			continue
		}
		used, err := mapLen(m)
		if err != nil {
			return err
		}
		if used+n > int(m.MaxEntries()) {
			info, _ := m.Info()
			name := ""
			if info != nil {
				name = info.Name
			}
			result = multierror.Append(result, fmt.Errorf("%w: %s needs %d more entries, %d of %d are in use",
				ErrPolicyMapFull, name, n, used, m.MaxEntries()))
		}
	}
	return result.ErrorOrNil()
}

// ErrPolicyMapFull: the policy does not fit in a kernel map (see the node
// limits in the README).
var ErrPolicyMapFull = errors.New("policy map full")

// mapLen counts a hash or trie map's entries.
func mapLen(m *ebpf.Map) (int, error) {
	keys := make([]byte, m.KeySize())
	vals := make([]byte, m.ValueSize())
	n := 0
	it := m.Iterate()
	for it.Next(&keys, &vals) {
		n++
	}
	if err := it.Err(); err != nil {
		return 0, fmt.Errorf("count entries: %w", err)
	}
	return n, nil
}

func (d *Datapath) writeSet(id uint32, s PolicySet) error {
	one := uint8(1)
	for identity, m := range s.IdentityMasks {
		k := redirect.CaptureMsPolIdKey{Set: id, Identity: identity}
		if err := d.capture.MsPolIds.Update(&k, &m, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("policy set %d: identity %d: %w", id, identity, err)
		}
	}
	for port, m := range s.PortMasks {
		k := redirect.CaptureMsPolPortKey{Set: id, Port: port}
		if err := d.capture.MsPolPorts.Update(&k, &m, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("policy set %d: port %d: %w", id, port, err)
		}
	}
	for _, port := range s.BypassPorts {
		k := redirect.CaptureMsPolPortKey{Set: id, Port: port}
		if err := d.capture.MsPolBypass.Update(&k, &one, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("policy set %d: bypass port %d: %w", id, port, err)
		}
	}
	for pfx, m := range s.PrefixMasks {
		k := polPrefixKey(id, pfx)
		if err := d.capture.MsPolPrefixes.Update(&k, &m, ebpf.UpdateAny); err != nil {
			return fmt.Errorf("policy set %d: prefix %s: %w", id, pfx, err)
		}
	}
	v := redirect.CaptureMsPolSet{
		AllowMask: s.AllowMask, DenyMask: s.DenyMask,
		DefaultIdMask: s.DefaultIdentityMask, DefaultPortMask: s.DefaultPortMask,
		PlaintextMask: s.PlaintextMask,
	}
	if s.HasAllow {
		v.HasAllow = 1
	}
	if err := d.capture.MsPolSets.Update(&id, &v, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("policy set %d: %w", id, err)
	}
	return nil
}

// deleteSets removes every entry of the given set IDs.
func (d *Datapath) deleteSets(ids []uint32) error {
	if len(ids) == 0 {
		return nil
	}
	gone := map[uint32]bool{}
	for _, id := range ids {
		gone[id] = true
	}
	var result *multierror.Error
	del := func(m *ebpf.Map, keys []any) {
		for _, k := range keys {
			if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
				result = multierror.Append(result, err)
			}
		}
	}
	var ik redirect.CaptureMsPolIdKey
	var pk redirect.CaptureMsPolPortKey
	var xk redirect.CaptureMsPolPrefixKey
	var m64 uint64
	var m8 uint8
	var keys []any
	for it := d.capture.MsPolIds.Iterate(); it.Next(&ik, &m64); {
		if gone[ik.Set] {
			k := ik
			keys = append(keys, &k)
		}
	}
	del(d.capture.MsPolIds, keys)
	keys = nil
	for it := d.capture.MsPolPorts.Iterate(); it.Next(&pk, &m64); {
		if gone[pk.Set] {
			k := pk
			keys = append(keys, &k)
		}
	}
	del(d.capture.MsPolPorts, keys)
	keys = nil
	for it := d.capture.MsPolBypass.Iterate(); it.Next(&pk, &m8); {
		if gone[pk.Set] {
			k := pk
			keys = append(keys, &k)
		}
	}
	del(d.capture.MsPolBypass, keys)
	keys = nil
	for it := d.capture.MsPolPrefixes.Iterate(); it.Next(&xk, &m64); {
		if gone[xk.Set] {
			k := xk
			keys = append(keys, &k)
		}
	}
	del(d.capture.MsPolPrefixes, keys)
	for id := range gone {
		if err := d.capture.MsPolSets.Delete(&id); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			result = multierror.Append(result, err)
		}
	}
	return result.ErrorOrNil()
}

// polPrefixFixedBits is MS_POL_PREFIX_FIXED_BITS: the set and the address
// family, matched exactly.
const polPrefixFixedBits = 64

// polPrefixKey is an LPM key: the fixed bits (set, family) then the prefix
// of the 128-bit address, IPv4 prefixes as part of ::ffff:0:0/96. The
// family keeps IPv6 prefixes (::/0, v4-mapped ones such as ::ffff:0:0/96)
// from matching IPv4 sources, as in Envoy, and from sharing a key with an
// IPv4 prefix.
func polPrefixKey(set uint32, p netip.Prefix) redirect.CaptureMsPolPrefixKey {
	bits, family := p.Bits(), uint32(unix.AF_INET6)
	if p.Addr().Is4() {
		bits, family = bits+96, unix.AF_INET
	}
	return redirect.CaptureMsPolPrefixKey{
		Prefixlen: uint32(polPrefixFixedBits + bits),
		Set:       set,
		Family:    family,
		Ip:        addrKey(p.Masked().Addr()).Ip,
	}
}

// TeardownSupported reports whether this kernel can close live connections
// on a policy change (bpf_sock_destroy, Linux >= 6.5).
func (d *Datapath) TeardownSupported() bool { return d.teardownIter != nil }

// TeardownForbidden closes, in every registered pod, the established
// connections the current policy forbids, and returns how many. On kernels
// without bpf_sock_destroy it returns ErrTeardownUnsupported: there, live
// connections outlive a policy change (new ones are judged at once).
func (d *Datapath) TeardownForbidden() (int, error) {
	if d.teardownIter == nil {
		return 0, ErrTeardownUnsupported
	}
	before, err := d.Counters()
	if err != nil {
		return 0, err
	}
	d.mu.Lock()
	pods := make(map[uint64]string, len(d.netns))
	for c, p := range d.netns {
		pods[c] = p
	}
	d.mu.Unlock()
	var result *multierror.Error
	for cookie, path := range pods {
		if err := d.runIterIn(cookie, path, d.teardownIter); err != nil {
			result = multierror.Append(result, err)
		}
	}
	after, err := d.Counters()
	if err != nil {
		return 0, err
	}
	return int(after.Sub(before)["policy.torn_down"]), result.ErrorOrNil()
}

// ErrTeardownUnsupported: the kernel cannot destroy sockets from BPF.
var ErrTeardownUnsupported = errors.New("closing live connections on a policy change needs Linux >= 6.5 (bpf_sock_destroy)")

// runIterIn runs an iterator inside the pod's netns at path (an iterator
// walks the netns of the thread that opens it), with the pod's cookie in
// ms_iter_netns.
func (d *Datapath) runIterIn(cookie uint64, path string, it *link.Iter) error {
	d.iterMu.Lock()
	defer d.iterMu.Unlock()
	if err := d.capture.MsIterNetns.Update(uint32(0), cookie, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("set iterator netns: %w", err)
	}
	// The iterator walks the netns of the thread that opens it.
	return doInPod(cookie, path, func() error { return readIter(it) })
}

func readIter(it *link.Iter) error {
	r, err := it.Open()
	if err != nil {
		return fmt.Errorf("open iterator: %w", err)
	}
	defer r.Close()
	if _, err := io.Copy(io.Discard, r); err != nil {
		return fmt.Errorf("run iterator: %w", err)
	}
	return nil
}

// openPolicy loads the teardown iterator when the kernel has
// bpf_sock_destroy, and starts reading denial records.
func (d *Datapath) openPolicy(load *ebpf.CollectionOptions, opts Options) error {
	if err := loadObjects(redirect.LoadTeardown, &d.teardown, load, opts); err != nil {
		d.log.Warn("live connections will not be closed on a policy change", "reason", ErrTeardownUnsupported, "error", err)
	} else if it, err := link.AttachIter(link.IterOptions{Program: d.teardown.MsPolicyTeardown}); err != nil {
		d.log.Warn("live connections will not be closed on a policy change", "error", err)
	} else {
		d.teardownIter = it
	}
	// Sets of an earlier agent: removed at the next SetPolicy, and their
	// IDs never reused meanwhile.
	d.sets = map[uint32]PolicySet{}
	var id uint32
	var v redirect.CaptureMsPolSet
	for it := d.capture.MsPolSets.Iterate(); it.Next(&id, &v); {
		d.sets[id] = PolicySet{}
		d.nextSet = max(d.nextSet, id)
	}
	rd, err := ringbuf.NewReader(d.capture.MsDenials)
	if err != nil {
		return fmt.Errorf("read ms_denials: %w", err)
	}
	d.denialReader = rd
	d.denialsDone = make(chan struct{})
	go d.readDenials(rd)
	return nil
}

func (d *Datapath) readDenials(rd *ringbuf.Reader) {
	defer close(d.denialsDone)
	var logWindow time.Time
	var logged, suppressed int
	for {
		rec, err := rd.Read()
		if errors.Is(err, os.ErrClosed) {
			return
		}
		if err != nil {
			continue
		}
		var raw redirect.CaptureMsDenial
		if err := binary.Read(bytes.NewReader(rec.RawSample), binary.NativeEndian, &raw); err != nil {
			continue
		}
		dn := d.decodeDenial(raw)
		d.polMu.Lock()
		d.denials = append(d.denials, dn)
		if len(d.denials) > maxDenials {
			d.denials = slices.Delete(d.denials, 0, len(d.denials)-maxDenials)
		}
		d.polMu.Unlock()
		// At most 10 log lines a second: a scan of forbidden ports must
		// not flood the log (every denial is counted and recorded).
		if now := time.Now(); now.Sub(logWindow) > time.Second {
			if suppressed > 0 {
				d.log.Info("denials not logged (rate limit)", "count", suppressed)
			}
			logWindow, logged, suppressed = now, 0, 0
		}
		if logged < 10 {
			logged++
			d.log.Info("connection denied by policy", "direction", dn.Direction, "src", dn.Src, "dst", dn.Dst,
				"port", dn.Port, "reason", dn.Reason, "policies", dn.Policies)
		} else {
			suppressed++
		}
	}
}

func (d *Datapath) decodeDenial(raw redirect.CaptureMsDenial) Denial {
	dn := rawDenial(raw)
	d.polMu.Lock()
	set, ok := d.sets[raw.PolicySet]
	d.polMu.Unlock()
	mask := raw.DenyHits
	if dn.Reason == "no-allow-rule" {
		mask = 0
		if ok {
			mask = set.AllowMask
		}
	}
	for mask != 0 {
		i := bits.TrailingZeros64(mask)
		mask &^= 1 << i
		if ok && i < len(set.Atoms) {
			dn.Policies = append(dn.Policies, set.Atoms[i])
		}
	}
	return dn
}

// rawDenial decodes what the kernel recorded.
func rawDenial(raw redirect.CaptureMsDenial) Denial {
	dn := Denial{
		Time:        bootToWall(raw.TimeNs),
		PolicySet:   raw.PolicySet,
		DenyHits:    raw.DenyHits,
		Src:         addrFromKey(redirect.CaptureMsAddr{Ip: raw.SrcIp}),
		Dst:         addrFromKey(redirect.CaptureMsAddr{Ip: raw.DstIp}),
		Port:        raw.DstPort,
		SrcIdentity: raw.SrcIdentity,
		UID:         raw.Uid,
		Netns:       raw.Netns,
	}
	switch redirect.CaptureMsDirection(raw.Direction) {
	case redirect.CaptureMsDirectionMS_DIR_EGRESS:
		dn.Direction = "egress"
	case redirect.CaptureMsDirectionMS_DIR_INGRESS:
		dn.Direction = "ingress"
	case redirect.CaptureMsDirectionMS_DIR_TEARDOWN:
		dn.Direction = "teardown"
	}
	dn.Reason = "deny-rule"
	if redirect.CaptureMsDenialReason(raw.Reason) == redirect.CaptureMsDenialReasonMS_DENY_NO_ALLOW {
		dn.Reason = "no-allow-rule"
	}
	return dn
}

// bootToWall converts a CLOCK_BOOTTIME reading to wall-clock time.
func bootToWall(ns uint64) time.Time {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts); err != nil || ns == 0 {
		return time.Now()
	}
	return time.Now().Add(-time.Duration(ts.Nano() - int64(ns)))
}

// readDenialLog reads the kernel's round-robin log of recent denials,
// oldest first.
func readDenialLog(logMap, seqMap *ebpf.Map) ([]Denial, error) {
	var seq uint64
	if err := seqMap.Lookup(uint32(0), &seq); err != nil {
		return nil, fmt.Errorf("read denial count: %w", err)
	}
	n := uint64(logMap.MaxEntries())
	start := uint64(0)
	if seq > n {
		start = seq - n
	}
	var out []Denial
	for i := start; i < seq; i++ {
		var raw redirect.CaptureMsDenial
		if err := logMap.Lookup(uint32(i%n), &raw); err != nil {
			return nil, fmt.Errorf("read denial log: %w", err)
		}
		out = append(out, rawDenial(raw))
	}
	return out, nil
}

// Denials returns the most recent denials (at most 256), oldest first.
func (d *Datapath) Denials() []Denial {
	d.polMu.Lock()
	defer d.polMu.Unlock()
	return slices.Clone(d.denials)
}
