package baseline

import (
	_ "embed"
	"fmt"
	"slices"
	"strings"
	"sync"
)

// IstioVersion is the version of the istio.io/istio module whose
// istio-iptables generated the embedded rules. Keep in sync with
// tools/istio/go.mod and the golden files' headers (a unit test checks).
const IstioVersion = "v0.0.0-20260827124520-eed52ebb66ad"

// Family is an IP family: which of iptables and ip6tables a rule set is for.
type Family int

const (
	// IPv4 is iptables.
	IPv4 Family = iota + 1
	// IPv6 is ip6tables.
	IPv6
)

// families lists the supported families.
var families = []Family{IPv4, IPv6}

// String returns "IPv4" or "IPv6".
func (f Family) String() string {
	switch f {
	case IPv4:
		return "IPv4"
	case IPv6:
		return "IPv6"
	}
	return fmt.Sprintf("Family(%d)", int(f))
}

var (
	//go:embed testdata/istio-sidecar-v4.golden
	rulesV4 string
	//go:embed testdata/istio-sidecar-v6.golden
	rulesV6 string
)

// Rules returns Istio's sidecar rules for family f as iptables-restore input,
// exactly as istio-iptables generates them, headed by a comment line naming
// the Istio version and the istio-iptables command line. It returns "" for an
// unknown family.
func Rules(f Family) string {
	switch f {
	case IPv4:
		return rulesV4
	case IPv6:
		return rulesV6
	}
	return ""
}

// ruleSet is a parsed iptables-restore input, as istio-iptables writes it:
// per table, chain creations (-N) and appended rules (-A), nothing else.
type ruleSet struct {
	tables []*table
}

type table struct {
	name string
	// chains are the chains the input creates, in order.
	chains []string
	// rules are the appended rules, in order.
	rules []rule
}

type rule struct {
	chain string
	spec  string // the rule without "-A CHAIN "
}

// parseRules parses iptables-restore input limited to what istio-iptables
// generates: comments, "*table", "-N chain", "-A chain spec" and "COMMIT".
// Anything else is an error, so that a regenerated file using more of the
// format is noticed instead of being cleaned up incompletely.
func parseRules(data string) (*ruleSet, error) {
	rs := &ruleSet{}
	var cur *table
	for i, line := range strings.Split(data, "\n") {
		line = strings.TrimSpace(line)
		switch {
		case line == "" || strings.HasPrefix(line, "#"):
		case strings.HasPrefix(line, "*"):
			if cur != nil {
				return nil, fmt.Errorf("line %d: table %q starts before COMMIT of %q", i+1, line, cur.name)
			}
			name := strings.TrimSpace(line[1:])
			if name == "" || strings.ContainsAny(name, " \t") {
				return nil, fmt.Errorf("line %d: bad table line %q", i+1, line)
			}
			cur = &table{name: name}
		case line == "COMMIT":
			if cur == nil {
				return nil, fmt.Errorf("line %d: COMMIT outside a table", i+1)
			}
			rs.tables = append(rs.tables, cur)
			cur = nil
		case cur == nil:
			return nil, fmt.Errorf("line %d: %q outside a table", i+1, line)
		default:
			fields := strings.Fields(line)
			switch {
			case fields[0] == "-N" && len(fields) == 2:
				if slices.Contains(cur.chains, fields[1]) {
					return nil, fmt.Errorf("line %d: chain %s created twice", i+1, fields[1])
				}
				cur.chains = append(cur.chains, fields[1])
			case fields[0] == "-A" && len(fields) >= 3:
				spec := strings.TrimSpace(strings.TrimPrefix(strings.TrimPrefix(line, "-A"), " "+fields[1]))
				cur.rules = append(cur.rules, rule{chain: fields[1], spec: spec})
			default:
				return nil, fmt.Errorf("line %d: unsupported command %q", i+1, line)
			}
		}
	}
	if cur != nil {
		return nil, fmt.Errorf("table %s has no COMMIT", cur.name)
	}
	if len(rs.tables) == 0 {
		return nil, fmt.Errorf("no tables")
	}
	return rs, nil
}

// parsedRules parses the embedded rules of each family once.
var parsedRules = sync.OnceValues(func() (map[Family]*ruleSet, error) {
	m := map[Family]*ruleSet{}
	for _, f := range families {
		rs, err := parseRules(Rules(f))
		if err != nil {
			return nil, fmt.Errorf("embedded %s rules: %w", f, err)
		}
		m[f] = rs
	}
	return m, nil
})

// count returns the number of appended rules.
func (rs *ruleSet) count() int {
	n := 0
	for _, t := range rs.tables {
		n += len(t.rules)
	}
	return n
}

// builtinChains returns the chains of t that rules are appended to but that
// the input does not create: the built-in chains (PREROUTING, OUTPUT, ...).
func (t *table) builtinChains() []string {
	var out []string
	for _, r := range t.rules {
		if !slices.Contains(t.chains, r.chain) && !slices.Contains(out, r.chain) {
			out = append(out, r.chain)
		}
	}
	return out
}

// cleanupInput returns iptables-restore --noflush input that removes exactly
// what rs adds: it deletes the rules appended to built-in chains (the jumps
// into Istio's chains), then flushes and deletes the chains rs creates. The
// restore is one transaction: it removes all of it or nothing.
func (rs *ruleSet) cleanupInput() string {
	var b strings.Builder
	for _, t := range rs.tables {
		fmt.Fprintf(&b, "*%s\n", t.name)
		for _, r := range slices.Backward(t.rules) {
			if !slices.Contains(t.chains, r.chain) {
				fmt.Fprintf(&b, "-D %s %s\n", r.chain, r.spec)
			}
		}
		for _, c := range t.chains {
			fmt.Fprintf(&b, "-F %s\n", c)
		}
		for _, c := range t.chains {
			fmt.Fprintf(&b, "-X %s\n", c)
		}
		b.WriteString("COMMIT\n")
	}
	return b.String()
}
