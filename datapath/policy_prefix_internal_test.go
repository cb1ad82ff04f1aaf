package datapath

import (
	"net/netip"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/meshsplice/meshsplice/redirect"
)

// Prefixes of both families and the v4-mapped IPv6 ones that sit where the
// kernel keeps IPv4 (::ffff:0:0/96): Envoy never matches an IPv4 source
// with an IPv6 CIDR, so neither may the kernel.
var familyPrefixes = map[string]uint64{
	"0.0.0.0/0":           1 << 0,
	"::/0":                1 << 1,
	"::/80":               1 << 2,
	"::ffff:0:0/96":       1 << 3,
	"::ffff:10.0.0.0/104": 1 << 4,
	"::ffff:10.1.2.3/128": 1 << 5,
	"10.0.0.0/8":          1 << 6,
	"fd00::/8":            1 << 7,
}

// TestPolPrefixKeysKeepFamilies: no two prefixes of different families
// share an LPM key.
func TestPolPrefixKeysKeepFamilies(t *testing.T) {
	seen := map[redirect.CaptureMsPolPrefixKey]string{}
	for s := range familyPrefixes {
		k := polPrefixKey(7, netip.MustParsePrefix(s))
		if other, ok := seen[k]; ok {
			t.Errorf("%s and %s have one kernel key %+v", s, other, k)
		}
		seen[k] = s
	}
	var k redirect.CaptureMsPolPrefixKey
	if fixed := 8 * (unsafe.Offsetof(k.Ip) - unsafe.Offsetof(k.Set)); polPrefixFixedBits != fixed {
		t.Errorf("polPrefixFixedBits = %d, the key's fixed part is %d bits", polPrefixFixedBits, fixed)
	}
	for s, want := range map[string]struct{ bits, family uint32 }{
		"0.0.0.0/0":     {polPrefixFixedBits + 96, unix.AF_INET},
		"10.0.0.0/8":    {polPrefixFixedBits + 104, unix.AF_INET},
		"::/0":          {polPrefixFixedBits, unix.AF_INET6},
		"::ffff:0:0/96": {polPrefixFixedBits + 96, unix.AF_INET6},
	} {
		if k := polPrefixKey(7, netip.MustParsePrefix(s)); k.Prefixlen != want.bits || k.Family != want.family || k.Set != 7 {
			t.Errorf("%s: key %+v, want prefixlen %d, family %d", s, k, want.bits, want.family)
		}
	}
}

// TestPolicyPrefixLookupKeepsFamilies writes a set into the kernel's trie
// and looks sources up there as policy_denies does: each source gets the
// mask of its longest match in its own family (policy.PolicySet.Verdict's
// model), never an IPv6 prefix's for an IPv4 source.
func TestPolicyPrefixLookupKeepsFamilies(t *testing.T) {
	d := openTestDatapath(t)
	s := portSet(80)
	s.PrefixMasks = map[netip.Prefix]uint64{}
	for p, m := range familyPrefixes {
		s.PrefixMasks[netip.MustParsePrefix(p)] = m
	}
	dst := netip.MustParseAddr("10.9.9.9")
	if err := d.SetPolicy(Policy{Sets: []PolicySet{s}, IPs: map[netip.Addr]IPPolicy{dst: {Identity: 1, Set: 0}}}); err != nil {
		t.Fatal(err)
	}
	var info redirect.CaptureMsIpInfo
	if k := addrKey(dst); d.capture.MsIpInfo.Lookup(&k, &info) != nil || info.PolicySet == 0 {
		t.Fatalf("no policy set for %s: %+v", dst, info)
	}
	for _, tc := range []struct {
		src  string
		want string // the prefix whose mask the source gets
	}{
		{"10.1.2.3", "10.0.0.0/8"},
		{"10.200.0.1", "10.0.0.0/8"},
		{"192.0.2.1", "0.0.0.0/0"},
		{"fd00::1", "fd00::/8"},
		{"2001:db8::1", "::/0"},
		{"::1", "::/80"},
		{"::1:0:1", "::/80"},
	} {
		t.Run(tc.src, func(t *testing.T) {
			src := netip.MustParseAddr(tc.src)
			k := polPrefixKey(info.PolicySet, netip.PrefixFrom(src, src.BitLen()))
			var got uint64
			if err := d.capture.MsPolPrefixes.Lookup(&k, &got); err != nil {
				t.Fatalf("lookup: %v", err)
			}
			if want := familyPrefixes[tc.want]; got != want {
				t.Fatalf("mask %#x, want %#x (%s)", got, want, tc.want)
			}
		})
	}
}
