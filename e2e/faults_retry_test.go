package e2e

import (
	"context"
	"encoding/json"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshsplice/meshsplice/agent/api"
	"github.com/meshsplice/meshsplice/internal/testnet"
	"github.com/meshsplice/meshsplice/redirect"
)

// Faults (issue 14, item 7): a failure to apply something is logged,
// counted, and applied again with a growing back-off until it works.

// TestFailedPolicyRetriesWithBackoff: a policy that needs two sets (three
// during the swap from the one in force) meets a kernel set table of two
// (pinned before the agent started; the agent keeps its size). The refusal is logged and counted
// (meshsplice_apply_failures_total{what="policy"}), retried after 1 s,
// 2 s, 4 s; once the config shrinks to what fits, the retries stop and the
// kernel holds the policy.
func TestFailedPolicyRetriesWithBackoff(t *testing.T) {
	m, configDir := smallMapsWorld(t, "trustDomain: cluster.local\n", map[string]uint32{redirect.CaptureMapMsPolSets: 2})
	policies := filepath.Join(configDir, "policies.yaml")
	if err := os.WriteFile(policies, []byte(allowFromPrincipal("db", "db", "backend")+"---\n"+
		allowFromPrincipal("backend", "backend", "db")), 0o644); err != nil {
		t.Fatal(err)
	}
	ag := newAgent(t, m, configDir)
	ag.withLogs()
	ag.start()
	node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	for _, name := range []string{"db", "backend"} {
		p := m.addPod(node, name, nil)
		if _, err := ag.client.AddPod(context.Background(), api.PodRegistration{
			ContainerID: "c-" + name, Netns: p.NS.Path(), IfName: "eth0", IPs: []netip.Addr{p.IPv4, p.IPv6},
			PodName: name, PodNamespace: "shop", ServiceAccount: name, Labels: map[string]string{"app": name},
			Annotations: injected(),
		}); err != nil {
			t.Fatal(err)
		}
	}

	// Three retries, each after twice the wait of the one before.
	var backoffs []string
	waitUntil(t, "three retries", 20*time.Second, func() bool {
		backoffs = backoffs[:0]
		for _, l := range ag.proc.Lines() {
			var ev struct{ Msg, Backoff string }
			if json.Unmarshal([]byte(l), &ev) == nil && ev.Msg == "applying again after a failure" {
				backoffs = append(backoffs, ev.Backoff)
			}
		}
		return len(backoffs) >= 3
	})
	if strings.Join(backoffs[:3], ",") != "1s,2s,4s" {
		t.Fatalf("back-off %v, want 1s,2s,4s", backoffs)
	}
	metric := func(name string) string {
		for _, l := range strings.Split(ag.get("/metrics"), "\n") {
			if strings.HasPrefix(l, name+" ") {
				return strings.TrimPrefix(l, name+" ")
			}
		}
		return ""
	}
	if n := metric(`meshsplice_apply_failures_total{what="policy"}`); n == "" || n == "0" || n == "1" {
		t.Fatalf("policy failures counted %q, want each attempt", n)
	}
	if metric("meshsplice_policy_applied") != "0" {
		t.Fatal("meshsplice_policy_applied is not 0 while the policy does not fit")
	}

	// What fits is applied, and the retries stop.
	if err := os.WriteFile(policies, []byte(allowFromPrincipal("db", "db", "backend")), 0o644); err != nil {
		t.Fatal(err)
	}
	waitUntil(t, "the smaller policy applied", 20*time.Second, func() bool { return metric("meshsplice_policy_applied") == "1" })
	if _, err := ag.proc.WaitLine(10*time.Second, func(l string) bool { return strings.Contains(l, "applied after a failure") }); err != nil {
		t.Fatalf("retries did not end: %v", err)
	}
}
