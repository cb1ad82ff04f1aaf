package datapath

import (
	"net/netip"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/meshsplice/meshsplice/redirect"
)

func TestAddrKeyIsNetworkOrderV4Mapped(t *testing.T) {
	for _, tc := range []struct {
		ip   string
		want [16]byte
	}{
		{"10.1.2.3", [16]byte{10: 0xff, 11: 0xff, 12: 10, 13: 1, 14: 2, 15: 3}},
		{"::ffff:10.1.2.3", [16]byte{10: 0xff, 11: 0xff, 12: 10, 13: 1, 14: 2, 15: 3}},
		{"fd00::1", [16]byte{0: 0xfd, 15: 1}},
	} {
		t.Run(tc.ip, func(t *testing.T) {
			k := addrKey(netip.MustParseAddr(tc.ip))
			got := addrBytes(k)
			if got != tc.want {
				t.Fatalf("addrKey(%s) bytes = %x, want %x", tc.ip, got, tc.want)
			}
			if back := addrFromKey(k); back != netip.MustParseAddr(tc.ip).Unmap() {
				t.Fatalf("addrFromKey = %s", back)
			}
		})
	}
}

func addrBytes(a redirect.CaptureMsAddr) [16]byte {
	var b [16]byte
	for i, w := range a.Ip {
		// The same memory-order view the kernel has of the words.
		b[4*i], b[4*i+1], b[4*i+2], b[4*i+3] = byte(w), byte(w>>8), byte(w>>16), byte(w>>24)
	}
	return b
}

func TestRangeKeyPrefixLen(t *testing.T) {
	const fixed = 128 // kind, netns, family
	for _, tc := range []struct {
		prefix string
		bits   uint32
		family uint32
	}{
		{"10.0.0.0/8", fixed + 96 + 8, unix.AF_INET},
		{"0.0.0.0/0", fixed + 96, unix.AF_INET},
		{"10.1.2.3/32", fixed + 128, unix.AF_INET},
		{"fd00::/8", fixed + 8, unix.AF_INET6},
		{"::/0", fixed, unix.AF_INET6},
		{"::ffff:0:0/96", fixed + 96, unix.AF_INET6},
	} {
		t.Run(tc.prefix, func(t *testing.T) {
			p := netip.MustParsePrefix(tc.prefix)
			k := rangeKey(42, redirect.CaptureMsRangeKindMS_RANGE_OUT_EXCLUDE, p)
			if k.Prefixlen != tc.bits {
				t.Fatalf("prefixlen = %d, want %d", k.Prefixlen, tc.bits)
			}
			if k.Netns != 42 || k.Kind != redirect.CaptureMsRangeKindMS_RANGE_OUT_EXCLUDE || k.Family != tc.family {
				t.Fatalf("fixed part = %d/%d/%d", k.Netns, k.Kind, k.Family)
			}
			if back := prefixFromRangeKey(k); back != p {
				t.Fatalf("prefixFromRangeKey = %s, want %s", back, p)
			}
		})
	}
}

func TestEveryCounterHasAName(t *testing.T) {
	seen := map[string]bool{}
	for c := Counter(0); c < redirect.CaptureMsCounterMS_C_MAX; c++ {
		n := CounterName(c)
		if _, ok := counterInfo[c]; !ok {
			t.Errorf("counter %d has no name: add it to counterInfo", c)
		}
		if seen[n] {
			t.Errorf("counter name %s used twice", n)
		}
		seen[n] = true
	}
}
