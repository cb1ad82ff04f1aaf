package e2e

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/meshsplice/meshsplice/agent"
	"github.com/meshsplice/meshsplice/agent/api"
	"github.com/meshsplice/meshsplice/internal/testnet"
	"github.com/meshsplice/meshsplice/redirect"
)

// Drift (issue 12 item 7): `meshsplice check --drift` compares what the
// config says with what the kernel maps hold.

// checkDrift runs `meshsplice check --drift --json` with args and
// returns its report and whether it exited 1 (drift).
func checkDrift(t *testing.T, bin string, args ...string) (agent.DriftReport, bool) {
	t.Helper()
	cmd := exec.Command(bin, append([]string{"check", "--drift", "--json"}, args...)...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	drift := false
	var exit *exec.ExitError
	switch {
	case errors.As(err, &exit) && exit.ExitCode() == 1 && strings.Contains(stderr.String(), "drift"):
		drift = true
	case err != nil:
		t.Fatalf("meshsplice check --drift: %v\n%s%s", err, out, stderr.String())
	}
	var rep agent.DriftReport
	if err := json.Unmarshal(out, &rep); err != nil {
		t.Fatalf("check --drift --json: %v\n%s", err, out)
	}
	return rep, drift
}

// pinnedMapRW opens a pinned map of the datapath for writing.
func pinnedMapRW(t *testing.T, pin, name string) *ebpf.Map {
	t.Helper()
	m, err := ebpf.LoadPinnedMap(filepath.Join(pin, "maps", name), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close() })
	return m
}

// kernelAddr is an address as the kernel tables key it.
func kernelAddr(ip netip.Addr) redirect.CaptureMsAddr {
	b := ip.As16()
	var a redirect.CaptureMsAddr
	for i := range a.Ip {
		a.Ip[i] = binary.NativeEndian.Uint32(b[4*i:])
	}
	return a
}

// driftBehindTheAgentsBack changes two kernel tables: db gets an inbound
// exclusion nobody configured, and its IPv4 address loses its policy
// entry (an unknown source, judged by no set).
func driftBehindTheAgentsBack(t *testing.T, pin string, db *meshPod) {
	t.Helper()
	port := redirect.CaptureMsPortKey{Netns: db.Cookie, Kind: redirect.CaptureMsPortKindMS_PORT_IN_EXCLUDE, Port: 7777}
	if err := pinnedMapRW(t, pin, redirect.CaptureMapMsPorts).Update(&port, uint8(1), ebpf.UpdateAny); err != nil {
		t.Fatal(err)
	}
	addr := kernelAddr(db.IPv4)
	if err := pinnedMapRW(t, pin, redirect.CaptureMapMsIpInfo).Delete(&addr); err != nil {
		t.Fatal(err)
	}
}

// wantExactDrift checks that rep names db alone, with exactly the two
// changes driftBehindTheAgentsBack made.
func wantExactDrift(t *testing.T, rep agent.DriftReport, db *meshPod) {
	t.Helper()
	if len(rep.Node) != 0 || len(rep.Pods) != 1 || rep.Pods[0].Pod != "shop/db" {
		t.Fatalf("drift %+v, want shop/db alone", rep)
	}
	items := rep.Pods[0].Items
	if len(items) != 2 {
		t.Fatalf("shop/db differences %+v, want 2", items)
	}
	if it := items[0]; it.Field != "excludeInboundPorts" || it.Config != "none" || it.Kernel != "7777" {
		t.Errorf("first difference %+v, want excludeInboundPorts: config none, kernel 7777", it)
	}
	if it := items[1]; it.Field != "policy of "+db.IPv4.String() || !strings.Contains(it.Config, "a policy set (ALLOW") ||
		!strings.HasPrefix(it.Kernel, "no entry") {
		t.Errorf("second difference %+v, want db's IPv4 policy: config its ALLOW set, kernel no entry", it)
	}
	if rep.PodsChecked != 2 {
		t.Errorf("pods checked %d, want 2", rep.PodsChecked)
	}
}

// TestCheckDrift: two pods registered with a standalone agent, db under an
// ALLOW policy. `check --drift` finds no drift; with the agent stopped,
// the test changes two kernel tables behind its back and `check --drift`
// (no agent running) reports exactly those two differences on db, in the
// text form too, and exits 1; the restarted agent re-applies and the drift
// is gone. Then, with the agent running, the same change is found by the
// agent's own periodic check (log, meshsplice_drift_pods), mended by one
// re-apply, and `check --drift` reports none again.
func TestCheckDrift(t *testing.T) {
	m, configDir := agentWorld(t, "trustDomain: cluster.local\n")
	if err := os.WriteFile(filepath.Join(configDir, "policies.yaml"), []byte(allowFromPrincipal("db", "db", "web")), 0o644); err != nil {
		t.Fatal(err)
	}
	ag := newAgent(t, m, configDir)
	ag.args = append(ag.args, "--drift-interval", "500ms")
	ag.withLogs()
	ag.start()
	node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	pods := map[string]*meshPod{}
	for _, name := range []string{"db", "web"} {
		p := m.addPod(node, name, nil)
		if _, err := ag.client.AddPod(context.Background(), api.PodRegistration{
			ContainerID: "c-" + name, Netns: p.NS.Path(), IfName: "eth0", IPs: []netip.Addr{p.IPv4, p.IPv6},
			PodName: name, PodNamespace: "shop", ServiceAccount: name, Labels: map[string]string{"app": name},
			Annotations: injected(),
		}); err != nil {
			t.Fatal(err)
		}
		pods[name] = p
	}
	db := pods["db"]
	args := []string{"--pin-dir", m.pin, "--state-dir", ag.stateDir(), "--istio-config", configDir}

	if rep, drift := checkDrift(t, ag.bin, args...); drift || rep.Drifted() || rep.PodsChecked != 2 {
		t.Fatalf("drift before any change: %+v", rep)
	}

	// Behind the stopped agent's back.
	ag.stop()
	driftBehindTheAgentsBack(t, m.pin, db)
	rep, drift := checkDrift(t, ag.bin, args...)
	if !drift {
		t.Fatal("check --drift exited 0 with a drift")
	}
	wantExactDrift(t, rep, db)
	text, err := exec.Command(ag.bin, append([]string{"check", "--drift"}, args...)...).Output()
	if err == nil {
		t.Fatal("check --drift (text) exited 0 with a drift")
	}
	for _, want := range []string{"drift: 1 of 2 pods differ", "shop/db (container c-db", "excludeInboundPorts", "7777",
		"policy of " + db.IPv4.String()} {
		if !strings.Contains(string(text), want) {
			t.Errorf("check --drift text lacks %q:\n%s", want, text)
		}
	}

	// The agent re-applies at start.
	ag.start()
	eventually(t, "no drift after the agent re-applied", func() bool {
		rep, drift := checkDrift(t, ag.bin, args...)
		return !drift && !rep.Drifted()
	})

	// Behind the running agent's back: its own check finds exactly this
	// and mends it.
	driftBehindTheAgentsBack(t, m.pin, db)
	line, err := ag.proc.WaitLine(20*time.Second, func(l string) bool { return strings.Contains(l, "kernel drift: ") })
	if err != nil {
		t.Fatalf("the agent did not report the drift: %v", err)
	}
	var ev struct{ Pod, Differences string }
	if err := json.Unmarshal([]byte(line), &ev); err != nil {
		t.Fatal(err)
	}
	if ev.Pod != "shop/db" || !strings.Contains(ev.Differences, "excludeInboundPorts: config none, kernel 7777") ||
		!strings.Contains(ev.Differences, "policy of "+db.IPv4.String()) {
		t.Fatalf("the agent reported %+v, want shop/db's two differences", ev)
	}
	if _, err := ag.proc.WaitLine(20*time.Second, func(l string) bool { return strings.Contains(l, "applying everything again to mend kernel drift") }); err != nil {
		t.Fatalf("the agent did not re-apply: %v", err)
	}
	waitUntil(t, "meshsplice_drift_pods 0 after the re-apply", 20*time.Second, func() bool {
		return strings.Contains(ag.get("/metrics"), "\nmeshsplice_drift_pods 0\n")
	})
	if rep, drift := checkDrift(t, ag.bin, args...); drift || rep.Drifted() {
		t.Fatalf("drift after the agent mended it: %+v", rep)
	}
}
