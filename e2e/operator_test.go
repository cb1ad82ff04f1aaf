package e2e

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/internal/testnet"
)

// agentMesh is a mesh whose pods the agent process registers (no
// in-process datapath): a test cgroup, a pin directory and the agent,
// whose Istio config folder it returns.
func agentMesh(t *testing.T) (*mesh, *agentProc, string) {
	t.Helper()
	testnet.RequireRoot(t)
	m := &mesh{t: t, bin: mstest(t)}
	m.cg = testnet.NewCgroup(t)
	m.pin = testnet.PinDir(t, func(dir string) error { return datapath.Detach(dir, time.Second) })
	configDir := t.TempDir()
	if err := os.WriteFile(filepath.Join(configDir, "mesh.yaml"), []byte("trustDomain: demo.local\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	return m, startAgent(t, m, configDir), configDir
}

// hasPassthroughV6 tells whether ::6/128 is on the lo of the pod.
func hasPassthroughV6(t *testing.T, p *meshPod) bool {
	t.Helper()
	h := p.NS.Netlink(t)
	lo, err := h.LinkByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	addrs, err := h.AddrList(lo, netlink.FAMILY_V6)
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range addrs {
		if a.IP.Equal(net.ParseIP("::6")) {
			return true
		}
	}
	return false
}

// TestDelRemovesWhatAddAdded: ADD puts ::6/128 on a captured pod's lo (as
// istio-iptables does); DEL takes it away again, but only if ADD added it.
func TestDelRemovesWhatAddAdded(t *testing.T) {
	m, ag, _ := agentMesh(t)
	node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	for _, tc := range []struct {
		name      string
		hadBefore bool
	}{
		{"added by ADD", false},
		{"there before ADD", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := m.addPod(node, "lo6-"+map[bool]string{false: "a", true: "b"}[tc.hadBefore], nil)
			if tc.hadBefore {
				p.NS.Run(t, "ip", "addr", "add", "::6/128", "dev", "lo", "nodad")
			}
			ag.register(p, injected())
			if !hasPassthroughV6(t, p) {
				t.Fatal("::6 not on lo after ADD")
			}
			if err := ag.client.RemovePod(context.Background(), "c-"+p.Name); err != nil {
				t.Fatal(err)
			}
			if got := hasPassthroughV6(t, p); got != tc.hadBefore {
				t.Fatalf("::6 on lo after DEL: %v, want %v", got, tc.hadBefore)
			}
		})
	}
}
