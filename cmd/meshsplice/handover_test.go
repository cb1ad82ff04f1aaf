package main

import (
	"strings"
	"testing"

	"github.com/meshsplice/meshsplice/istio"
)

// TestHandoverDefaultRules: only pods whose Istio rules are the embedded
// ones (Istio's defaults) are handed over; any other setting, or a kernel
// that captures with other defaults, is refused with the reason.
func TestHandoverDefaultRules(t *testing.T) {
	status := `{"containers":["istio-proxy"]}`
	kernel := istio.Traffic{Capture: true, Sidecar: true, ProxyUID: 1337, ProxyGID: 1337, OutboundPort: 15001, InboundPort: 15006,
		IncludeAllOutbound: true, IncludeAllInbound: true}
	otherUID := kernel
	otherUID.ProxyUID, otherUID.ProxyGID = 1000, 1000
	for _, tc := range []struct {
		name    string
		ann     map[string]string
		kernel  istio.Traffic
		wantErr string // "": handed over
	}{
		{"template defaults", map[string]string{istio.AnnotationStatus: status}, kernel, ""},
		// What manifests/istio-overlay.yaml writes on a pod with Istio's values.
		{"meshsplice template", map[string]string{istio.AnnotationStatus: status, istio.AnnotationInterceptionMode: "REDIRECT",
			"traffic.sidecar.istio.io/includeOutboundIPRanges": "*", "traffic.sidecar.istio.io/includeInboundPorts": "*",
			"traffic.sidecar.istio.io/excludeInboundPorts": "15020", istio.AnnotationProxyUID: "1337"}, kernel, ""},
		{"excluded inbound ports the rules exclude anyway", map[string]string{istio.AnnotationStatus: status, "traffic.sidecar.istio.io/excludeInboundPorts": "15090,15021"}, kernel, ""},
		{"excluded inbound port", map[string]string{istio.AnnotationStatus: status, "traffic.sidecar.istio.io/excludeInboundPorts": "9090"}, kernel, "excluded inbound ports [9090], not []"},
		{"capture switch ignored", map[string]string{istio.AnnotationStatus: status, istio.AnnotationCapture: "enabled"}, kernel, ""},
		{"excluded outbound port", map[string]string{istio.AnnotationStatus: status, "traffic.sidecar.istio.io/excludeOutboundPorts": "9999"}, kernel, "differ from Istio's defaults"},
		{"included inbound ports", map[string]string{istio.AnnotationStatus: status, "traffic.sidecar.istio.io/includeInboundPorts": "8080"}, kernel, "differ from Istio's defaults"},
		{"proxy uid", map[string]string{istio.AnnotationStatus: status, istio.AnnotationProxyUID: "1000"}, kernel, "differ from Istio's defaults"},
		{"TPROXY", map[string]string{istio.AnnotationStatus: status, istio.AnnotationInterceptionMode: "TPROXY"}, kernel, "admit no iptables mode"},
		{"bad annotation", map[string]string{istio.AnnotationStatus: status, "traffic.sidecar.istio.io/excludeOutboundPorts": "x"}, kernel, "its annotations"},
		{"agent defaults differ", map[string]string{istio.AnnotationStatus: status}, otherUID, "the agent's mesh defaults differ"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := defaultRules(tc.ann, tc.kernel)
			switch {
			case tc.wantErr == "" && err != nil:
				t.Errorf("refused: %v", err)
			case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
				t.Errorf("error %v, want one containing %q", err, tc.wantErr)
			}
		})
	}
}
