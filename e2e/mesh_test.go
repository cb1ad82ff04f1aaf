// Package e2e holds meshsplice's privileged end-to-end tests: real network
// namespaces on a bridge, real cgroups, the real kernel, the datapath loaded
// and attached, and test sidecars (e2e/mstest) that follow Envoy's
// interception contract.
package e2e

import (
	"fmt"
	"log/slog"
	"net/netip"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/internal/testnet"
	"github.com/meshsplice/meshsplice/istio"
	"github.com/meshsplice/meshsplice/redirect"
)

const (
	appUID  = 1000
	appPort = 8080
	waitFor = 10 * time.Second
)

var (
	buildOnce sync.Once
	binPath   string
)

// mstest builds the test programs once per test binary.
func mstest(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		binPath = testnet.BuildBinary(&onceTB{T: t}, "github.com/meshsplice/meshsplice/e2e/mstest")
	})
	if binPath == "" {
		t.Fatal("mstest binary was not built")
	}
	return binPath
}

// onceTB keeps the built binary for the whole test binary: its cleanup is
// dropped (the temporary directory is removed by the OS).
type onceTB struct{ *testing.T }

func (o *onceTB) Cleanup(func()) {}

// mesh is one test's world: a cgroup holding every pod process, a datapath
// attached to that cgroup, and "nodes" (bridges in namespaces) with pods.
type mesh struct {
	t   *testing.T
	cg  *testnet.Cgroup
	dp  *datapath.Datapath
	pin string
	bin string
}

func newMesh(t *testing.T) *mesh {
	t.Helper()
	return newMeshOpts(t, datapath.Options{})
}

// newMeshOpts is newMesh with datapath options (pin dir, cgroup, node and
// logger are the mesh's own).
func newMeshOpts(t *testing.T, opts datapath.Options) *mesh {
	t.Helper()
	testnet.RequireRoot(t)
	return newMeshOnOpts(t, testnet.NewCgroup(t), opts)
}

// newMeshOn is newMesh on a cgroup the test made.
func newMeshOn(t *testing.T, cg *testnet.Cgroup) *mesh {
	t.Helper()
	return newMeshOnOpts(t, cg, datapath.Options{})
}

// newMeshOnOpts is newMeshOn with datapath options.
func newMeshOnOpts(t *testing.T, cg *testnet.Cgroup, opts datapath.Options) *mesh {
	t.Helper()
	m := &mesh{t: t, bin: mstest(t), cg: cg}
	// Programs of others attached before meshsplice stay (neighbour_test.go).
	others := attachedCgroupPrograms(t, cg.Path)
	m.pin = testnet.PinDir(t, func(dir string) error {
		if err := datapath.Detach(dir, time.Second); err != nil {
			return err
		}
		// After detach nothing of meshsplice may stay attached to the cgroup.
		if n := attachedCgroupPrograms(t, m.cg.Path); n != others {
			return fmt.Errorf("%d programs attached to %s after detach, want the %d of others", n, m.cg.Path, others)
		}
		return nil
	})
	opts.PinDir, opts.CgroupPath = m.pin, m.cg.Path
	opts.Node = datapath.NodeSettings{Capture: true, Splice: true}
	opts.Logger = slog.New(slog.NewTextHandler(testLog{t}, nil))
	dp, err := datapath.Open(opts)
	if err != nil {
		t.Fatalf("open datapath: %v", err)
	}
	t.Cleanup(func() { dp.Close() })
	m.dp = dp
	return m
}

// testLog sends the datapath's log to the test log.
type testLog struct{ t *testing.T }

func (l testLog) Write(b []byte) (int, error) {
	l.t.Log(strings.TrimSpace(string(b)))
	return len(b), nil
}

// meshPod is a pod with (optionally) a sidecar and an app.
type meshPod struct {
	*testnet.Pod
	Cookie  uint64
	Traffic istio.Traffic
	Sidecar *testnet.Proc
	App     *testnet.Proc
}

// testDefaults are the mesh defaults of the test world: Istio's, in a
// dual-stack mesh (ISTIO_DUAL_STACK=true), since every test pod has an IPv4
// and an IPv6 address and IPv6 is captured only then.
func testDefaults() istio.Defaults {
	d := istio.DefaultDefaults()
	d.DualStack = true
	return d
}

// injected is the annotation set of a pod the Istio injector processed.
func injected(extra ...string) map[string]string {
	ann := map[string]string{istio.AnnotationStatus: `{"containers":["istio-proxy"]}`}
	for i := 0; i+1 < len(extra); i += 2 {
		ann[extra[i]] = extra[i+1]
	}
	return ann
}

// addPod creates a pod on node, registers it with the datapath when ann is
// not nil (as the CNI plugin does, before any container starts), then
// starts its sidecar (uid 1337) and its echo app (uid 1000) on appPort.
func (m *mesh) addPod(node *testnet.BridgeNet, name string, ann map[string]string) *meshPod {
	m.t.Helper()
	return m.addPodWith(node, name, ann)
}

// addPodWith is addPod with extra flags for the sidecar.
func (m *mesh) addPodWith(node *testnet.BridgeNet, name string, ann map[string]string, sidecarFlags ...string) *meshPod {
	t := m.t
	t.Helper()
	p := &meshPod{Pod: node.AddPod(t, name)}
	cookie, err := p.NS.Cookie()
	if err != nil {
		t.Fatal(err)
	}
	p.Cookie = cookie
	if ann != nil {
		tr, warnings, err := istio.ParseTraffic(ann, testDefaults())
		if err != nil {
			t.Fatalf("pod %s annotations: %v", name, err)
		}
		for _, w := range warnings {
			t.Logf("pod %s: %s", name, w)
		}
		tr.PodIPs = []netip.Addr{p.IPv4, p.IPv6}
		p.Traffic = tr
		if err := redirect.PreparePodNetns(p.NS.Path()); err != nil {
			t.Fatal(err)
		}
		if err := m.dp.AddPod(datapath.Pod{
			NetnsPath: p.NS.Path(), Cookie: cookie,
			IPs: []netip.Addr{p.IPv4, p.IPv6}, Traffic: tr,
		}); err != nil {
			t.Fatalf("register pod %s: %v", name, err)
		}
		p.Sidecar = m.start(p, name+"-sidecar", 1337, append([]string{"sidecar"}, sidecarFlags...)...)
		if _, err := p.Sidecar.WaitEvent(waitFor, "ready"); err != nil {
			t.Fatalf("sidecar of %s: %v", name, err)
		}
		if tr.Capture {
			if err := m.dp.WaitListener(cookie, waitFor); err != nil {
				t.Fatalf("%v (counters %v)", err, nonZero(m.counters()))
			}
		}
	}
	p.App = m.start(p, name+"-app", appUID, "echo", "--port", fmt.Sprint(appPort))
	if _, err := p.App.WaitEvent(waitFor, "ready"); err != nil {
		t.Fatalf("app of %s: %v", name, err)
	}
	return p
}

// start runs an mstest program in pod p. Go >= 1.24 listens with MPTCP by
// default, Envoy does not: the programs run with MPTCP off (see
// TestMPTCPSidecarListener for what an MPTCP sidecar gets).
func (m *mesh) start(p *meshPod, name string, uid int, args ...string) *testnet.Proc {
	return m.startEnv(p, name, uid, []string{"GODEBUG=multipathtcp=0"}, args...)
}

func (m *mesh) startEnv(p *meshPod, name string, uid int, env []string, args ...string) *testnet.Proc {
	return testnet.Start(m.t, testnet.StartOpts{
		NetNS: p.NS, Cgroup: m.cg, UID: uid, GID: uid, Name: name,
		Args: append([]string{m.bin}, args...),
		Env:  env,
	})
}

// client runs the verifying client in pod p as the app uid (or uid) and
// waits for it; it fails the test unless every message came back intact.
func (m *mesh) client(p *meshPod, uid int, target netip.AddrPort, args ...string) *testnet.Proc {
	t := m.t
	t.Helper()
	c := m.start(p, p.Name+"-client", uid, append([]string{"client", "--target", target.String()}, args...)...)
	if err := c.WaitTimeout(60 * time.Second); err != nil {
		if cnt, err := m.dp.Counters(); err == nil {
			t.Logf("counters: %v", nonZero(cnt))
		}
		t.Fatalf("client in %s -> %s: %v\n%s", p.Name, target, err, strings.Join(c.Lines(), "\n"))
	}
	sum, err := c.WaitEvent(time.Second, "summary")
	if err != nil || !sum.Bool("ok") {
		t.Fatalf("client in %s -> %s failed: %v\n%s", p.Name, target, err, strings.Join(c.Lines(), "\n"))
	}
	return c
}

// counters reads the kernel counters.
func (m *mesh) counters() datapath.Counters {
	m.t.Helper()
	c, err := m.dp.Counters()
	if err != nil {
		m.t.Fatal(err)
	}
	return c
}

// acceptEvents returns the sidecar's accept events of one listener.
func acceptEvents(p *testnet.Proc, listener string) []testnet.Event {
	var out []testnet.Event
	for _, ev := range p.Events() {
		if ev.Str("event") == "accept" && ev.Str("listener") == listener {
			out = append(out, ev)
		}
	}
	return out
}

// sidecarErrors fails the test on any error event of a sidecar.
func sidecarErrors(t *testing.T, pods ...*meshPod) {
	t.Helper()
	for _, p := range pods {
		if p.Sidecar == nil {
			continue
		}
		for _, ev := range p.Sidecar.Events() {
			if ev.Str("event") == "error" {
				t.Errorf("sidecar of %s: %v", p.Name, ev)
			}
		}
	}
}

// noIptablesRules asserts that no nat rule exists in any of the pods: the
// capture is iptables-free.
func noIptablesRules(t *testing.T, pods ...*meshPod) {
	t.Helper()
	for _, p := range pods {
		out, err := exec.Command("nsenter", "--net="+p.NS.Path(), "iptables-save").CombinedOutput()
		if err != nil {
			if strings.Contains(string(out), "not found") || strings.Contains(err.Error(), "executable file not found") {
				continue // iptables absent: no rule can exist
			}
			t.Fatalf("iptables-save in %s: %v\n%s", p.Name, err, out)
		}
		for _, line := range strings.Split(string(out), "\n") {
			if strings.HasPrefix(line, "-A") {
				t.Errorf("iptables rule in pod %s: %s", p.Name, line)
			}
		}
	}
}

var cgroupHooks = []ebpf.AttachType{
	ebpf.AttachCGroupSockOps, ebpf.AttachCGroupGetsockopt,
	ebpf.AttachCGroupInet4Connect, ebpf.AttachCGroupInet6Connect,
}
