package main

import (
	"context"
	"net"
	"net/http"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshsplice/meshsplice/agent/api"
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

// stubRegistry answers every registration with st or err, and keeps the
// last request.
type stubRegistry struct {
	st   api.PodStatus
	err  error
	last api.PodRegistration
}

func (s *stubRegistry) AddPod(_ context.Context, req api.PodRegistration) (api.PodStatus, error) {
	s.last = req
	return s.st, s.err
}
func (s *stubRegistry) CheckPod(context.Context, string) (api.PodStatus, error) {
	return api.PodStatus{}, api.ErrPodNotFound
}
func (s *stubRegistry) RemovePod(context.Context, string) error { return nil }

// TestHandoverSwitchMode: the switch re-registers the pod with
// meshsplice.io/capture "iptables" and its other annotations kept. An agent
// that keeps capturing (Kubernetes: annotations from the API server) gets
// the kubectl command printed, an unreachable one a note; both leave the
// two captures side by side and are no failure. A refusal is one.
func TestHandoverSwitchMode(t *testing.T) {
	reg := api.PodRegistration{ContainerID: "c1", Netns: "/run/netns/web-0", IfName: "eth0", IPs: []netip.Addr{netip.MustParseAddr("10.0.0.5")},
		PodName: "web-0", PodNamespace: "shop",
		Annotations: map[string]string{istio.AnnotationStatus: "{}"}}
	for _, tc := range []struct {
		name    string
		st      api.PodStatus
		err     error
		noAgent bool
		wantOut string
		wantErr string
	}{
		{name: "switched", st: api.PodStatus{Splice: true, Mode: istio.ModeIPTables}, wantOut: "shop/web-0: switched to iptables mode"},
		{name: "kubernetes", st: api.PodStatus{Capture: true, Splice: true, Mode: istio.ModeMeshsplice},
			wantOut: "kubectl annotate pod -n shop web-0 meshsplice.io/capture=iptables"},
		{name: "no agent", noAgent: true, wantOut: "shop/web-0: the agent does not answer"},
		{name: "refused", err: api.ErrNotReady, wantErr: "refused the switch"},
		{name: "other mode", st: api.PodStatus{Mode: istio.ModeOff}, wantErr: `mode "off"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sock := filepath.Join(t.TempDir(), "cni.sock")
			stub := &stubRegistry{st: tc.st, err: tc.err}
			if !tc.noAgent {
				ln, err := net.Listen("unix", sock)
				if err != nil {
					t.Fatal(err)
				}
				srv := &http.Server{Handler: api.NewHandler(stub, nil)}
				go srv.Serve(ln)
				t.Cleanup(func() { srv.Close() })
			}
			client := api.NewClient(sock, 5*time.Second)
			t.Cleanup(client.Close)
			var out strings.Builder
			h := handover{out: &out, client: client}
			err := h.switchMode(context.Background(), "shop/web-0", reg)
			switch {
			case tc.wantErr == "" && err != nil:
				t.Fatalf("switchMode: %v", err)
			case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
				t.Fatalf("switchMode: %v, want an error containing %q", err, tc.wantErr)
			}
			if !strings.Contains(out.String(), tc.wantOut) {
				t.Errorf("output %q lacks %q", out.String(), tc.wantOut)
			}
			if !tc.noAgent {
				if got := stub.last.Annotations; got[istio.AnnotationCapture] != "iptables" || got[istio.AnnotationStatus] != "{}" {
					t.Errorf("re-registered with annotations %v", got)
				}
			}
			if _, ok := reg.Annotations[istio.AnnotationCapture]; ok {
				t.Errorf("switchMode changed the caller's annotations")
			}
		})
	}
}
