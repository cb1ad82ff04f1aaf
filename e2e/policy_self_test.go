package e2e

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/internal/testnet"
)

// TestOwnPodIPNeverJudgedByItsPolicy: a pod calling its own pod IP leaves
// through lo and istio-iptables RETURNs it, so its sidecar never sees it
// and never authorizes it: the kernel must not judge it with the pod's
// inbound policy either, at connect (egress_judged), at sk_lookup (the
// SYN sockops marked in ms_self_syn) or at teardown. A SYN that merely
// claims such a source from eth0 (::6, or the pod's own IPv6 address) is
// an ordinary inbound connection, and policy judges it.
func TestOwnPodIPNeverJudgedByItsPolicy(t *testing.T) {
	m := newMesh(t)
	node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	self := m.addPod(node, "self", injected())
	spoofer := m.addPod(node, "spoofer", nil)
	const idSelf = 7
	if err := m.dp.AddPod(datapath.Pod{NetnsPath: self.NS.Path(), Cookie: self.Cookie,
		IPs: []netip.Addr{self.IPv4, self.IPv6}, Traffic: self.Traffic, Identity: idSelf}); err != nil {
		t.Fatal(err)
	}
	// self allows no one, itself included: were its own calls judged,
	// they would be denied.
	pol := datapath.Policy{
		Sets: []datapath.PolicySet{allowFrom("shop/self-allow-nobody")},
		IPs: map[netip.Addr]datapath.IPPolicy{
			self.IPv4: {Identity: idSelf, Set: 0},
			self.IPv6: {Identity: idSelf, Set: 0},
		},
	}
	if err := m.dp.SetPolicy(pol); err != nil {
		t.Fatal(err)
	}

	for _, ip := range []netip.Addr{self.IPv4, self.IPv6} {
		t.Run("app calls its own "+ip.String(), func(t *testing.T) {
			before := m.counters()
			if got := m.tryConnect(self, appUID, netip.AddrPortFrom(ip, appPort)); got != "" {
				t.Fatalf("denied: %s (%v)", got, nonZero(m.counters().Sub(before)))
			}
			d := m.counters().Sub(before)
			if d["policy.egress_denied"] != 0 || d["policy.ingress_denied"] != 0 || d["sk_lookup.skip_self"] != 1 {
				t.Fatalf("counters: %v", nonZero(d))
			}
		})
	}

	t.Run("a live call to itself survives teardown", func(t *testing.T) {
		seen := len(acceptsOf(self.App))
		stream := m.start(self, "self-stream", appUID, "client", "--target", netip.AddrPortFrom(self.IPv4, appPort).String(),
			"--messages", "100000", "--size", "100", "--interval", "1ms", "--timeout", "5s")
		waitAccepts(t, self.App, "", seen+1)
		if err := m.dp.SetPolicy(pol); err != nil {
			t.Fatal(err)
		}
		n, err := m.dp.TeardownForbidden()
		if err != nil {
			t.Fatal(err)
		}
		if n != 0 || stream.ExitCode() != -1 {
			res, _ := stream.WaitEvent(time.Second, "result")
			t.Fatalf("teardown closed %d sockets; the pod's call to itself: %v", n, res)
		}
	})

	// SYNs from eth0 that claim the pod's own sources.
	for _, tc := range []struct {
		name string
		src  netip.Addr
		bind string // the client's source address
		prep func(t *testing.T)
	}{
		{"::6 on the spoofer's eth0", netip.MustParseAddr("::6"), "::6", func(t *testing.T) {
			spoofer.NS.Run(t, "ip", "-6", "addr", "add", "::6/128", "dev", "eth0", "nodad")
		}},
		// The pod's own address, by SNAT on the way out: the pod's
		// answer goes to itself, so the spoofer's connect fails either
		// way; the kernel's counters and denial log say why.
		{"the pod's own IPv6 by SNAT", self.IPv6, spoofer.IPv6.String(), func(t *testing.T) {
			spoofer.NS.Run(t, "ip6tables", "-t", "nat", "-A", "POSTROUTING", "-o", "eth0", "-p", "tcp",
				"-d", self.IPv6.String(), "-j", "SNAT", "--to-source", self.IPv6.String())
		}},
	} {
		t.Run("spoofed "+tc.name, func(t *testing.T) {
			tc.prep(t)
			before := m.counters()
			c := m.start(spoofer, "spoofer-probe", appUID, "client", "--target", netip.AddrPortFrom(self.IPv6, appPort).String(),
				"--messages", "1", "--timeout", "3s", "--source", tc.bind)
			c.WaitTimeout(20 * time.Second)
			res, err := c.WaitEvent(time.Second, "result")
			if err != nil {
				t.Fatal(err)
			}
			got := fmt.Sprint(res["errors"])
			if res.Bool("ok") {
				got = ""
			}
			d := m.counters().Sub(before)
			if got == "" || d["policy.ingress_denied"] == 0 || d["sk_lookup.skip_self"] != 0 || d["sk_lookup.skip_passthrough_source"] != 0 {
				t.Fatalf("connect: %q; counters: %v", got, nonZero(d))
			}
			st, err := datapath.Inspect(m.pin)
			if err != nil {
				t.Fatal(err)
			}
			for _, dn := range st.RecentDenials {
				if dn.Direction == "ingress" && dn.Src == tc.src && dn.Dst == self.IPv6 {
					return
				}
			}
			t.Fatalf("no ingress denial from %s: %+v", tc.src, st.RecentDenials)
		})
	}
}
