package e2e

import (
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"

	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/internal/testnet"
)

// Sidecar inbound listeners (issue 10, item 16): whatever happens to the
// listen events, a sidecar that listens ends up in ms_listeners.

// TestReuseportListenerGroupStaysReachable: a sidecar with several
// SO_REUSEPORT listeners (one per worker) has one of them in its
// ms_listeners slot. When that one closes, the others still listen: the
// pod must become reachable again (the agent's periodic listener pass finds
// a listener missing from the map, registers it and counts it).
func TestReuseportListenerGroupStaysReachable(t *testing.T) {
	m, ag, _ := agentMesh(t)
	node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	server := m.addPod(node, "server", nil)
	client := m.addPod(node, "client", nil)
	lns, accepted := testListeners(t, server.NS, 15006, 3)
	ag.register(server, injected())
	slots := listenerSlots(t, m.pin)
	inSlot := slices.IndexFunc(lns, func(ln *net.TCPListener) bool { _, ok := slots[socketCookie(t, ln)]; return ok })
	if inSlot < 0 {
		t.Fatal("no listener of the group registered")
	}
	target := netip.AddrPortFrom(server.IPv4, appPort)
	if err := dialFrom(client.NS, target); err != nil {
		t.Fatalf("before: %v", err)
	}
	select {
	case <-accepted:
	case <-time.After(waitFor):
		t.Fatal("the connection was never accepted")
	}
	before, err := datapath.ReadPinnedCounters(m.pin)
	if err != nil {
		t.Fatal(err)
	}
	lns[inSlot].Close()
	waitLong(t, "the pod reachable through the rest of the group", func() bool { return dialFrom(client.NS, target) == nil })
	if w := <-accepted; w == inSlot {
		t.Fatal("accepted by the closed listener")
	}
	// Counted right after the listener is back in the map.
	eventually(t, "agent.listener_resynced counted", func() bool {
		after, err := datapath.ReadPinnedCounters(m.pin)
		return err == nil && after.Sub(before)["agent.listener_resynced"] == 1
	})
}

// fillListenerEvents fills the pinned ms_events ring buffer with events of
// no pod, as a burst of listens elsewhere would, so the next event is lost.
func fillListenerEvents(t *testing.T, pin string) {
	t.Helper()
	rb, err := ebpf.LoadPinnedMap(filepath.Join(pin, "maps", "ms_events"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer rb.Close()
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type: ebpf.SocketFilter, License: "GPL",
		Instructions: asm.Instructions{
			asm.LoadMapPtr(asm.R1, rb.FD()),
			asm.Mov.Imm(asm.R0, 0),
			asm.StoreMem(asm.RFP, -8, asm.R0, asm.DWord),
			asm.Mov.Reg(asm.R2, asm.RFP),
			asm.Add.Imm(asm.R2, -8),
			asm.Mov.Imm(asm.R3, 8),
			asm.Mov.Imm(asm.R4, 0),
			asm.FnRingbufOutput.Call(),
			asm.Mov.Imm(asm.R0, 0),
			asm.Return(),
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer prog.Close()
	if _, err := prog.Run(&ebpf.RunOptions{Data: make([]byte, 64), Repeat: 3 * 64 * 1024 / 16}); err != nil {
		t.Fatal(err)
	}
}

// TestListenerStartedWhileAgentDown: a sidecar starts listening while the
// agent is down. Its event waits in ms_events, or is lost when the ring
// buffer is full; either way the restarted agent registers the listener,
// and a lost event is counted.
func TestListenerStartedWhileAgentDown(t *testing.T) {
	for _, lose := range []bool{false, true} {
		t.Run(fmt.Sprintf("event_lost=%v", lose), func(t *testing.T) {
			m, ag, _ := agentMesh(t)
			node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
			server := m.addPod(node, "server", nil)
			client := m.addPod(node, "client", nil)
			ag.register(server, injected())
			ag.stop()
			if lose {
				fillListenerEvents(t, m.pin)
			}
			before, err := datapath.ReadPinnedCounters(m.pin)
			if err != nil {
				t.Fatal(err)
			}
			server.Sidecar = m.start(server, "server-sidecar", 1337, "sidecar")
			if _, err := server.Sidecar.WaitEvent(waitFor, "ready"); err != nil {
				t.Fatal(err)
			}
			after, err := datapath.ReadPinnedCounters(m.pin)
			if err != nil {
				t.Fatal(err)
			}
			d := after.Sub(before)
			var wantLost uint64
			if lose {
				wantLost = 1
			}
			if d["sockops.listener_event_lost"] != wantLost || d["sockops.listener_started"] != 1-wantLost {
				t.Fatalf("listen events: %v", nonZero(d))
			}
			ag.start()
			m.client(client, appUID, netip.AddrPortFrom(server.IPv4, appPort), "--messages", "5")
		})
	}
}
