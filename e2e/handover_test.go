package e2e

import (
	"net/netip"
	"syscall"
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
			stream := m.start(client, "client-stream", appUID, "client", "--target", target.String(),
				"--pipelined", "--until-signal", "--messages", "100000000", "--size", "500", "--interval", "5ms", "--timeout", "30s")
			waitAccepts(t, server.Sidecar, "inbound", 1)

			// connect makes one new connection and checks that it passed
			// each sidecar exactly once, with target as its original
			// destination (a second capture of either hop would have
			// happened, and been printed, before the echo came back).
			connect := func(when string) {
				t.Helper()
				out, in := len(acceptEvents(client.Sidecar, "outbound")), len(acceptEvents(server.Sidecar, "inbound"))
				m.client(client, appUID, target, "--messages", "3")
				gotOut := waitAccepts(t, client.Sidecar, "outbound", out+1)
				gotIn := waitAccepts(t, server.Sidecar, "inbound", in+1)
				if len(gotOut) != out+1 || len(gotIn) != in+1 {
					t.Fatalf("%s: the sidecars accepted %d outbound and %d inbound connections, want 1 each", when, len(gotOut)-out, len(gotIn)-in)
				}
				if got := origDst(gotOut[out].Str("orig_dst")); got != target {
					t.Errorf("%s: outbound SO_ORIGINAL_DST %s, want %s", when, got, target)
				}
				if got := origDst(gotIn[in].Str("orig_dst")); got != target {
					t.Errorf("%s: inbound SO_ORIGINAL_DST %s, want %s", when, got, target)
				}
			}
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
			seq := int64(0)
			// progress is what the stream verified so far; nil once it
			// ended (a failed connection ends it).
			progress := func() testnet.Event {
				t.Helper()
				seq++
				want := seq
				if stream.Signal(syscall.SIGUSR2) != nil {
					return nil
				}
				ev, err := stream.WaitEvent(waitFor, "progress", func(ev testnet.Event) bool { return ev.Int("seq") == want })
				if err != nil {
					return nil
				}
				return ev
			}
			if before := progress(); before != nil {
				waitUntil(t, "the stream moved on or failed", 30*time.Second, func() bool {
					p := progress()
					return p == nil || p.Int("failed") > 0 || p.Int("messages") >= before.Int("messages")+20
				})
			}
			stream.Signal(syscall.SIGUSR1)
			if err := stream.WaitTimeout(60 * time.Second); err != nil && tc.wantIntact {
				t.Fatalf("the stream live through the handover: %v\n%s", err, stream.Tail())
			}
			sum, _ := stream.WaitEvent(time.Second, "summary")
			if intact := sum.Bool("ok"); intact != tc.wantIntact {
				t.Errorf("the stream live through the handover: intact %v, want %v\n%s", intact, tc.wantIntact, stream.Tail())
			}
		})
	}
}
