package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/meshsplice/meshsplice/agent"
)

// TestPrintDrift: the text form of `check --drift`, for no drift and for
// drift in the node switches and two pods (testdata/*.golden; refresh with
// REFRESH_GOLDEN=true).
func TestPrintDrift(t *testing.T) {
	s := func(v string) *string { return &v }
	f := &driftFlags{pinDir: s("/sys/fs/bpf/meshsplice"), stateDir: s("/run/meshsplice"), sourceDescription: "folder /etc/meshsplice/istio"}
	for _, c := range []struct {
		name string
		rep  agent.DriftReport
	}{
		{"drift-none", agent.DriftReport{PodsChecked: 3}},
		{"drift-some", agent.DriftReport{PodsChecked: 3,
			Node: []agent.DriftItem{{Field: "node splice", Config: "on", Kernel: "off"}},
			Pods: []agent.PodDrift{
				{Pod: "shop/db", ContainerID: "c-db", Cookie: 4097, Items: []agent.DriftItem{
					{Field: "excludeInboundPorts", Config: "none", Kernel: "7777"},
					{Field: "policy of 10.0.0.2", Config: "identity 1, a policy set (ALLOW, allow 0x1, deny 0x0, 1 identities, 0 ports, 2 prefixes)", Kernel: "no entry (an unknown source, judged by no set)"}}},
				{Pod: "shop/new", Items: []agent.DriftItem{{Field: "pod", Config: "meshed by Istio (10.0.0.8)", Kernel: "no registration and nothing in the kernel tables: the pod is not captured"}}},
			},
			Skipped: []string{"netns cookie 9: rebuilt from the kernel after the agent's state was lost; its annotations are unknown until its CNI registration comes again"}}},
	} {
		t.Run(c.name, func(t *testing.T) {
			var b strings.Builder
			if err := printDrift(&b, f, c.rep); err != nil {
				t.Fatal(err)
			}
			path := filepath.Join("testdata", c.name+".golden")
			if os.Getenv("REFRESH_GOLDEN") == "true" {
				if err := os.WriteFile(path, []byte(b.String()), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run with REFRESH_GOLDEN=true to create it)", err)
			}
			if b.String() != string(want) {
				t.Errorf("%s differs (REFRESH_GOLDEN=true updates it):\n%s", path, b.String())
			}
		})
	}
}
