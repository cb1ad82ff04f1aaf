package baseline_test

import (
	"testing"

	"github.com/meshsplice/meshsplice/baseline"
	"github.com/meshsplice/meshsplice/internal/testnet"
)

// TestPresent tells an empty namespace, a partial load (one of Istio's
// chains made by someone else) and a full Apply apart, per family.
func TestPresent(t *testing.T) {
	requireTools(t)
	for _, tc := range []struct {
		name              string
		setup             func(t *testing.T, ns *testnet.NetNS)
		ipv6              bool
		wantAll, wantSome bool
	}{
		{"empty", func(*testing.T, *testnet.NetNS) {}, true, false, false},
		{"one chain", func(t *testing.T, ns *testnet.NetNS) { ns.Run(t, "iptables-nft", "-t", "nat", "-N", "ISTIO_OUTPUT") }, false, false, true},
		{"applied", func(t *testing.T, ns *testnet.NetNS) { apply(t, ns, true) }, true, true, true},
		{"IPv4 applied, IPv6 asked", func(t *testing.T, ns *testnet.NetNS) { apply(t, ns, false) }, true, false, true},
		{"IPv4 applied, IPv4 asked", func(t *testing.T, ns *testnet.NetNS) { apply(t, ns, false) }, false, true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ns := testnet.NewNetNS(t, "present")
			tc.setup(t, ns)
			all, some, err := baseline.Present(ns.Path(), baseline.Options{IPv6: tc.ipv6})
			if err != nil {
				t.Fatal(err)
			}
			if all != tc.wantAll || some != tc.wantSome {
				t.Errorf("Present: all %v, some %v; want %v, %v", all, some, tc.wantAll, tc.wantSome)
			}
		})
	}
}
