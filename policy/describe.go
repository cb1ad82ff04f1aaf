package policy

import (
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
)

// maxListed bounds the identities an IdentityDesc names.
const maxListed = 8

// IdentityName is how descriptions name an identity: the principal as
// policies write it (no "spiffe://"), or "unknown" for UnknownIdentity.
func IdentityName(spiffe string) string {
	if spiffe == "" {
		return "unknown"
	}
	return strings.TrimPrefix(spiffe, spiffePrefix)
}

func (c *compiler) describeIdentities(set []IdentityID, preds []idPred) string {
	var resolved string
	var members, others []string
	unknownIn := false
	// set and the universe are both sorted by number.
	j := 0
	for _, u := range c.universe {
		if j < len(set) && set[j] == u.id {
			j++
			members = append(members, IdentityName(u.spiffe))
			unknownIn = unknownIn || u.id == UnknownIdentity
		} else {
			others = append(others, IdentityName(u.spiffe))
		}
	}
	switch {
	case len(others) == 0:
		resolved = "any source"
	case len(others) == 1 && !unknownIn:
		resolved = "any known identity"
	case len(others) < len(members):
		resolved = "any source but " + list(others)
	default:
		resolved = list(members)
	}
	if len(preds) == 0 {
		return resolved
	}
	conds := make([]string, len(preds))
	for i, p := range preds {
		conds[i] = p.desc
	}
	return resolved + " (" + strings.Join(conds, " and ") + ")"
}

func list(names []string) string {
	if len(names) > maxListed {
		return "{" + strings.Join(names[:maxListed], ", ") + fmt.Sprintf(", and %d more}", len(names)-maxListed)
	}
	return "{" + strings.Join(names, ", ") + "}"
}

func describeIPs(in, not []netip.Prefix) string {
	s := "any"
	if in != nil {
		s = joinPrefixes(in)
	}
	if len(not) > 0 {
		s += " but not " + joinPrefixes(not)
	}
	return s
}

func joinPrefixes(ps []netip.Prefix) string {
	parts := make([]string, len(ps))
	for i, p := range ps {
		parts[i] = p.String()
	}
	return strings.Join(parts, ", ")
}

func describePorts(m PortMatch, ports []uint16) string {
	parts := make([]string, len(ports))
	for i, p := range ports {
		parts[i] = strconv.Itoa(int(p))
	}
	switch m {
	case InPorts:
		return strings.Join(parts, ", ")
	case NotInPorts:
		return "any but " + strings.Join(parts, ", ")
	}
	return "any"
}

// String is a one-line summary of the atom.
func (a Atom) String() string {
	return fmt.Sprintf("%s %s rule %d source %d operation %d: from %s, address %s, port %s",
		a.Action, a.Policy, a.Rule, a.Source, a.Operation, a.IdentityDesc, a.IPDesc, a.PortDesc)
}

// sortedPrefixes returns the keys of m, shortest first then by address.
func sortedPrefixes(m map[netip.Prefix]uint64) []netip.Prefix {
	out := make([]netip.Prefix, 0, len(m))
	for p := range m {
		out = append(out, p)
	}
	slices.SortFunc(out, func(a, b netip.Prefix) int {
		if a.Addr().Is4() != b.Addr().Is4() {
			if a.Addr().Is4() {
				return -1
			}
			return 1
		}
		return comparePrefix(a, b)
	})
	return out
}
