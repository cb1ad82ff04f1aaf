package agent

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/istio"
)

// TestReportPodModes: `meshsplice status` says which pods meshsplice
// captures, which Istio's own iptables capture (spliced by meshsplice
// only), and which neither, from the kernel's pod entry.
func TestReportPodModes(t *testing.T) {
	ready := true
	ipt := istio.Traffic{IPTables: true, Sidecar: true, Splice: true, InboundPort: 15006}
	for _, tc := range []struct {
		name             string
		traffic          istio.Traffic
		node             datapath.NodeSettings
		mode             string
		captured, splice string // state, then a part of the reason
		spliceWhy        string
	}{
		{name: "meshsplice", traffic: istio.Traffic{Capture: true, Splice: true, Sidecar: true, InboundPort: 15006},
			node: datapath.NodeSettings{Capture: true, Splice: true}, mode: istio.ModeMeshsplice, captured: "yes", splice: "yes"},
		{name: "iptables", traffic: ipt, node: datapath.NodeSettings{Capture: true, Splice: true},
			mode: istio.ModeIPTables, captured: "no", splice: "yes", spliceWhy: "through Istio's REDIRECT"},
		{name: "iptables, node capture off", traffic: ipt, node: datapath.NodeSettings{Splice: true},
			mode: istio.ModeIPTables, captured: "no", splice: "yes", spliceWhy: "through Istio's REDIRECT"},
		{name: "iptables, node splice off", traffic: ipt, node: datapath.NodeSettings{Capture: true},
			mode: istio.ModeIPTables, captured: "no", splice: "no", spliceWhy: "node switch"},
		{name: "iptables, splice off", traffic: istio.Traffic{IPTables: true, Sidecar: true}, node: datapath.NodeSettings{Capture: true, Splice: true},
			mode: istio.ModeIPTables, captured: "no", splice: "no", spliceWhy: "splice off"},
		{name: "off", traffic: istio.Traffic{Sidecar: true}, node: datapath.NodeSettings{Capture: true, Splice: true},
			mode: istio.ModeOff, captured: "no", splice: "no", spliceWhy: "not captured"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			kp := datapath.Pod{Cookie: 7, IPs: []netip.Addr{netip.MustParseAddr("10.0.0.7")}, Traffic: tc.traffic}
			st := &datapath.Status{Node: tc.node, Pods: []datapath.Pod{kp},
				PodKernel: map[uint64]datapath.PodKernel{7: {ListenerReady: &ready}}}
			r := reportPod(st, kp, nil, nil, "/cg")
			if r.Mode != tc.mode {
				t.Errorf("mode %q, want %q", r.Mode, tc.mode)
			}
			if r.Captured.State != tc.captured || r.Spliced.State != tc.splice || !strings.Contains(r.Spliced.Reason, tc.spliceWhy) {
				t.Errorf("captured %v, spliced %v; want %s, %s (...%s...)", r.Captured, r.Spliced, tc.captured, tc.splice, tc.spliceWhy)
			}
			if tc.mode == istio.ModeIPTables && (!strings.Contains(r.Captured.Reason, "Istio's own iptables") || r.InboundReady.State != "n/a") {
				t.Errorf("iptables pod: captured %v, inbound %v", r.Captured, r.InboundReady)
			}
		})
	}
}
