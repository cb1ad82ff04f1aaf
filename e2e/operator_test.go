package e2e

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
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
	m, configDir := agentWorld(t, "trustDomain: demo.local\n")
	return m, startAgent(t, m, configDir), configDir
}

// agentWorld is a test cgroup, a pin directory and a config folder whose
// mesh.yaml holds meshYAML, for an agent to start on.
func agentWorld(t *testing.T, meshYAML string) (*mesh, string) {
	t.Helper()
	testnet.RequireRoot(t)
	m := &mesh{t: t, bin: mstest(t)}
	m.cg = testnet.NewCgroup(t)
	m.pin = testnet.PinDir(t, func(dir string) error { return datapath.Detach(dir, time.Second) })
	configDir := t.TempDir()
	if err := os.WriteFile(filepath.Join(configDir, "mesh.yaml"), []byte(meshYAML), 0o644); err != nil {
		t.Fatal(err)
	}
	return m, configDir
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

// withLogs makes the agent's stderr (its JSON log) part of the lines
// testnet collects.
func (a *agentProc) withLogs() {
	a.args = append([]string{"/bin/sh", "-c", `exec "$0" "$@" 2>&1`}, a.args...)
}

// setArg replaces the value of a flag on the agent's command line.
func (a *agentProc) setArg(flag, value string) {
	for i := range a.args[:len(a.args)-1] {
		if a.args[i] == flag {
			a.args[i+1] = value
			return
		}
	}
	a.t.Fatalf("no %s on the agent's command line", flag)
}

func hasLine(lines []string, subs ...string) bool {
	for _, l := range lines {
		all := true
		for _, s := range subs {
			all = all && strings.Contains(l, s)
		}
		if all {
			return true
		}
	}
	return false
}

// TestAgentStartup: an agent that cannot start says why and exits non-zero;
// its state directory exists from the start; on SIGTERM it says it stops
// and that the datapath stays.
func TestAgentStartup(t *testing.T) {
	testnet.RequireRoot(t)
	t.Run("invalid mesh config and no last good one", func(t *testing.T) {
		m, configDir := agentWorld(t, "trustDomain: [demo.local\n")
		a := newAgent(t, m, configDir)
		a.withLogs()
		a.proc = testnet.Start(t, testnet.StartOpts{Args: a.args, Name: "agent"})
		err := a.proc.WaitTimeout(20 * time.Second)
		if err == nil || a.proc.ExitCode() <= 0 {
			t.Fatalf("agent with an invalid config: exit %d (%v), want a non-zero exit", a.proc.ExitCode(), err)
		}
		if !hasLine(a.proc.Lines(), "mesh.yaml", "no last good") {
			t.Fatalf("the agent did not say what is wrong:\n%s", strings.Join(a.proc.Lines(), "\n"))
		}
	})
	t.Run("state dir created, SIGTERM leaves the datapath", func(t *testing.T) {
		m, configDir := agentWorld(t, "trustDomain: demo.local\n")
		a := newAgent(t, m, configDir)
		stateDir := filepath.Join(t.TempDir(), "not", "yet")
		a.setArg("--state-dir", stateDir)
		a.withLogs()
		a.start()
		if st, err := os.Stat(stateDir); err != nil || !st.IsDir() {
			t.Fatalf("state dir after start, before any pod: %v", err)
		}
		a.proc.Signal(syscall.SIGTERM)
		if err := a.proc.WaitTimeout(20 * time.Second); err != nil {
			t.Fatalf("agent on SIGTERM: %v", err)
		}
		if !hasLine(a.proc.Lines(), "agent stopping", "terminated signal received", "datapath stays attached") {
			t.Fatalf("the agent did not say that it stops and that the datapath stays:\n%s", strings.Join(a.proc.Lines(), "\n"))
		}
		if n := attachedCgroupPrograms(t, m.cg.Path); n != 4 {
			t.Fatalf("programs attached after the agent stopped: %d, want 4", n)
		}
	})
}
