package cni_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/meshsplice/meshsplice/agent/api"
	"github.com/meshsplice/meshsplice/agent/api/apitest"
	"github.com/meshsplice/meshsplice/cni"
	"github.com/meshsplice/meshsplice/internal/testnet"
)

// The tests in this file run the real thing: libcni executes a conflist
// chain of the reference bridge and host-local plugins
// (containernetworking/plugins, pinned in testdata/refplugins/go.mod)
// followed by the meshsplice-cni binary, which talks to an agent API server
// with an in-memory registry in the test process. The runtime side runs
// inside a "node" network namespace, so the bridge, the host-side veths and
// the sysctls the bridge plugin sets live there and vanish with it: the
// host's root namespace is only used to create and delete namespaces.

func TestMain(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	if left := testnet.Leftovers(); len(left) > 0 {
		fmt.Fprintf(os.Stderr, "cni: leftovers after tests: %v\n", left)
		if code == 0 {
			code = 1
		}
	}
	os.Exit(code)
}

var (
	buildOnce sync.Once
	binDir    string
	buildErr  error
)

// pluginDir returns a directory holding meshsplice-cni, bridge and
// host-local, built once per test binary and removed by TestMain.
func pluginDir(tb testing.TB) string {
	tb.Helper()
	buildOnce.Do(func() { binDir, buildErr = buildPlugins() })
	if buildErr != nil {
		tb.Fatalf("build CNI plugins: %v", buildErr)
	}
	return binDir
}

func buildPlugins() (string, error) {
	gobin, err := exec.LookPath("go")
	if err != nil {
		return "", fmt.Errorf("go command not found: %w", err)
	}
	refplugins, err := filepath.Abs(filepath.Join("testdata", "refplugins"))
	if err != nil {
		return "", err
	}
	dir, err := os.MkdirTemp("", "mstest-cni-bin-")
	if err != nil {
		return "", err
	}
	builds := []struct {
		dir  string // module directory; "" is meshsplice's
		pkgs []string
	}{
		{"", []string{"github.com/meshsplice/meshsplice/cmd/meshsplice-cni"}},
		{refplugins, []string{
			"github.com/containernetworking/plugins/plugins/main/bridge",
			"github.com/containernetworking/plugins/plugins/ipam/host-local",
		}},
	}
	for _, b := range builds {
		cmd := exec.Command(gobin, append([]string{"build", "-o", dir + "/"}, b.pkgs...)...)
		cmd.Dir = b.dir
		cmd.Env = append(os.Environ(), "GOWORK=off")
		if out, err := cmd.CombinedOutput(); err != nil {
			os.RemoveAll(dir)
			return "", fmt.Errorf("go build %s: %w\n%s", strings.Join(b.pkgs, " "), err, out)
		}
	}
	return dir, nil
}

// chainOpts configures newChain.
type chainOpts struct {
	// agentDown: no agent listens on the socket.
	agentDown bool
	// unreachable is the agentUnreachable setting ("" leaves it out).
	unreachable string
	// meshsplice are extra fields of meshsplice-cni's config.
	meshsplice map[string]any
	// noInterfacePlugin leaves bridge out of the list.
	noInterfacePlugin bool
}

// chain is one test's CNI world: a node namespace, the plugin binaries, a
// conflist, and the agent API server.
type chain struct {
	t       *testing.T
	version string
	node    *testnet.NetNS
	cni     *libcni.CNIConfig
	list    *libcni.NetworkConfigList
	reg     *apitest.MemRegistry
	socket  string
	srv     *api.Server
	logFile string
}

const (
	bridgeName = "msbr0"
	subnetV4   = "10.99.0.0/24"
	subnetV6   = "fd00:99::/64"
	network    = "meshtest"
)

func newChain(t *testing.T, version string, opts chainOpts) *chain {
	t.Helper()
	testnet.RequireRoot(t)
	bin := pluginDir(t)
	dir := tempDir(t)
	c := &chain{
		t:       t,
		version: version,
		node:    testnet.NewNetNS(t, "node"),
		cni:     libcni.NewCNIConfigWithCacheDir([]string{bin}, filepath.Join(dir, "cache"), nil),
		reg:     &apitest.MemRegistry{},
		socket:  filepath.Join(dir, "cni.sock"),
		logFile: filepath.Join(dir, "cni.log"),
	}
	if !opts.agentDown {
		srv, err := api.Listen(c.socket, c.reg, nil)
		if err != nil {
			t.Fatal(err)
		}
		c.srv = srv
		done := make(chan error, 1)
		go func() { done <- srv.Serve() }()
		t.Cleanup(func() {
			srv.Close()
			if err := <-done; err != nil {
				t.Errorf("agent API server: %v", err)
			}
		})
	}
	c.list = c.conflist(opts, dir)
	return c
}

// conflist builds the network config list: bridge with host-local (IPv4
// and IPv6), then meshsplice-cni.
func (c *chain) conflist(opts chainOpts, dir string) *libcni.NetworkConfigList {
	c.t.Helper()
	ms := map[string]any{
		"type":         "meshsplice-cni",
		"agentSocket":  c.socket,
		"timeout":      "5s",
		"logFile":      c.logFile,
		"annotations":  map[string]string{"meshsplice.io/splice": "disabled", "owner": "config"},
		"capabilities": map[string]bool{cni.PodAnnotationsCapability: true},
	}
	if opts.unreachable != "" {
		ms["agentUnreachable"] = opts.unreachable
	}
	for k, v := range opts.meshsplice {
		ms[k] = v
	}
	var plugins []any
	if !opts.noInterfacePlugin {
		plugins = append(plugins, map[string]any{
			"type":      "bridge",
			"bridge":    bridgeName,
			"isGateway": true,
			"ipMasq":    false,
			"ipam": map[string]any{
				"type":    "host-local",
				"ranges":  [][]map[string]string{{{"subnet": subnetV4}}, {{"subnet": subnetV6}}},
				"dataDir": filepath.Join(dir, "ipam"),
			},
		})
	}
	plugins = append(plugins, ms)
	b, err := json.Marshal(map[string]any{"cniVersion": c.version, "name": network, "plugins": plugins})
	if err != nil {
		c.t.Fatal(err)
	}
	list, err := libcni.NetworkConfFromBytes(b)
	if err != nil {
		c.t.Fatalf("parse conflist: %v\n%s", err, b)
	}
	return list
}

// withList returns a copy of the chain whose meshsplice-cni config has the
// extra fields.
func (c *chain) withList(opts chainOpts) *chain {
	c2 := *c
	c2.list = c.conflist(opts, filepath.Dir(c.socket))
	return &c2
}

// runtimeConf is how a runtime describes the pod to libcni.
func (c *chain) runtimeConf(pod *testnet.NetNS, id string) *libcni.RuntimeConf {
	return &libcni.RuntimeConf{
		ContainerID: id,
		NetNS:       pod.Path(),
		IfName:      "eth0",
		Args: [][2]string{
			{"IgnoreUnknown", "1"},
			{"K8S_POD_NAMESPACE", "shop"},
			{"K8S_POD_NAME", "web-" + id},
			{"K8S_POD_INFRA_CONTAINER_ID", id},
			{"K8S_POD_UID", "uid-" + id},
			{"K8S_POD_SERVICE_ACCOUNT", "web"},
		},
		CapabilityArgs: map[string]any{
			cni.PodAnnotationsCapability: map[string]string{
				"sidecar.istio.io/status": `{"containers":["istio-proxy"]}`,
				"owner":                   "pod",
			},
		},
	}
}

// inNode runs fn in the node namespace, so that the plugins libcni starts
// run there.
func (c *chain) inNode(fn func(ctx context.Context) error) error {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	return c.node.Do(func() error { return fn(ctx) })
}

func (c *chain) add(pod *testnet.NetNS, id string) (types.Result, error) {
	var res types.Result
	err := c.inNode(func(ctx context.Context) (err error) {
		res, err = c.cni.AddNetworkList(ctx, c.list, c.runtimeConf(pod, id))
		return err
	})
	return res, err
}

func (c *chain) check(pod *testnet.NetNS, id string) error {
	return c.inNode(func(ctx context.Context) error {
		return c.cni.CheckNetworkList(ctx, c.list, c.runtimeConf(pod, id))
	})
}

func (c *chain) del(pod *testnet.NetNS, id string) error {
	return c.inNode(func(ctx context.Context) error {
		return c.cni.DelNetworkList(ctx, c.list, c.runtimeConf(pod, id))
	})
}

func (c *chain) status() error {
	return c.inNode(func(ctx context.Context) error {
		return c.cni.GetStatusNetworkList(ctx, c.list)
	})
}

// mustAdd adds the pod, checks the result's version and returns the result
// converted to the current format. It registers a DEL in the cleanup, as a
// runtime would when tearing the pod down; that DEL is a repeated one for
// tests that delete the pod themselves.
func (c *chain) mustAdd(pod *testnet.NetNS, id string) *current.Result {
	c.t.Helper()
	c.t.Cleanup(func() {
		if err := c.del(pod, id); err != nil {
			c.t.Errorf("cleanup: DEL %s: %v", id, err)
		}
	})
	res, err := c.add(pod, id)
	if err != nil {
		c.t.Fatalf("ADD %s: %v", id, err)
	}
	if res.Version() != c.version {
		c.t.Errorf("ADD %s: result version %s, want %s", id, res.Version(), c.version)
	}
	cur, err := current.NewResultFromResult(res)
	if err != nil {
		c.t.Fatal(err)
	}
	return cur
}

// eth0Addrs reads the global addresses of eth0 in the pod.
func eth0Addrs(tb testing.TB, pod *testnet.NetNS) []netip.Addr {
	tb.Helper()
	h := pod.Netlink(tb)
	link, err := h.LinkByName("eth0")
	if err != nil {
		tb.Fatalf("pod %s: %v", pod, err)
	}
	addrs, err := h.AddrList(link, netlink.FAMILY_ALL)
	if err != nil {
		tb.Fatal(err)
	}
	var out []netip.Addr
	for _, a := range addrs {
		if a.Scope != unix.RT_SCOPE_UNIVERSE {
			continue
		}
		ip, _ := netip.AddrFromSlice(a.IP)
		out = append(out, ip.Unmap())
	}
	slices.SortFunc(out, netip.Addr.Compare)
	return out
}

// removeNetNS deletes a pod's namespace before DEL, as when a runtime
// crashed or the node rebooted; its cleanup then finds nothing to do.
func removeNetNS(tb testing.TB, ns *testnet.NetNS) {
	tb.Helper()
	if err := unix.Unmount(ns.Path(), unix.MNT_DETACH); err != nil {
		tb.Fatalf("unmount %s: %v", ns.Path(), err)
	}
	if err := os.Remove(ns.Path()); err != nil {
		tb.Fatal(err)
	}
}

func logText(tb testing.TB, c *chain) string {
	tb.Helper()
	b, err := os.ReadFile(c.logFile)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		tb.Fatal(err)
	}
	return string(b)
}

func TestChain(t *testing.T) {
	for _, v := range versions {
		t.Run(v, func(t *testing.T) {
			t.Parallel()
			c := newChain(t, v, chainOpts{})
			hasCheck, err := version.GreaterThanOrEqualTo(v, "0.4.0")
			if err != nil {
				t.Fatal(err)
			}

			// ADD registers.
			pod := testnet.NewNetNS(t, "cni")
			res := c.mustAdd(pod, "c1")
			podIPs := eth0Addrs(t, pod)
			if len(podIPs) != 2 {
				t.Fatalf("eth0 has addresses %v, want an IPv4 and an IPv6 one", podIPs)
			}
			st, ok := c.reg.Pod("c1")
			if !ok {
				t.Fatalf("ADD did not register the pod; plugin log:\n%s", logText(t, c))
			}
			got := slices.Clone(st.Pod.IPs)
			slices.SortFunc(got, netip.Addr.Compare)
			if !slices.Equal(got, podIPs) {
				t.Errorf("registered IPs %v, the pod's eth0 has %v", st.Pod.IPs, podIPs)
			}
			want := api.PodRegistration{
				ContainerID: "c1", Netns: pod.Path(), IfName: "eth0", IPs: st.Pod.IPs,
				PodName: "web-c1", PodNamespace: "shop", PodUID: "uid-c1", ServiceAccount: "web",
				Annotations: map[string]string{
					"sidecar.istio.io/status": `{"containers":["istio-proxy"]}`,
					"meshsplice.io/splice":    "disabled",
					"owner":                   "pod",
				},
				Network: network,
			}
			assertRegistration(t, st.Pod, want)
			if !st.Capture || st.Splice {
				t.Errorf("capture=%v splice=%v, want true false from the annotations", st.Capture, st.Splice)
			}
			// The result is the bridge plugin's: bridge, host veth, eth0.
			var sandboxes []string
			for _, i := range res.Interfaces {
				sandboxes = append(sandboxes, i.Name+"@"+i.Sandbox)
			}
			if len(res.Interfaces) != 3 || res.Interfaces[0].Name != bridgeName || res.Interfaces[2].Sandbox != pod.Path() || len(res.IPs) != 2 {
				t.Errorf("result is not the bridge plugin's: interfaces %v, %d IPs", sandboxes, len(res.IPs))
			}
			// The bridge is in the node namespace, not on the host.
			if _, err := c.node.Netlink(t).LinkByName(bridgeName); err != nil {
				t.Errorf("bridge not in the node namespace: %v", err)
			}
			if _, err := netlink.LinkByName(bridgeName); err == nil {
				t.Errorf("bridge %s appeared in the host namespace", bridgeName)
			}

			// CHECK verifies.
			if hasCheck {
				if err := c.check(pod, "c1"); err != nil {
					t.Errorf("CHECK: %v", err)
				}
				// The agent lost the pod: CHECK says so.
				if err := c.reg.RemovePod(context.Background(), "c1"); err != nil {
					t.Fatal(err)
				}
				err := c.check(pod, "c1")
				assertCNIError(t, err, types.ErrUnknownContainer, "no registration for shop/web-c1")
				if _, err := c.reg.AddPod(context.Background(), st.Pod); err != nil {
					t.Fatal(err)
				}
			} else if err := c.check(pod, "c1"); !errors.Is(err, libcni.ErrorCheckNotSupp) {
				t.Errorf("CHECK with %s: %v, want libcni's not supported", v, err)
			}

			// DEL removes, and again.
			for i := range 2 {
				if err := c.del(pod, "c1"); err != nil {
					t.Fatalf("DEL #%d: %v", i+1, err)
				}
				if _, ok := c.reg.Pod("c1"); ok {
					t.Fatalf("DEL #%d left the pod registered", i+1)
				}
			}

			// DEL after the namespace is gone.
			gone := testnet.NewNetNS(t, "cni")
			c.mustAdd(gone, "c2")
			if _, ok := c.reg.Pod("c2"); !ok {
				t.Fatal("ADD c2 did not register the pod")
			}
			removeNetNS(t, gone)
			if err := c.del(gone, "c2"); err != nil {
				t.Fatalf("DEL after the namespace is gone: %v", err)
			}
			if _, ok := c.reg.Pod("c2"); ok {
				t.Fatal("DEL after the namespace is gone left the pod registered")
			}

			// Bad config: a clear error naming the fields.
			bad := c.withList(chainOpts{meshsplice: map[string]any{"agentUnreachable": "sometimes", "timeout": "soon"}})
			pod3 := testnet.NewNetNS(t, "cni")
			_, err = bad.add(pod3, "c3")
			assertCNIError(t, err, types.ErrInvalidNetworkConfig,
				`agentUnreachable: "sometimes" is not one of "fail", "pass"`, `timeout: "soon" is not a duration`)
			// The runtime cleans up after a failed ADD with a DEL, which
			// reports the same error; bridge and host-local are cleaned by
			// a DEL with the good config.
			assertCNIError(t, bad.del(pod3, "c3"), types.ErrInvalidNetworkConfig, "agentUnreachable")
			if err := c.del(pod3, "c3"); err != nil {
				t.Errorf("DEL c3: %v", err)
			}
			if n := len(c.reg.Pods()); n != 0 {
				t.Errorf("%d pods registered at the end", n)
			}

			if v == "1.1.0" {
				if err := c.status(); err != nil {
					t.Errorf("STATUS with the agent up: %v", err)
				}
			}
			if log := logText(t, c); !strings.Contains(log, `"msg":"pod registered"`) || !strings.Contains(log, `"msg":"pod unregistered"`) {
				t.Errorf("plugin log lacks registrations:\n%s", log)
			}
		})
	}
}

func assertRegistration(tb testing.TB, got, want api.PodRegistration) {
	tb.Helper()
	g, _ := json.Marshal(got)
	w, _ := json.Marshal(want)
	if string(g) != string(w) {
		tb.Errorf("registration\n got %s\nwant %s", g, w)
	}
}

// assertCNIError asserts that err, as libcni returns it, carries the
// plugin's *types.Error with the code and message parts.
func assertCNIError(tb testing.TB, err error, code uint, msg ...string) {
	tb.Helper()
	var e *types.Error
	if !errors.As(err, &e) {
		tb.Fatalf("error %v (%T) does not carry a *types.Error", err, err)
	}
	if e.Code != code {
		tb.Errorf("error code %d, want %d: %v", e.Code, code, err)
	}
	for _, m := range msg {
		if !strings.Contains(e.Msg, m) {
			tb.Errorf("error %q does not contain %q", e.Msg, m)
		}
	}
}

func TestChainAgentDown(t *testing.T) {
	for _, v := range []string{"0.3.1", "1.1.0"} {
		for _, policy := range []string{"fail", "pass"} {
			t.Run(v+"/"+policy, func(t *testing.T) {
				t.Parallel()
				c := newChain(t, v, chainOpts{agentDown: true, unreachable: policy})
				pod := testnet.NewNetNS(t, "cni")
				res, err := c.add(pod, "c1")
				// DEL succeeds with the agent down, whatever the policy.
				t.Cleanup(func() {
					if err := c.del(pod, "c1"); err != nil {
						t.Errorf("DEL with the agent down: %v", err)
					}
				})
				if policy == "fail" {
					assertCNIError(t, err, types.ErrTryAgainLater,
						"meshsplice agent not reachable at "+c.socket+": dial unix "+c.socket,
						"is the meshsplice agent running?",
						`set "agentUnreachable": "pass" in the meshsplice-cni network config to let pods start unmeshed`)
					if v == "1.1.0" {
						assertCNIError(t, c.status(), types.ErrPluginNotAvailable, "meshsplice agent not reachable")
					}
					return
				}
				if err != nil {
					t.Fatalf("ADD with agentUnreachable pass: %v", err)
				}
				if cur, err := current.NewResultFromResult(res); err != nil || len(cur.IPs) != 2 {
					t.Errorf("ADD with agentUnreachable pass returned %v (%v), want the bridge result", res, err)
				}
				if log := logText(t, c); !strings.Contains(log, "the pod starts unmeshed") || !strings.Contains(log, c.socket) {
					t.Errorf("the plugin log does not say why the pod is unmeshed:\n%s", log)
				}
				if v == "1.1.0" {
					if err := c.status(); err != nil {
						t.Errorf("STATUS with agentUnreachable pass: %v", err)
					}
				}
			})
		}
	}
}

func TestChainStatus(t *testing.T) {
	c := newChain(t, "1.1.0", chainOpts{})
	if err := c.status(); err != nil {
		t.Fatalf("STATUS with the agent up: %v", err)
	}
	c.reg.SetReady(false)
	assertCNIError(t, c.status(), types.ErrPluginNotAvailable, "is not ready")
	c.reg.SetReady(true)
	if err := c.srv.Close(); err != nil {
		t.Fatal(err)
	}
	assertCNIError(t, c.status(), types.ErrPluginNotAvailable, "meshsplice agent not reachable at "+c.socket)
	if err := c.withList(chainOpts{unreachable: "pass"}).status(); err != nil {
		t.Errorf("STATUS with the agent down and agentUnreachable pass: %v", err)
	}
}

func TestChainNotChained(t *testing.T) {
	c := newChain(t, "1.0.0", chainOpts{noInterfacePlugin: true})
	pod := testnet.NewNetNS(t, "cni")
	_, err := c.add(pod, "c1")
	assertCNIError(t, err, types.ErrInvalidNetworkConfig, "meshsplice-cni must be chained after an interface plugin (no prevResult)")
	if err := c.del(pod, "c1"); err != nil {
		t.Errorf("DEL: %v", err)
	}
}
