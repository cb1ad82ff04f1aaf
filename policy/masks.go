package policy

import (
	"math/bits"
	"net/netip"
	"slices"
)

var (
	allIPv4 = netip.MustParsePrefix("0.0.0.0/0")
	allIPv6 = netip.MustParsePrefix("::/0")
)

// buildMasks computes the lookup masks of atoms (at most MaxAtoms).
func buildMasks(atoms []Atom, hasAllow bool, universe []identity) PolicySet {
	s := PolicySet{
		Atoms:         atoms,
		HasAllow:      hasAllow,
		IdentityMasks: map[IdentityID]uint64{},
		PrefixMasks:   map[netip.Prefix]uint64{},
		PortMasks:     map[uint16]uint64{},
	}
	for i, a := range atoms {
		bit := uint64(1) << i
		if a.Action == Deny {
			s.DenyMask |= bit
		} else {
			s.AllowMask |= bit
		}
		if a.Plaintext {
			s.PlaintextMask |= bit
		}
	}

	// Identities: the unknown source's mask is the default.
	byID := map[IdentityID]uint64{}
	for i, a := range atoms {
		for _, id := range a.Identities {
			byID[id] |= 1 << i
		}
	}
	s.DefaultIdentityMask = byID[UnknownIdentity]
	for _, u := range universe {
		if m := byID[u.id]; u.id != UnknownIdentity && m != s.DefaultIdentityMask {
			s.IdentityMasks[u.id] = m
		}
	}

	// Prefixes: an address whose longest match is P is inside exactly the
	// entries Q that contain P, so "address in Q" reads "Q contains P".
	entries := []netip.Prefix{allIPv4, allIPv6}
	for _, a := range atoms {
		entries = append(entries, a.IPs...)
		entries = append(entries, a.NotIPs...)
	}
	slices.SortFunc(entries, func(a, b netip.Prefix) int {
		if a.Bits() != b.Bits() {
			return a.Bits() - b.Bits()
		}
		return comparePrefix(a, b)
	})
	entries = slices.Compact(entries)
	masks := make(map[netip.Prefix]uint64, len(entries))
	for _, p := range entries {
		var m uint64
		for i, a := range atoms {
			if ipHolds(a, func(q netip.Prefix) bool { return contains(q, p) }) {
				m |= 1 << i
			}
		}
		masks[p] = m
	}
	// An entry with its parent's mask is redundant: without it the lookup
	// lands on the parent. Entries are sorted shortest first, so a parent is
	// decided before its children.
	for _, p := range entries {
		if p.Bits() == 0 {
			s.PrefixMasks[p] = masks[p]
			continue
		}
		if parent, ok := longestParent(p, entries); !ok || masks[parent] != masks[p] {
			s.PrefixMasks[p] = masks[p]
		}
	}

	// Ports: the default is the mask of a port no atom names.
	var ports []uint16
	for _, a := range atoms {
		ports = append(ports, a.Ports...)
	}
	for i, a := range atoms {
		if a.PortMatch != InPorts {
			s.DefaultPortMask |= 1 << i
		}
	}
	for _, port := range sortedPorts(ports) {
		var m uint64
		for i, a := range atoms {
			if portHolds(a, port) {
				m |= 1 << i
			}
		}
		if m != s.DefaultPortMask {
			s.PortMasks[port] = m
		}
	}
	return s
}

// longestParent is the longest entry other than p that contains p.
func longestParent(p netip.Prefix, entries []netip.Prefix) (netip.Prefix, bool) {
	var best netip.Prefix
	found := false
	for _, q := range entries {
		if q != p && contains(q, p) && (!found || q.Bits() > best.Bits()) {
			best, found = q, true
		}
	}
	return best, found
}

// ipHolds evaluates an atom's address condition, in(q) telling whether the
// address is in prefix q.
func ipHolds(a Atom, in func(q netip.Prefix) bool) bool {
	if a.IPs != nil && !slices.ContainsFunc(a.IPs, in) {
		return false
	}
	return !slices.ContainsFunc(a.NotIPs, in)
}

func portHolds(a Atom, port uint16) bool {
	switch a.PortMatch {
	case InPorts:
		return slices.Contains(a.Ports, port)
	case NotInPorts:
		return !slices.Contains(a.Ports, port)
	}
	return true
}

// Verdict evaluates the set the way the kernel does: three lookups, an AND,
// DENY atoms first. atom is the index of the deciding atom (the lowest
// matching DENY atom, or the lowest matching ALLOW atom when the set has
// ALLOW policies), or -1 when no atom decided: allowed because no ALLOW
// policy applies, or denied because none matched.
//
// srcIP is judged in its own family, never by a prefix of the other (as
// Envoy judges it). A v4-mapped address is the IPv4 address, as in the
// kernel (which stores IPv4 that way) and in Envoy (which unmaps the peer of
// a dual-stack listener); no IPv6 packet carries one as its source (Linux
// drops those, RFC 4291 2.5.5.2). So an IPv6 prefix, v4-mapped ones
// included, never matches an IPv4 source.
func (s *PolicySet) Verdict(src IdentityID, srcIP netip.Addr, dstPort uint16) (allow bool, atom int) {
	return s.VerdictFrom(src, srcIP, dstPort, false)
}

// VerdictFrom is Verdict for a source that may be known to have no sidecar
// (plaintext): its identity mask is ORed with PlaintextMask, as the kernel
// does for an address it knows has no sidecar when the destination's
// capture is known (ingress, or egress to a pod of this node).
func (s *PolicySet) VerdictFrom(src IdentityID, srcIP netip.Addr, dstPort uint16, plaintext bool) (allow bool, atom int) {
	idMask, ok := s.IdentityMasks[src]
	if !ok {
		idMask = s.DefaultIdentityMask
	}
	if plaintext {
		idMask |= s.PlaintextMask
	}
	portMask, ok := s.PortMasks[dstPort]
	if !ok {
		portMask = s.DefaultPortMask
	}
	m := idMask & s.lookupPrefix(srcIP) & portMask
	if d := m & s.DenyMask; d != 0 {
		return false, bits.TrailingZeros64(d)
	}
	if !s.HasAllow {
		return true, -1
	}
	if a := m & s.AllowMask; a != 0 {
		return true, bits.TrailingZeros64(a)
	}
	return false, -1
}

// lookupPrefix is the longest prefix match of addr in PrefixMasks.
func (s *PolicySet) lookupPrefix(addr netip.Addr) uint64 {
	addr = addr.WithZone("").Unmap()
	for b := addr.BitLen(); b >= 0 && addr.IsValid(); b-- {
		p, _ := addr.Prefix(b)
		if m, ok := s.PrefixMasks[p]; ok {
			return m
		}
	}
	return 0
}
