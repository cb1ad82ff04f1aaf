package e2e

import (
	"context"
	"encoding/json"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/meshsplice/meshsplice/agent/api"
	"github.com/meshsplice/meshsplice/internal/testnet"
	"github.com/meshsplice/meshsplice/istio"
)

// verdict and podReport are what `meshsplice status --json` prints per pod
// (decoded here on their own, so this test reads the output as a user's
// script would).
type verdict struct{ State, Reason string }

type podReport struct {
	Name, Namespace, Netns                          string
	Cookie                                          uint64
	IPs                                             []netip.Addr
	Captured, Spliced, InboundReady, PolicyEnforced verdict
}

func (r *podReport) UnmarshalJSON(b []byte) error {
	type plain podReport
	var w struct {
		*plain
		Inbound verdict `json:"inbound_ready"`
		Policy  verdict `json:"policy_enforced"`
	}
	w.plain = (*plain)(r)
	if err := json.Unmarshal(b, &w); err != nil {
		return err
	}
	r.InboundReady, r.PolicyEnforced = w.Inbound, w.Policy
	return nil
}

func (a *agentProc) arg(flag string) string {
	for i := range a.args[:len(a.args)-1] {
		if a.args[i] == flag {
			return a.args[i+1]
		}
	}
	a.t.Fatalf("no %s on the agent's command line", flag)
	return ""
}

// TestStatusExplainsPods: with the agent stopped, `meshsplice status`
// names every pod (name, namespace, netns, IPs) and says, with the reason,
// whether it is captured, spliced, ready for inbound connections and under
// kernel policy; zero counters are hidden unless --all.
func TestStatusExplainsPods(t *testing.T) {
	m, ag, configDir := agentMesh(t)
	policy := `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: meshed-only-from-ns, namespace: default}
spec:
  selector: {matchLabels: {app: meshed}}
  action: ALLOW
  rules:
  - from: [{source: {namespaces: ["default"]}}]
`
	if err := os.WriteFile(filepath.Join(configDir, "policy.yaml"), []byte(policy), 0o644); err != nil {
		t.Fatal(err)
	}
	node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	pods := map[string]*meshPod{}
	for _, tc := range []struct {
		name string
		ann  map[string]string
	}{
		{"meshed", injected()},
		{"optout", injected(istio.AnnotationCapture, "disabled")},
		{"nosplice", injected(istio.AnnotationSplice, "disabled")},
		{"plain", map[string]string{}},
	} {
		p := m.addPod(node, tc.name, nil)
		pods[tc.name] = p
		_, err := ag.client.AddPod(context.Background(), api.PodRegistration{
			ContainerID: "c-" + p.Name, Netns: p.NS.Path(), IfName: "eth0",
			IPs: []netip.Addr{p.IPv4, p.IPv6}, PodName: p.Name, PodNamespace: "default",
			Annotations: tc.ann, Labels: map[string]string{"app": tc.name},
		})
		if err != nil {
			t.Fatalf("register %s: %v", p.Name, err)
		}
	}
	meshed := pods["meshed"]
	meshed.Sidecar = m.start(meshed, "meshed-sidecar", 1337, "sidecar")
	if _, err := meshed.Sidecar.WaitEvent(waitFor, "ready"); err != nil {
		t.Fatal(err)
	}
	status := func(args ...string) []byte {
		t.Helper()
		out, err := exec.Command(ag.bin, append([]string{"status", "--pin-dir", m.pin, "--state-dir", ag.arg("--state-dir")}, args...)...).Output()
		if err != nil {
			t.Fatalf("meshsplice status %v: %v", args, err)
		}
		return out
	}
	decode := func() map[string]podReport {
		var st struct{ Pods []podReport }
		if err := json.Unmarshal(status("--json"), &st); err != nil {
			t.Fatal(err)
		}
		out := map[string]podReport{}
		for _, p := range st.Pods {
			out[p.Name] = p
		}
		return out
	}
	eventually(t, "meshed pod's listener and policy in the kernel", func() bool {
		r := decode()["meshed"]
		return r.InboundReady.State == "yes" && r.PolicyEnforced.State == "yes"
	})
	ag.stop() // status works without the agent

	got := decode()
	type want struct{ state, reason string }
	for _, tc := range []struct {
		pod                                string
		captured, spliced, inbound, policy want
	}{
		{"meshed", want{"yes", "sidecar"}, want{"yes", "sidecar <-> sidecar"}, want{"yes", "in the kernel's table"}, want{"yes", "policy set"}},
		{"optout", want{"no", "meshsplice.io/capture: disabled"}, want{"no", "not captured"}, want{"n/a", "not captured"}, want{"no", "no ALLOW or DENY policy"}},
		{"nosplice", want{"yes", ""}, want{"no", "meshsplice.io/splice: disabled"}, want{"no", "nothing listens on port 15006"}, want{"no", ""}},
		{"plain", want{"no", "not injected"}, want{"no", ""}, want{"n/a", ""}, want{"no", ""}},
	} {
		r, ok := got[tc.pod]
		if !ok {
			t.Errorf("status has no pod named %s: %+v", tc.pod, got)
			continue
		}
		p := pods[tc.pod]
		if r.Namespace != "default" || r.Netns != p.NS.Path() || r.Cookie != p.Cookie ||
			!slices.Contains(r.IPs, p.IPv4) || !slices.Contains(r.IPs, p.IPv6) {
			t.Errorf("%s: identified as %+v", tc.pod, r)
		}
		for _, c := range []struct {
			what string
			got  verdict
			want want
		}{{"captured", r.Captured, tc.captured}, {"spliced", r.Spliced, tc.spliced},
			{"inbound ready", r.InboundReady, tc.inbound}, {"policy", r.PolicyEnforced, tc.policy}} {
			if c.got.State != c.want.state || !strings.Contains(c.got.Reason, c.want.reason) || c.got.Reason == "" {
				t.Errorf("%s %s: %q (%s), want %q (%s...)", tc.pod, c.what, c.got.State, c.got.Reason, c.want.state, c.want.reason)
			}
		}
	}

	text := string(status())
	for _, w := range []string{"default/meshed", "default/plain", meshed.NS.Path(), "not injected", "counters at zero not shown"} {
		if !strings.Contains(text, w) {
			t.Errorf("status text lacks %q:\n%s", w, text)
		}
	}
	if strings.Contains(text, "policy.torn_down") {
		t.Errorf("status text shows a zero counter without --all:\n%s", text)
	}
	if all := string(status("--all")); !strings.Contains(all, "policy.torn_down") {
		t.Errorf("status --all hides zero counters:\n%s", all)
	}
	t.Logf("meshsplice status:\n%s", text)
}
