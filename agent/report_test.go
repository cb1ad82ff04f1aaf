package agent

import (
	"errors"
	"net/netip"
	"strings"
	"testing"

	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/istio"
)

// TestReportPodVerdicts: each answer of `meshsplice status` follows from
// the kernel's pod entry, the node switches and the pod's annotations, and
// says why. No kernel needed: the status is made up.
func TestReportPodVerdicts(t *testing.T) {
	ip := netip.MustParseAddr("10.0.0.7")
	injected := map[string]string{istio.AnnotationStatus: "{}"}
	with := func(kv ...string) map[string]string {
		m := map[string]string{istio.AnnotationStatus: "{}"}
		for i := 0; i+1 < len(kv); i += 2 {
			m[kv[i]] = kv[i+1]
		}
		return m
	}
	on := istio.Traffic{Capture: true, Splice: true, OutboundPort: 15001, InboundPort: 15006}
	ready, notReady := true, false
	type want struct{ state, reason string }
	for _, tc := range []struct {
		name     string
		traffic  istio.Traffic
		node     datapath.NodeSettings
		readers  string            // the reader programs attached: "splice-guard" or "splice-detect"
		ann      map[string]string // nil: the agent's state does not know the pod
		kernel   datapath.PodKernel
		captured want
		spliced  want
		inbound  want
		policy   want
	}{
		{name: "meshed", traffic: on, node: datapath.NodeSettings{Capture: true, Splice: true}, ann: injected,
			kernel:   datapath.PodKernel{ListenerReady: &ready, Policy: &datapath.PodPolicy{Enforced: true, PolicySet: 3}},
			captured: want{"yes", "15001"}, spliced: want{"yes", "sidecar <-> sidecar"}, inbound: want{"yes", "15006"}, policy: want{"yes", "policy set 3"}},
		{name: "node capture off", traffic: on, node: datapath.NodeSettings{Splice: true}, ann: injected,
			kernel:   datapath.PodKernel{ListenerReady: &ready, Policy: &datapath.PodPolicy{Reason: datapath.ReasonNoPolicy}},
			captured: want{"no", "node switch: capture is off"}, spliced: want{"no", "not captured"}, inbound: want{"n/a", "not captured"}, policy: want{"no", "no ALLOW or DENY policy"}},
		{name: "node splice off", traffic: on, node: datapath.NodeSettings{Capture: true}, ann: injected,
			kernel:   datapath.PodKernel{ListenerReady: &ready, Policy: &datapath.PodPolicy{Reason: datapath.ReasonNoPolicy}},
			captured: want{"yes", ""}, spliced: want{"no", "node switch: splice is off"}, inbound: want{"yes", ""}, policy: want{"no", ""}},
		{name: "app splice", traffic: istio.Traffic{Capture: true, Splice: true, AppSplice: true, InboundPort: 15006},
			node: datapath.NodeSettings{Capture: true, Splice: true}, ann: with(istio.AnnotationAppSplice, "true"),
			kernel:   datapath.PodKernel{ListenerReady: &ready, Policy: &datapath.PodPolicy{Reason: datapath.ReasonNoPolicy}},
			captured: want{"yes", ""}, spliced: want{"yes", ", and app <-> sidecar (pod annotation meshsplice.io/app-splice: true)"}, inbound: want{"yes", ""}, policy: want{"no", ""}},
		{name: "app splice by the node's default", traffic: istio.Traffic{Capture: true, Splice: true, AppSplice: true, InboundPort: 15006},
			node: datapath.NodeSettings{Capture: true, Splice: true}, readers: "splice-guard", ann: injected,
			kernel:   datapath.PodKernel{ListenerReady: &ready, Policy: &datapath.PodPolicy{Reason: datapath.ReasonNoPolicy}},
			captured: want{"yes", ""}, spliced: want{"yes", ", and app <-> sidecar (the node's default: splice(2) reads of spliced sockets are refused here"}, inbound: want{"yes", ""}, policy: want{"no", ""}},
		{name: "app splice off by the node switch", traffic: istio.Traffic{Capture: true, Splice: true, AppSplice: true, InboundPort: 15006},
			node: datapath.NodeSettings{Capture: true, Splice: true, AppSpliceOff: true}, ann: with(istio.AnnotationAppSplice, "true"),
			kernel:   datapath.PodKernel{ListenerReady: &ready, Policy: &datapath.PodPolicy{Reason: datapath.ReasonNoPolicy}},
			captured: want{"yes", ""}, spliced: want{"yes", "; app <-> sidecar stays TCP: node switch app-splice is off (agent --app-splice=false or the meshsplice ConfigMap), over pod annotation meshsplice.io/app-splice: true"}, inbound: want{"yes", ""}, policy: want{"no", ""}},
		{name: "app splice not the default here", traffic: on, node: datapath.NodeSettings{Capture: true, Splice: true}, readers: "splice-detect", ann: injected,
			kernel:   datapath.PodKernel{ListenerReady: &ready, Policy: &datapath.PodPolicy{Reason: datapath.ReasonNoPolicy}},
			captured: want{"yes", ""}, spliced: want{"yes", "; app <-> sidecar stays TCP: not the default on this node (splice(2) readers of spliced sockets: detected"}, inbound: want{"yes", ""}, policy: want{"no", ""}},
		{name: "app splice opted out", traffic: on, node: datapath.NodeSettings{Capture: true, Splice: true}, readers: "splice-guard", ann: with(istio.AnnotationAppSplice, "false"),
			kernel:   datapath.PodKernel{ListenerReady: &ready, Policy: &datapath.PodPolicy{Reason: datapath.ReasonNoPolicy}},
			captured: want{"yes", ""}, spliced: want{"yes", "; app <-> sidecar stays TCP (pod annotation meshsplice.io/app-splice: false)"}, inbound: want{"yes", ""}, policy: want{"no", ""}},
		{name: "not injected", node: datapath.NodeSettings{Capture: true, Splice: true}, ann: map[string]string{},
			kernel:   datapath.PodKernel{ListenerReady: &notReady, Policy: &datapath.PodPolicy{Reason: datapath.ReasonNoPolicy}},
			captured: want{"no", "not injected"}, spliced: want{"no", "not captured"}, inbound: want{"n/a", ""}, policy: want{"no", ""}},
		{name: "inject false", node: datapath.NodeSettings{Capture: true, Splice: true}, ann: with(istio.AnnotationInject, "false"),
			kernel:   datapath.PodKernel{Policy: &datapath.PodPolicy{Reason: datapath.ReasonNoPolicy}},
			captured: want{"no", "sidecar.istio.io/inject: false"}, spliced: want{"no", ""}, inbound: want{"n/a", ""}, policy: want{"no", ""}},
		{name: "interception NONE", node: datapath.NodeSettings{Capture: true, Splice: true}, ann: with(istio.AnnotationInterceptionMode, "NONE"),
			kernel:   datapath.PodKernel{Policy: &datapath.PodPolicy{Reason: datapath.ReasonNoPolicy}},
			captured: want{"no", "interceptionMode: NONE"}, spliced: want{"no", ""}, inbound: want{"n/a", ""}, policy: want{"no", ""}},
		{name: "capture annotation", node: datapath.NodeSettings{Capture: true, Splice: true}, ann: with(istio.AnnotationCapture, "disabled"),
			kernel:   datapath.PodKernel{Policy: &datapath.PodPolicy{Enforced: true, PolicySet: 2, Reason: datapath.ReasonCaptureOff}},
			captured: want{"no", "meshsplice.io/capture: disabled"}, spliced: want{"no", ""}, inbound: want{"n/a", ""}, policy: want{"yes", "capture is off"}},
		{name: "splice annotation", traffic: istio.Traffic{Capture: true, InboundPort: 15006}, node: datapath.NodeSettings{Capture: true, Splice: true},
			ann: with(istio.AnnotationSplice, "disabled"), kernel: datapath.PodKernel{ListenerReady: &ready, Policy: &datapath.PodPolicy{Reason: datapath.ReasonNoPolicy}},
			captured: want{"yes", ""}, spliced: want{"no", "meshsplice.io/splice: disabled"}, inbound: want{"yes", ""}, policy: want{"no", ""}},
		{name: "state unknown, listener missing", traffic: on, node: datapath.NodeSettings{Capture: true, Splice: true},
			kernel:   datapath.PodKernel{ListenerReady: &notReady, Policy: &datapath.PodPolicy{Reason: datapath.ReasonNoPolicy}},
			captured: want{"yes", ""}, spliced: want{"yes", ""}, inbound: want{"no", "not in the kernel's table"}, policy: want{"no", ""}},
		{name: "state unknown, capture off", node: datapath.NodeSettings{Capture: true, Splice: true},
			kernel:   datapath.PodKernel{Policy: &datapath.PodPolicy{Reason: datapath.ReasonNoPolicy}},
			captured: want{"no", "why is unknown"}, spliced: want{"no", ""}, inbound: want{"n/a", ""}, policy: want{"no", ""}},
		{name: "kernel tables unreadable", traffic: on, node: datapath.NodeSettings{Capture: true, Splice: true}, ann: injected,
			kernel:   datapath.PodKernel{ListenerErr: errTest, PolicyErr: errTest},
			captured: want{"yes", ""}, spliced: want{"yes", ""}, inbound: want{"unknown", "boom"}, policy: want{"unknown", "boom"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			kp := datapath.Pod{Cookie: 7, IPs: []netip.Addr{ip}, Traffic: tc.traffic}
			st := &datapath.Status{Node: tc.node, Pods: []datapath.Pod{kp}, PodKernel: map[uint64]datapath.PodKernel{7: tc.kernel}}
			if tc.readers != "" {
				st.Links = []datapath.LinkStatus{{Name: tc.readers, Attached: true}}
			}
			var reg *pod
			if tc.ann != nil {
				reg = &pod{Cookie: 7}
				reg.Reg.Annotations = tc.ann
			}
			r := reportPod(st, kp, reg, nil, "/cg")
			for _, c := range []struct {
				what string
				got  Verdict
				want want
			}{{"captured", r.Captured, tc.captured}, {"spliced", r.Spliced, tc.spliced},
				{"inbound ready", r.InboundReady, tc.inbound}, {"policy", r.PolicyEnforced, tc.policy}} {
				if c.got.State != c.want.state || c.got.Reason == "" || !strings.Contains(c.got.Reason, c.want.reason) {
					t.Errorf("%s: %s (%s), want %s (...%s...)", c.what, c.got.State, c.got.Reason, c.want.state, c.want.reason)
				}
			}
		})
	}
}

var errTest = errors.New("boom")
