package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/meshsplice/meshsplice/agent/api"
	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/internal/testnet"
)

// agentProc is `meshsplice agent --standalone` run as a process, the way a
// node runs it, on a test cgroup and pin directory.
type agentProc struct {
	t       *testing.T
	bin     string
	args    []string
	proc    *testnet.Proc
	metrics string
	client  *api.Client
}

func freePort(t *testing.T) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func startAgent(t *testing.T, m *mesh, configDir string) *agentProc {
	t.Helper()
	a := newAgent(t, m, configDir)
	a.start()
	return a
}

// newAgent prepares the agent's command line without starting it.
func newAgent(t *testing.T, m *mesh, configDir string) *agentProc {
	t.Helper()
	bin := testnet.BuildBinary(t, "github.com/meshsplice/meshsplice/cmd/meshsplice")
	sock := filepath.Join(t.TempDir(), "cni.sock")
	a := &agentProc{t: t, bin: bin, metrics: fmt.Sprintf("127.0.0.1:%d", freePort(t))}
	a.args = []string{bin, "agent", "--standalone", "--istio-config", configDir,
		"--cgroup", m.cg.Path, "--pin-dir", m.pin, "--cni-socket", sock,
		"--state-dir", t.TempDir(), "--metrics-addr", a.metrics}
	a.client = api.NewClient(sock, 5*time.Second)
	t.Cleanup(a.client.Close)
	return a
}

func (a *agentProc) start() {
	a.t.Helper()
	a.proc = testnet.Start(a.t, testnet.StartOpts{Args: a.args, Name: "agent"})
	deadline := time.Now().Add(20 * time.Second)
	for {
		resp, err := http.Get("http://" + a.metrics + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return
			}
		}
		if time.Now().After(deadline) {
			a.t.Fatalf("agent not ready: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (a *agentProc) stop() {
	a.proc.Signal(os.Interrupt)
	if err := a.proc.WaitTimeout(10 * time.Second); err != nil {
		a.t.Logf("agent exit: %v", err)
	}
}

func (a *agentProc) register(p *meshPod, ann map[string]string) {
	a.t.Helper()
	_, err := a.client.AddPod(context.Background(), api.PodRegistration{
		ContainerID: "c-" + p.Name, Netns: p.NS.Path(), IfName: "eth0",
		IPs: []netip.Addr{p.IPv4, p.IPv6}, PodName: p.Name, PodNamespace: "default",
		Annotations: ann,
	})
	if err != nil {
		a.t.Fatalf("register %s: %v", p.Name, err)
	}
}

func (a *agentProc) get(path string) string {
	a.t.Helper()
	resp, err := http.Get("http://" + a.metrics + path)
	if err != nil {
		a.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// denials reads the agent's /denials.
func (a *agentProc) denials() []datapath.Denial {
	a.t.Helper()
	var d []datapath.Denial
	if err := json.Unmarshal([]byte(a.get("/denials")), &d); err != nil {
		a.t.Fatalf("/denials: %v", err)
	}
	return d
}

// status runs `meshsplice status --json`.
func (a *agentProc) status(pin string) datapath.Status {
	a.t.Helper()
	out, err := exec.Command(a.bin, "status", "--json", "--pin-dir", pin).Output()
	if err != nil {
		a.t.Fatalf("meshsplice status: %v", err)
	}
	var st datapath.Status
	if err := json.Unmarshal(out, &st); err != nil {
		a.t.Fatalf("status --json: %v\n%s", err, out)
	}
	return st
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	waitUntil(t, what, 10*time.Second, cond)
}

// waitUntil is eventually with a deadline of its own.
func waitUntil(t *testing.T, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestAgentProcess: the agent, started as a process, accelerates pods
// registered through its CNI API, follows edits of its config folder,
// stops touching a pod after DEL, keeps its pods across a restart, and
// `meshsplice status --json` agrees with the kernel maps.
func TestAgentProcess(t *testing.T) {
	m, ag, configDir := agentMesh(t)
	node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	client := m.addPod(node, "client", nil)
	server := m.addPod(node, "server", nil)
	ann := injected()
	ag.register(client, ann)
	ag.register(server, ann)
	for _, p := range []*meshPod{client, server} {
		p.Sidecar = m.start(p, p.Name+"-sidecar", 1337, "sidecar")
		if _, err := p.Sidecar.WaitEvent(waitFor, "ready"); err != nil {
			t.Fatal(err)
		}
	}
	counters := func() datapath.Counters {
		c, err := datapath.ReadPinnedCounters(m.pin)
		if err != nil {
			t.Fatal(err)
		}
		return c
	}
	eventually(t, "both sidecar listeners", func() bool { return counters()["listener_iter.listener_registered"] >= 2 })

	// status --json agrees with the kernel and with the agent.
	st := ag.status(m.pin)
	// Six links, plus the splice(2) reader links (docs/readers.md).
	links := slices.DeleteFunc(slices.Clone(st.Links), func(l datapath.LinkStatus) bool { return strings.HasPrefix(l.Name, "splice-") })
	if len(st.Pods) != 2 || !st.Node.Capture || !st.Node.Splice || len(links) != 6 {
		t.Fatalf("status: %+v", st)
	}
	var agentPods []api.PodStatus
	if err := json.Unmarshal([]byte(ag.get("/pods")), &agentPods); err != nil {
		t.Fatal(err)
	}
	for _, p := range []*meshPod{client, server} {
		i := slices.IndexFunc(st.Pods, func(sp datapath.Pod) bool { return sp.Cookie == p.Cookie })
		if i < 0 || !slices.Contains(st.Pods[i].IPs, p.IPv4) || !slices.Contains(st.Pods[i].IPs, p.IPv6) || !st.Pods[i].Traffic.Capture {
			t.Fatalf("status has no right entry for %s: %+v", p.Name, st.Pods)
		}
		if !slices.ContainsFunc(agentPods, func(ap api.PodStatus) bool { return ap.Pod.Netns == p.NS.Path() && ap.Capture }) {
			t.Fatalf("agent /pods has no %s: %+v", p.Name, agentPods)
		}
	}

	target := netip.AddrPortFrom(server.IPv4, appPort)
	before := counters()
	m.client(client, appUID, target, "--messages", "20")
	d := counters().Sub(before)
	if d["connect.captured"] != 1 || d["sk_lookup.captured"] != 1 || d["sockops.sock_inserted"] != 2 {
		t.Fatalf("through the agent: %v", nonZero(d))
	}
	if !strings.Contains(ag.get("/metrics"), `meshsplice_datapath_events_total{event="redirected",program="sk_msg"}`) {
		t.Fatal("metrics lack the sk_msg counter")
	}

	// Editing the folder: splice off node-wide, for new connections.
	ms := filepath.Join(configDir, "meshsplice.yaml")
	os.WriteFile(ms, []byte("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: meshsplice}\ndata: {splice: disabled}\n"), 0o644)
	eventually(t, "splice switched off", func() bool { return !ag.status(m.pin).Node.Splice })
	before = counters()
	m.client(client, appUID, target, "--messages", "20")
	if d := counters().Sub(before); d["connect.captured"] != 1 || d["sockops.sock_inserted"] != 0 {
		t.Fatalf("with splice off: %v", nonZero(d))
	}
	os.Remove(ms)
	eventually(t, "splice switched back on", func() bool { return ag.status(m.pin).Node.Splice })

	// A restarted agent keeps its pods.
	ag.stop()
	ag.start()
	if st := ag.status(m.pin); len(st.Pods) != 2 {
		t.Fatalf("pods after agent restart: %+v", st.Pods)
	}
	before = counters()
	m.client(client, appUID, target, "--messages", "20")
	if d := counters().Sub(before); d["sockops.sock_inserted"] != 2 {
		t.Fatalf("after restart: %v", nonZero(d))
	}

	// DEL: the server pod is left alone (no inbound capture); DEL again is fine.
	for range 2 {
		if err := ag.client.RemovePod(context.Background(), "c-server"); err != nil {
			t.Fatal(err)
		}
	}
	if st := ag.status(m.pin); len(st.Pods) != 1 || st.Pods[0].Cookie != client.Cookie {
		t.Fatalf("pods after DEL: %+v", st.Pods)
	}
	before = counters()
	seen := len(acceptsOf(server.App))
	m.client(client, appUID, target, "--messages", "20")
	waitAccepts(t, server.App, "", seen+1)
	if d := counters().Sub(before); d["sk_lookup.meshed"] != 0 || d["connect.captured"] != 1 {
		t.Fatalf("after DEL the server pod was touched: %v", nonZero(d))
	}
	if peers := acceptsOf(server.App); len(peers) == 0 || origDst(peers[len(peers)-1]).Addr() != client.IPv4 {
		t.Fatalf("server app did not get the connection straight from the client sidecar: %v", peers)
	}
	ag.stop()
}
