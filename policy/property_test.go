package policy

import (
	"errors"
	"hash/fnv"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"
)

// TestVerdictMatchesReference holds the compiled masks of every golden case
// to the reference evaluator: for every destination workload, every known
// identity and the unknown source, the addresses at and around every
// prefix the policies name, and the ports they name (and their
// neighbours), plus random addresses and ports.
func TestVerdictMatchesReference(t *testing.T) {
	total := 0
	for _, c := range goldenCases {
		t.Run(c.name, func(t *testing.T) {
			in := caseInput(t, c)
			total += checkAgainstReference(t, in, seedOf(c.name), 20000)
		})
	}
	t.Logf("%d probes agree with the reference evaluator", total)
}

func seedOf(s string) uint64 {
	h := fnv.New64a()
	h.Write([]byte(s))
	return h.Sum64()
}

// checkAgainstReference compiles in and compares Verdict with the reference
// evaluator on probes: all combinations of the identity, address and port
// pools when there are at most budget of them per workload, else budget
// random ones. Workloads with too many atoms are skipped (the kernel allows
// everything for them, which is safe but not exact). It returns the number
// of probes.
func checkAgainstReference(tb testing.TB, in Input, seed uint64, budget int) int {
	tb.Helper()
	res, err := Compile(in, NewAllocator())
	if err != nil {
		tb.Fatalf("Compile: %v", err)
	}
	ref := newRefEvaluator(in)
	rng := rand.New(rand.NewPCG(seed, seed>>1|1))

	ids := append([]IdentityID{UnknownIdentity}, sortedIDs(res.Identities)...)
	addrs := addressPool(in, rng)
	ports := portPool(in, rng)

	checked := 0
	check := func(w Workload, id IdentityID, ip netip.Addr, port uint16) {
		checked++
		kernel, atom := true, -1
		if idx := res.WorkloadSet[w.Key()]; idx >= 0 {
			kernel, atom = res.Sets[idx].Verdict(id, ip, port)
		}
		want := ref.verdict(w, refRequest{spiffe: res.Identities[id], ip: ip, port: port})
		if kernel != want {
			tb.Errorf("to %s from %q at %s port %d: kernel allow=%v (atom %d, set %d), reference allow=%v",
				w.Key(), IdentityName(res.Identities[id]), ip, port, kernel, atom, res.WorkloadSet[w.Key()], want)
		}
	}
	for _, w := range in.Workloads {
		if errors.Is(res.Unenforced[w.Key()], ErrTooManyAtoms) {
			continue
		}
		// Sources as the kernel sees them: a workload address and its identity.
		for ip, id := range res.IPIdentity {
			for _, port := range ports {
				check(w, id, ip, port)
			}
		}
		if len(ids)*len(addrs)*len(ports) <= budget {
			for _, id := range ids {
				for _, ip := range addrs {
					for _, port := range ports {
						check(w, id, ip, port)
					}
				}
			}
			continue
		}
		for range budget {
			check(w, ids[rng.IntN(len(ids))], addrs[rng.IntN(len(addrs))], ports[rng.IntN(len(ports))])
		}
	}
	return checked
}

// addressPool is the workload addresses, addresses of no workload, the
// first and last address of every prefix the policies name and the ones
// just outside, and a few random addresses of each family.
func addressPool(in Input, rng *rand.Rand) []netip.Addr {
	set := map[netip.Addr]bool{}
	for _, w := range in.Workloads {
		for _, ip := range w.IPs {
			set[ip] = true
		}
	}
	for _, ip := range unknownSources {
		set[ip] = true
	}
	for _, v := range policyValues(in, func(key string) bool {
		return key == "ipBlocks" || key == "notIpBlocks" || key == "source.ip"
	}) {
		p, err := parseIPBlock(v)
		if err != nil {
			continue
		}
		first, last := p.Addr(), lastAddr(p)
		for _, a := range []netip.Addr{first, last, first.Prev(), last.Next()} {
			if a.IsValid() {
				set[a] = true
			}
		}
	}
	for range 4 {
		var b4 [4]byte
		var b16 [16]byte
		for i := range b4 {
			b4[i] = byte(rng.Uint32())
		}
		for i := range b16 {
			b16[i] = byte(rng.Uint32())
		}
		set[netip.AddrFrom4(b4)] = true
		set[netip.AddrFrom16(b16)] = true
	}
	out := make([]netip.Addr, 0, len(set))
	for a := range set {
		out = append(out, a)
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return out
}

func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Addr().AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

// portPool is the ports the policies name and their neighbours, the ends of
// the range, and a few random ports.
func portPool(in Input, rng *rand.Rand) []uint16 {
	set := map[uint16]bool{0: true, 65535: true, 8080: true}
	for _, v := range policyValues(in, func(key string) bool {
		return key == "ports" || key == "notPorts" || key == "destination.port"
	}) {
		if p, err := parsePort(v); err == nil {
			set[p], set[p-1], set[p+1] = true, true, true
		}
	}
	for _, pa := range in.PeerAuthentications {
		for port := range pa.Spec.GetPortLevelMtls() {
			if p := uint16(port); uint32(p) == port {
				set[p], set[p-1], set[p+1] = true, true, true
			}
		}
	}
	for range 3 {
		set[uint16(rng.Uint32())] = true
	}
	out := make([]uint16, 0, len(set))
	for p := range set {
		out = append(out, p)
	}
	slices.Sort(out)
	return out
}

// policyValues collects the values of the source fields, operation fields
// and when keys that want picks, from every policy.
func policyValues(in Input, want func(key string) bool) []string {
	var out []string
	add := func(key string, vs ...[]string) {
		if want(key) {
			for _, v := range vs {
				out = append(out, v...)
			}
		}
	}
	for _, p := range in.Policies {
		if p == nil {
			continue
		}
		for _, r := range p.Spec.GetRules() {
			for _, f := range r.GetFrom() {
				s := f.GetSource()
				add("ipBlocks", s.GetIpBlocks())
				add("notIpBlocks", s.GetNotIpBlocks())
			}
			for _, t := range r.GetTo() {
				o := t.GetOperation()
				add("ports", o.GetPorts())
				add("notPorts", o.GetNotPorts())
			}
			for _, c := range r.GetWhen() {
				add(strings.TrimSpace(c.GetKey()), c.GetValues(), c.GetNotValues())
			}
		}
	}
	return out
}
