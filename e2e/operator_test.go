package e2e

import (
	"context"
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/meshsplice/meshsplice/agent/api"
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

// TestInboundListenerMissing: a meshed pod whose sidecar runs outside the
// cgroup the programs are attached to never gets its inbound listener
// registered. The agent must say so after the grace period (log, /pods,
// metric) and name the likely cause; a pod whose sidecar runs inside gets
// no warning.
func TestInboundListenerMissing(t *testing.T) {
	m, configDir := agentWorld(t, "trustDomain: demo.local\n")
	a := newAgent(t, m, configDir)
	a.args = append(a.args, "--listener-grace", "1s")
	a.withLogs()
	a.start()
	node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})

	inside := m.addPod(node, "inside", nil)
	a.register(inside, injected())
	inside.Sidecar = m.start(inside, "inside-sidecar", 1337, "sidecar")

	outside := m.addPod(node, "outside", nil)
	a.register(outside, injected())
	elsewhere := testnet.NewCgroup(t)
	outside.Sidecar = testnet.Start(t, testnet.StartOpts{
		NetNS: outside.NS, Cgroup: elsewhere, UID: 1337, GID: 1337, Name: "outside-sidecar",
		Args: []string{m.bin, "sidecar"}, Env: []string{"GODEBUG=multipathtcp=0"},
	})
	for _, p := range []*meshPod{inside, outside} {
		if _, err := p.Sidecar.WaitEvent(waitFor, "ready"); err != nil {
			t.Fatal(err)
		}
	}

	line, err := a.proc.WaitLine(20*time.Second, func(l string) bool {
		return strings.Contains(l, "inbound listener") && strings.Contains(l, "default/outside")
	})
	if err != nil {
		t.Fatalf("no warning for the pod whose sidecar runs outside the cgroup: %v", err)
	}
	for _, want := range []string{`"level":"WARN"`, m.cg.Path, "outside the cgroup"} {
		if !strings.Contains(line, want) {
			t.Errorf("warning lacks %q: %s", want, line)
		}
	}

	var pods []api.PodStatus
	if err := json.Unmarshal([]byte(a.get("/pods")), &pods); err != nil {
		t.Fatal(err)
	}
	for _, p := range pods {
		wantReady := p.Pod.PodName == "inside"
		if p.InboundReady == nil || *p.InboundReady != wantReady || (!wantReady && !strings.Contains(p.InboundReason, "outside the cgroup")) {
			t.Errorf("/pods %s: inbound ready %v (%q), want %v", p.Pod.PodName, p.InboundReady, p.InboundReason, wantReady)
		}
	}
	if !strings.Contains(a.get("/metrics"), "meshsplice_pods_inbound_not_ready 1\n") {
		t.Errorf("metric meshsplice_pods_inbound_not_ready is not 1")
	}
	if hasLine(a.proc.Lines(), "inbound listener", "default/inside", "WARN") {
		t.Errorf("warning for the pod whose sidecar runs inside the cgroup")
	}
}
