package cni_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/meshsplice/meshsplice/agent/api"
	"github.com/meshsplice/meshsplice/agent/api/apitest"
	"github.com/meshsplice/meshsplice/cni"
)

// These tests call the plugin's commands in-process, with an agent API
// server on a unix socket in the test process; chain_test.go runs the real
// binary through libcni.

var versions = []string{"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"}

const (
	testNetns       = "/var/run/netns/cni-test"
	testContainerID = "c0ffee"
	testArgs        = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=c0ffee;K8S_POD_UID=6f1e;K8S_POD_SERVICE_ACCOUNT=web"
)

// tempDir returns a short temporary directory (socket paths must fit
// sun_path), removed by the cleanup.
func tempDir(tb testing.TB) string {
	tb.Helper()
	dir, err := os.MkdirTemp("", "ms-cni-")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// startAgent serves reg on a fresh socket and returns its path. The server
// is closed, and the socket removed, by the cleanup.
func startAgent(tb testing.TB, reg api.Registry) string {
	tb.Helper()
	path := filepath.Join(tempDir(tb), "cni.sock")
	srv, err := api.Listen(path, reg, nil)
	if err != nil {
		tb.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve() }()
	tb.Cleanup(func() {
		srv.Close()
		if err := <-done; err != nil {
			tb.Errorf("agent API server: %v", err)
		}
	})
	return path
}

// missingSocket returns a socket path nobody listens on.
func missingSocket(tb testing.TB) string {
	return filepath.Join(tempDir(tb), "nobody.sock")
}

// prevResult is what a bridge plugin would return: the bridge, the host
// veth and eth0 in the pod, addresses on eth0 and one on the bridge.
func prevResult() *current.Result {
	ipnet := func(s string) net.IPNet {
		ip, n, err := net.ParseCIDR(s)
		if err != nil {
			panic(err)
		}
		n.IP = ip
		return *n
	}
	return &current.Result{
		CNIVersion: "1.1.0",
		Interfaces: []*current.Interface{
			{Name: "cni0", Mac: "02:00:00:00:00:01"},
			{Name: "veth0a1b2c3d", Mac: "02:00:00:00:00:02"},
			{Name: "eth0", Mac: "02:00:00:00:00:03", Sandbox: testNetns},
		},
		IPs: []*current.IPConfig{
			{Interface: current.Int(2), Address: ipnet("10.22.0.5/24"), Gateway: net.ParseIP("10.22.0.1")},
			{Interface: current.Int(0), Address: ipnet("10.22.0.1/24")},
			{Interface: current.Int(2), Address: ipnet("fd00:22::5/64"), Gateway: net.ParseIP("fd00:22::1")},
		},
		Routes: []*types.Route{{Dst: ipnet("0.0.0.0/0"), GW: net.ParseIP("10.22.0.1")}},
		DNS:    types.DNS{Nameservers: []string{"10.22.0.1"}},
	}
}

var wantIPs = []netip.Addr{netip.MustParseAddr("10.22.0.5"), netip.MustParseAddr("fd00:22::5")}

// netConf returns the plugin's config for version v, with prev (converted
// to v) as prevResult unless nil, and extra fields.
func netConf(tb testing.TB, v string, prev types.Result, extra map[string]any) []byte {
	tb.Helper()
	conf := map[string]any{
		"cniVersion": v,
		"name":       "meshnet",
		"type":       "meshsplice-cni",
	}
	if prev != nil {
		r, err := prev.GetAsVersion(v)
		if err != nil {
			tb.Fatal(err)
		}
		conf["prevResult"] = r
	}
	for k, val := range extra {
		conf[k] = val
	}
	b, err := json.Marshal(conf)
	if err != nil {
		tb.Fatal(err)
	}
	return b
}

func cmdArgs(stdin []byte) *skel.CmdArgs {
	return &skel.CmdArgs{
		ContainerID: testContainerID,
		Netns:       testNetns,
		IfName:      "eth0",
		Args:        testArgs,
		Path:        "/opt/cni/bin",
		StdinData:   stdin,
	}
}

type testPlugin struct {
	cni.Plugin
	stdout, stderr bytes.Buffer
}

func newPlugin() *testPlugin {
	p := &testPlugin{}
	p.Plugin = cni.Plugin{Stdout: &p.stdout, Stderr: &p.stderr}
	return p
}

// cniError asserts that err is a *types.Error with the code and message
// parts.
func cniError(tb testing.TB, err error, code uint, msg ...string) {
	tb.Helper()
	var e *types.Error
	if !errors.As(err, &e) {
		tb.Fatalf("error %v (%T) is not a *types.Error", err, err)
	}
	if e.Code != code {
		tb.Errorf("error code %d, want %d: %s", e.Code, code, e.Msg)
	}
	for _, m := range msg {
		if !strings.Contains(e.Msg, m) {
			tb.Errorf("error %q does not contain %q", e.Msg, m)
		}
	}
}

func TestAddPerVersion(t *testing.T) {
	for _, v := range versions {
		t.Run(v, func(t *testing.T) {
			reg := &apitest.MemRegistry{}
			socket := startAgent(t, reg)
			stdin := netConf(t, v, prevResult(), map[string]any{
				"agentSocket": socket,
				"annotations": map[string]string{"meshsplice.io/splice": "disabled", "team": "a"},
				"runtimeConfig": map[string]any{
					cni.PodAnnotationsCapability: map[string]string{"sidecar.istio.io/status": "{}", "team": "b"},
				},
			})
			p := newPlugin()
			if err := p.Add(cmdArgs(stdin)); err != nil {
				t.Fatalf("ADD: %v", err)
			}
			st, ok := reg.Pod(testContainerID)
			if !ok {
				t.Fatal("ADD did not register the pod")
			}
			want := api.PodRegistration{
				ContainerID: testContainerID, Netns: testNetns, IfName: "eth0", IPs: wantIPs,
				PodName: "web-0", PodNamespace: "shop", PodUID: "6f1e", ServiceAccount: "web",
				Annotations: map[string]string{"meshsplice.io/splice": "disabled", "sidecar.istio.io/status": "{}", "team": "b"},
				Network:     "meshnet",
			}
			if !reflect.DeepEqual(st.Pod, want) {
				t.Errorf("registered\n %+v\nwant\n %+v", st.Pod, want)
			}
			if !st.Capture || st.Splice {
				t.Errorf("capture=%v splice=%v, want the annotations applied (true, false)", st.Capture, st.Splice)
			}

			// The result is prevResult, unchanged.
			var in struct {
				PrevResult map[string]any `json:"prevResult"`
			}
			if err := json.Unmarshal(stdin, &in); err != nil {
				t.Fatal(err)
			}
			var out map[string]any
			if err := json.Unmarshal(p.stdout.Bytes(), &out); err != nil {
				t.Fatalf("stdout %q is not a JSON result: %v", p.stdout.String(), err)
			}
			if !reflect.DeepEqual(out, in.PrevResult) {
				t.Errorf("result\n %s\nis not prevResult\n %s", p.stdout.Bytes(), mustJSON(in.PrevResult))
			}
			if out["cniVersion"] != v {
				t.Errorf("result cniVersion %v, want %s", out["cniVersion"], v)
			}
			if p.stderr.Len() != 0 {
				t.Errorf("stderr: %s", p.stderr.String())
			}
		})
	}
}

func mustJSON(v any) []byte {
	b, _ := json.Marshal(v)
	return b
}

func TestAddPicksPodIPs(t *testing.T) {
	tests := []struct {
		name   string
		mutate func(r *current.Result)
		want   []string
	}{
		{"sandbox matches", func(*current.Result) {}, []string{"10.22.0.5", "fd00:22::5"}},
		{"no sandbox anywhere: all addresses", func(r *current.Result) {
			r.Interfaces[2].Sandbox = ""
		}, []string{"10.22.0.5", "10.22.0.1", "fd00:22::5"}},
		{"no interface indexes: all addresses", func(r *current.Result) {
			for _, ip := range r.IPs {
				ip.Interface = nil
			}
		}, []string{"10.22.0.5", "10.22.0.1", "fd00:22::5"}},
		{"index out of range is ignored", func(r *current.Result) {
			r.IPs[1].Interface = current.Int(7)
		}, []string{"10.22.0.5", "fd00:22::5"}},
		{"sandbox path spelled differently", func(r *current.Result) {
			r.Interfaces[2].Sandbox = "/var/run/netns//cni-test/"
		}, []string{"10.22.0.5", "fd00:22::5"}},
		{"duplicates collapse", func(r *current.Result) {
			r.IPs = append(r.IPs, r.IPs[0])
		}, []string{"10.22.0.5", "fd00:22::5"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			reg := &apitest.MemRegistry{}
			socket := startAgent(t, reg)
			prev := prevResult()
			tt.mutate(prev)
			p := newPlugin()
			if err := p.Add(cmdArgs(netConf(t, "1.0.0", prev, map[string]any{"agentSocket": socket}))); err != nil {
				t.Fatalf("ADD: %v", err)
			}
			st, _ := reg.Pod(testContainerID)
			var got []string
			for _, a := range st.Pod.IPs {
				got = append(got, a.String())
			}
			if !slices.Equal(got, tt.want) {
				t.Errorf("registered IPs %v, want %v", got, tt.want)
			}
		})
	}
}

func TestAddErrors(t *testing.T) {
	reg := &apitest.MemRegistry{}
	socket := startAgent(t, reg)
	noIPs := prevResult()
	noIPs.IPs = nil
	tests := []struct {
		name  string
		stdin []byte
		args  string
		code  uint
		msg   []string
	}{
		{"no prevResult", netConf(t, "1.0.0", nil, map[string]any{"agentSocket": socket}), testArgs,
			types.ErrInvalidNetworkConfig, []string{"meshsplice-cni must be chained after an interface plugin (no prevResult)"}},
		{"no addresses", netConf(t, "1.0.0", noIPs, map[string]any{"agentSocket": socket}), testArgs,
			types.ErrInvalidNetworkConfig, []string{"ips: at least one pod IP is required", "assigned none"}},
		{"bad CNI_ARGS", netConf(t, "1.0.0", prevResult(), map[string]any{"agentSocket": socket}), "K8S_POD_NAME",
			types.ErrInvalidEnvironmentVariables, []string{`CNI_ARGS: "K8S_POD_NAME" is not KEY=VALUE`}},
		{"agent rejects the annotations", netConf(t, "1.0.0", prevResult(), map[string]any{
			"agentSocket":   socket,
			"runtimeConfig": map[string]any{cni.PodAnnotationsCapability: map[string]string{"traffic.sidecar.istio.io/excludeInboundPorts": "99999"}},
		}), testArgs, types.ErrInternal, []string{"register shop/web-0 with the meshsplice agent", "excludeInboundPorts", "99999"}},
		{"pod annotations not strings", netConf(t, "1.0.0", prevResult(), map[string]any{
			"agentSocket":   socket,
			"runtimeConfig": map[string]any{cni.PodAnnotationsCapability: map[string]any{"a": 1}},
		}), testArgs, types.ErrInvalidNetworkConfig, []string{"runtimeConfig.io.kubernetes.cri.pod-annotations"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := newPlugin()
			args := cmdArgs(tt.stdin)
			args.Args = tt.args
			cniError(t, p.Add(args), tt.code, tt.msg...)
			if p.stdout.Len() != 0 {
				t.Errorf("a failed ADD wrote %q to stdout", p.stdout.String())
			}
			if n := len(reg.Pods()); n != 0 {
				t.Errorf("a failed ADD registered %d pods", n)
			}
		})
	}
}

func TestConfig(t *testing.T) {
	dflt, err := cni.ParseConfig([]byte(`{"cniVersion":"1.0.0","name":"n","type":"meshsplice-cni"}`))
	if err != nil {
		t.Fatal(err)
	}
	want := &cni.Config{CNIVersion: "1.0.0", Network: "n", Socket: api.DefaultSocket, Unreachable: cni.Fail, Timeout: cni.DefaultTimeout}
	if !reflect.DeepEqual(dflt, want) {
		t.Errorf("defaults: %+v, want %+v", dflt, want)
	}
	full, err := cni.ParseConfig([]byte(`{"cniVersion":"1.0.0","name":"n","type":"meshsplice-cni",
		"agentSocket":"/run/x.sock","agentUnreachable":"pass","timeout":"1.5s","logFile":"/var/log/x.log","annotations":{"a":"1"}}`))
	if err != nil {
		t.Fatal(err)
	}
	want = &cni.Config{CNIVersion: "1.0.0", Network: "n", Socket: "/run/x.sock", Unreachable: cni.Pass,
		Timeout: 1500 * time.Millisecond, LogFile: "/var/log/x.log", Annotations: map[string]string{"a": "1"}}
	if !reflect.DeepEqual(full, want) {
		t.Errorf("full: %+v, want %+v", full, want)
	}

	long := "/" + strings.Repeat("s", 120)
	tests := []struct {
		name   string
		fields string
		code   uint
		msg    []string
	}{
		{"unknown agentUnreachable", `"agentUnreachable":"maybe"`, types.ErrInvalidNetworkConfig,
			[]string{`agentUnreachable: "maybe" is not one of "fail", "pass"`}},
		{"bad timeout", `"timeout":"soon"`, types.ErrInvalidNetworkConfig, []string{`timeout: "soon" is not a duration`}},
		{"negative timeout", `"timeout":"-1s"`, types.ErrInvalidNetworkConfig, []string{`timeout: "-1s" must be positive`}},
		{"timeout as number", `"timeout":5`, types.ErrInvalidNetworkConfig, []string{"timeout: JSON number where a string is expected"}},
		{"relative socket", `"agentSocket":"cni.sock"`, types.ErrInvalidNetworkConfig, []string{`agentSocket: "cni.sock" must be an absolute path`}},
		{"long socket", `"agentSocket":"` + long + `"`, types.ErrInvalidNetworkConfig, []string{"agentSocket", "longer than 107 bytes"}},
		{"relative log file", `"logFile":"cni.log"`, types.ErrInvalidNetworkConfig, []string{`logFile: "cni.log" must be an absolute path`}},
		{"empty annotation name", `"annotations":{"":"x"}`, types.ErrInvalidNetworkConfig, []string{"annotations"}},
		{"capabilities not booleans", `"capabilities":{"a":"x"}`, types.ErrInvalidNetworkConfig,
			[]string{"invalid network config: capabilities: JSON string where a boolean is expected"}},
		{"annotations not an object", `"annotations":[1]`, types.ErrInvalidNetworkConfig, []string{"annotations: JSON array where an object is expected"}},
		{"annotations not strings", `"annotations":{"a":true}`, types.ErrInvalidNetworkConfig, []string{"annotations: JSON bool where a string is expected"}},
		{"every bad field at once", `"agentUnreachable":"x","timeout":"y"`, types.ErrInvalidNetworkConfig, []string{"agentUnreachable", "timeout"}},
		{"bad prevResult", `"prevResult":{"ips":"nope"}`, types.ErrDecodingFailure, []string{"prevResult"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			stdin := []byte(`{"cniVersion":"1.0.0","name":"n","type":"meshsplice-cni",` + tt.fields + `}`)
			_, err := cni.ParseConfig(stdin)
			cniError(t, err, tt.code, tt.msg...)
			// Every command reports it.
			p := newPlugin()
			args := cmdArgs(stdin)
			for name, cmd := range map[string]func(*skel.CmdArgs) error{"ADD": p.Add, "CHECK": p.Check, "DEL": p.Del, "STATUS": p.Status} {
				var e *types.Error
				if err := cmd(args); !errors.As(err, &e) || e.Code != tt.code {
					t.Errorf("%s: %v, want code %d", name, err, tt.code)
				}
			}
		})
	}
	_, err = cni.ParseConfig([]byte(`{`))
	cniError(t, err, types.ErrDecodingFailure, "parse network config")
}

func TestAgentDown(t *testing.T) {
	notReady := &apitest.MemRegistry{}
	notReady.SetReady(false)
	downs := map[string]func(testing.TB) string{
		"unreachable": missingSocket,
		"not ready":   func(tb testing.TB) string { return startAgent(tb, notReady) },
	}
	for name, socketFor := range downs {
		t.Run(name, func(t *testing.T) {
			socket := socketFor(t)
			for _, policy := range []string{"fail", "pass"} {
				t.Run(policy, func(t *testing.T) {
					stdin := netConf(t, "1.1.0", prevResult(), map[string]any{"agentSocket": socket, "agentUnreachable": policy})
					p := newPlugin()
					args := cmdArgs(stdin)
					errAdd := p.Add(args)
					errCheck := p.Check(args)
					errStatus := p.Status(args)
					// DEL never waits for the agent.
					if err := p.Del(args); err != nil {
						t.Errorf("DEL: %v", err)
					}
					if policy == "fail" {
						want := []string{`set "agentUnreachable": "pass" in the meshsplice-cni network config to let pods start unmeshed`}
						if name == "unreachable" {
							want = append(want, "meshsplice agent not reachable at "+socket+": dial unix "+socket,
								"is the meshsplice agent running?")
						} else {
							want = append(want, "meshsplice agent at "+socket+" is not ready", "retry later")
						}
						cniError(t, errAdd, types.ErrTryAgainLater, want...)
						if name == "unreachable" {
							cniError(t, errCheck, types.ErrTryAgainLater, want...)
						} else {
							// The agent answers CHECK: it does not have the pod.
							cniError(t, errCheck, types.ErrUnknownContainer, "no registration")
						}
						cniError(t, errStatus, types.ErrPluginNotAvailable, want...)
						if p.stdout.Len() != 0 {
							t.Errorf("a failed ADD wrote %q to stdout", p.stdout.String())
						}
						return
					}
					for cmd, err := range map[string]error{"ADD": errAdd, "CHECK": errCheck, "STATUS": errStatus} {
						if err != nil {
							t.Errorf("%s with agentUnreachable pass: %v", cmd, err)
						}
					}
					if !json.Valid(p.stdout.Bytes()) || !strings.Contains(p.stdout.String(), "10.22.0.5") {
						t.Errorf("ADD with agentUnreachable pass did not print the result: %q", p.stdout.String())
					}
					if !strings.Contains(p.stderr.String(), "the pod starts unmeshed") {
						t.Errorf("ADD did not log why the pod runs unmeshed; stderr: %s", p.stderr.String())
					}
				})
			}
		})
	}
}

// slowRegistry does not answer AddPod before the request is cancelled.
type slowRegistry struct{ apitest.MemRegistry }

func (s *slowRegistry) AddPod(ctx context.Context, _ api.PodRegistration) (api.PodStatus, error) {
	<-ctx.Done()
	return api.PodStatus{}, ctx.Err()
}

func TestAddTimeout(t *testing.T) {
	socket := startAgent(t, &slowRegistry{})
	for _, policy := range []string{"fail", "pass"} {
		t.Run(policy, func(t *testing.T) {
			stdin := netConf(t, "1.0.0", prevResult(), map[string]any{"agentSocket": socket, "timeout": "200ms", "agentUnreachable": policy})
			start := time.Now()
			err := newPlugin().Add(cmdArgs(stdin))
			// A stuck agent may have half-registered the pod: never pass.
			cniError(t, err, types.ErrTryAgainLater, "did not answer", "timeout 200ms")
			if d := time.Since(start); d > 5*time.Second {
				t.Errorf("ADD took %v with a 200ms timeout", d)
			}
		})
	}
}

func TestCheck(t *testing.T) {
	for _, v := range []string{"0.4.0", "1.0.0", "1.1.0"} {
		t.Run(v, func(t *testing.T) {
			reg := &apitest.MemRegistry{}
			socket := startAgent(t, reg)
			conf := func(policy string) []byte {
				return netConf(t, v, prevResult(), map[string]any{"agentSocket": socket, "agentUnreachable": policy})
			}
			p := newPlugin()
			if err := p.Add(cmdArgs(conf("fail"))); err != nil {
				t.Fatal(err)
			}
			if err := p.Check(cmdArgs(conf("fail"))); err != nil {
				t.Fatalf("CHECK of a registered pod: %v", err)
			}
			// Without prevResult.
			cniError(t, p.Check(cmdArgs(netConf(t, v, nil, map[string]any{"agentSocket": socket}))),
				types.ErrInvalidNetworkConfig, "no prevResult")

			// The agent has other addresses.
			st, _ := reg.Pod(testContainerID)
			other := st.Pod
			other.IPs = []netip.Addr{netip.MustParseAddr("10.22.0.99")}
			if _, err := reg.AddPod(context.Background(), other); err != nil {
				t.Fatal(err)
			}
			cniError(t, p.Check(cmdArgs(conf("fail"))), types.ErrInternal, "IPs [10.22.0.99]", "IPs [10.22.0.5 fd00:22::5]")
			// Same addresses, other order: fine.
			other.IPs = []netip.Addr{wantIPs[1], wantIPs[0]}
			if _, err := reg.AddPod(context.Background(), other); err != nil {
				t.Fatal(err)
			}
			if err := p.Check(cmdArgs(conf("fail"))); err != nil {
				t.Errorf("CHECK with the addresses in another order: %v", err)
			}
			// Another namespace.
			other.Netns = "/var/run/netns/elsewhere"
			if _, err := reg.AddPod(context.Background(), other); err != nil {
				t.Fatal(err)
			}
			cniError(t, p.Check(cmdArgs(conf("fail"))), types.ErrInternal, "netns /var/run/netns/elsewhere")

			// The agent forgot the pod.
			if err := reg.RemovePod(context.Background(), testContainerID); err != nil {
				t.Fatal(err)
			}
			cniError(t, p.Check(cmdArgs(conf("fail"))), types.ErrUnknownContainer, "no registration for shop/web-0", "not meshed")
			if err := p.Check(cmdArgs(conf("pass"))); err != nil {
				t.Errorf("CHECK of an unmeshed pod with agentUnreachable pass: %v", err)
			}
		})
	}
}

func TestDel(t *testing.T) {
	for _, v := range versions {
		t.Run(v, func(t *testing.T) {
			reg := &apitest.MemRegistry{}
			socket := startAgent(t, reg)
			p := newPlugin()
			if err := p.Add(cmdArgs(netConf(t, v, prevResult(), map[string]any{"agentSocket": socket}))); err != nil {
				t.Fatal(err)
			}
			// DEL may come without prevResult (always before 0.4.0) and
			// without a namespace.
			for i, stdin := range [][]byte{
				netConf(t, v, prevResult(), map[string]any{"agentSocket": socket}),
				netConf(t, v, nil, map[string]any{"agentSocket": socket}),
			} {
				args := cmdArgs(stdin)
				args.Netns = ""
				p := newPlugin()
				if err := p.Del(args); err != nil {
					t.Fatalf("DEL #%d: %v", i+1, err)
				}
				if p.stdout.Len() != 0 {
					t.Errorf("DEL wrote %q to stdout", p.stdout.String())
				}
				if n := len(reg.Pods()); n != 0 {
					t.Fatalf("%d pods registered after DEL", n)
				}
			}
		})
	}
}

// removeFails fails RemovePod.
type removeFails struct{ apitest.MemRegistry }

func (r *removeFails) RemovePod(context.Context, string) error {
	return errors.New("detach netns program: device busy")
}

func TestDelAgentError(t *testing.T) {
	// An agent that answers with an error fails DEL, so the runtime retries.
	socket := startAgent(t, &removeFails{})
	err := newPlugin().Del(cmdArgs(netConf(t, "1.0.0", nil, map[string]any{"agentSocket": socket})))
	cniError(t, err, types.ErrInternal, "unregister container c0ffee", "device busy")
}

func TestStatus(t *testing.T) {
	reg := &apitest.MemRegistry{}
	socket := startAgent(t, reg)
	p := newPlugin()
	args := &skel.CmdArgs{Path: "/opt/cni/bin", StdinData: netConf(t, "1.1.0", nil, map[string]any{"agentSocket": socket})}
	if err := p.Status(args); err != nil {
		t.Fatalf("STATUS with the agent up: %v", err)
	}
	reg.SetReady(false)
	cniError(t, p.Status(args), types.ErrPluginNotAvailable, "is not ready")
}

func TestLogFile(t *testing.T) {
	reg := &apitest.MemRegistry{}
	socket := startAgent(t, reg)
	dir := tempDir(t)
	logFile := filepath.Join(dir, "log", "cni.log")
	p := newPlugin()
	if err := p.Add(cmdArgs(netConf(t, "1.0.0", prevResult(), map[string]any{"agentSocket": socket, "logFile": logFile}))); err != nil {
		t.Fatal(err)
	}
	down := missingSocket(t)
	if err := p.Add(cmdArgs(netConf(t, "1.0.0", prevResult(), map[string]any{"agentSocket": down, "logFile": logFile, "agentUnreachable": "pass"}))); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(logFile)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	if len(lines) != 2 {
		t.Fatalf("log has %d lines, want 2:\n%s", len(lines), b)
	}
	var first, second map[string]any
	if err := json.Unmarshal([]byte(lines[0]), &first); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal([]byte(lines[1]), &second); err != nil {
		t.Fatal(err)
	}
	if first["msg"] != "pod registered" || first["containerID"] != testContainerID || first["pod"] != "shop/web-0" || first["command"] != "ADD" {
		t.Errorf("first log line: %s", lines[0])
	}
	if second["level"] != "WARN" || !strings.Contains(second["msg"].(string), "unmeshed") || !strings.Contains(second["error"].(string), down) {
		t.Errorf("second log line: %s", lines[1])
	}
	if p.stderr.Len() != 0 {
		t.Errorf("stderr: %s", p.stderr.String())
	}

	// A log file that cannot be opened falls back to stderr.
	p = newPlugin()
	if err := p.Add(cmdArgs(netConf(t, "1.0.0", prevResult(), map[string]any{"agentSocket": socket, "logFile": dir}))); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(p.stderr.String(), "cannot open the log file") {
		t.Errorf("stderr %q does not say the log file failed", p.stderr.String())
	}
}
