package e2e

import (
	"net/netip"
	"testing"
	"time"

	"github.com/meshsplice/meshsplice/baseline"
	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/internal/testnet"
)

// TestHandoverToIstioIptables: the way back to Istio's own capture
// without restarting a pod that the meshsplice template injected (no
// istio-init, so no iptables rule of its own). Istio's sidecar rules
// (istio-iptables, what istio-init would have run) are loaded into the
// running pods' network namespaces while meshsplice still captures them:
// a new connection then passes each sidecar once (meshsplice redirects to
// 127.0.0.1, which the rules leave alone), with its original destination.
// Then meshsplice is uninstalled: new connections are captured by
// iptables alone.
//
// A connection live through the handover survives only if the pod's
// netns has net.netfilter.nf_conntrack_tcp_loose=0 before the rules are
// loaded. With the default (1) conntrack picks the established flow up
// mid-stream as a new one, and the nat PREROUTING rules redirect its next
// inbound packet to 15006, which answers with a reset.
func TestHandoverToIstioIptables(t *testing.T) {
	for _, tc := range []struct {
		name       string
		loose      string // nf_conntrack_tcp_loose in the pods' netns before the rules; "": left alone
		wantIntact bool
	}{
		{"conntrack default", "", false},
		{"nf_conntrack_tcp_loose=0", "0", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := newMesh(t)
			node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
			client := m.addPod(node, "client", injected())
			server := m.addPod(node, "server", injected())
			target := netip.AddrPortFrom(server.IPv4, appPort)
			stream := liveStream(t, m, client, server, target)
			connect := func(when string) { t.Helper(); oneHopEach(t, m, client, server, target, when) }
			connect("meshsplice alone")

			for _, p := range []*meshPod{client, server} {
				if tc.loose != "" {
					if _, err := (baseline.NsenterRunner{}).Run(p.NS.Path(), "", "sysctl", "-w", "net.netfilter.nf_conntrack_tcp_loose="+tc.loose); err != nil {
						t.Fatal(err)
					}
				}
				undo, err := baseline.Apply(p.NS.Path(), baseline.Options{IPv6: true})
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() {
					if err := undo(); err != nil {
						t.Errorf("remove the iptables rules of %s: %v", p.Name, err)
					}
				})
			}
			connect("meshsplice and Istio's iptables")

			m.dp.Close()
			if err := datapath.Detach(m.pin, 2*time.Second); err != nil {
				t.Fatal(err)
			}
			connect("Istio's iptables alone")

			// The stream: still flowing after the handover, or reset.
			if intact := streamIntact(t, stream); intact != tc.wantIntact {
				t.Errorf("the stream live through the handover: intact %v, want %v\n%s", intact, tc.wantIntact, stream.Tail())
			}
		})
	}
}
