package e2e

import (
	"net/netip"
	"testing"

	"github.com/meshsplice/meshsplice/datapath"
)

// TestAppSpliceNodeSwitch: the node switch app-splice: disabled (agent
// --app-splice=false or the meshsplice ConfigMap) keeps every new app
// socket out of the splice map, over the pods' meshsplice.io/app-splice:
// "true", while sidecar <-> sidecar goes on being spliced; a stream spliced
// app <-> sidecar before the switch finishes intact on its path; switching
// back splices new app sockets again.
func TestAppSpliceNodeSwitch(t *testing.T) {
	m, client, server := newSplicedPair(t)
	target := netip.AddrPortFrom(server.IPv4, appPort)
	before := m.counters()
	stream := m.startStream(client, target)
	if _, err := server.Sidecar.WaitEvent(waitFor, "upstream"); err != nil {
		t.Fatal(err)
	}
	// Three hops, both ends of each: six sockets.
	if d := m.counters().Sub(before); d["sockops.sock_inserted"] != 6 {
		t.Fatalf("app-splice pods, switch on: %v", nonZero(d))
	}
	for _, tc := range []struct {
		off      bool
		inserted uint64
	}{{true, 2}, {false, 6}} {
		if err := m.dp.SetNode(datapath.NodeSettings{Capture: true, Splice: true, AppSpliceOff: tc.off}); err != nil {
			t.Fatal(err)
		}
		st, err := datapath.Inspect(m.pin)
		if err != nil {
			t.Fatal(err)
		}
		if st.Node.AppSpliceOff != tc.off {
			t.Fatalf("status says app-splice off %v, want %v", st.Node.AppSpliceOff, tc.off)
		}
		before := m.counters()
		m.client(client, appUID, target, "--messages", "20")
		if d := m.counters().Sub(before); d["connect.captured"] != 1 || d["sockops.sock_inserted"] != tc.inserted {
			t.Fatalf("app-splice switch off=%v: want %d sockets spliced: %v", tc.off, tc.inserted, nonZero(d))
		}
	}
	finishedOK(t, stream, "stream spliced app <-> sidecar before the switch")
}
