// Package demo is `meshsplice demo`: a small local mesh on one host, built
// the way a node builds it. Two pods (network namespaces) get their
// interfaces from a real CNI chain (the bridge and host-local reference
// plugins, then meshsplice-cni, run through libcni); the meshsplice agent
// runs standalone with a folder of Istio YAML; each pod gets a test sidecar
// (uid 1337, Envoy's interception contract) and an echo app; traffic flows
// frontend -> backend; and the same requests are timed without sidecars,
// with Istio's own iptables rules, and with meshsplice. Everything it
// creates is named meshsplice-demo* and removed at the end, also on Ctrl-C.
package demo

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/containernetworking/cni/libcni"
	cnitypes100 "github.com/containernetworking/cni/pkg/types/100"
	"golang.org/x/sys/unix"

	"github.com/meshsplice/meshsplice/baseline"
	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/internal/cgroups"
	"github.com/meshsplice/meshsplice/internal/lab"
)

// Options configure Run.
type Options struct {
	// BinDir holds meshsplice, meshsplice-cni, mstest and, in BinDir/cni,
	// the reference plugins bridge and host-local (make demo builds them).
	BinDir string
	// Requests per mode and round in the latency comparison.
	Requests int
	// Rounds of the comparison (modes are interleaved in each round).
	Rounds int
	// Out receives the demo's progress and results.
	Out io.Writer
}

const (
	prefix     = "meshsplice-demo"
	appPort    = 8080
	proxyUID   = 1337
	appUID     = 1000
	metricAddr = "127.0.0.1:15298"
	subnet     = "10.250.0.0/24"
)

// world is what the demo created. Everything is registered with lab, which
// removes it in reverse order.
type world struct {
	stepNo   int
	opts     Options
	out      io.Writer
	lab      *lab.Lab
	pinDir   string
	cgroup   *lab.Cgroup
	runDir   string
	config   string
	node     *lab.Netns
	cni      *libcni.CNIConfig
	conflist *libcni.NetworkConfigList
	pods     []*pod
}

type pod struct {
	name    string
	netns   *lab.Netns
	ip      netip.Addr
	rt      *libcni.RuntimeConf
	sidecar *lab.Proc
}

// Run runs the demo and cleans up after itself, also when ctx is cancelled.
func Run(ctx context.Context, opts Options) (err error) {
	if opts.Requests <= 0 {
		opts.Requests = 2000
	}
	if opts.Rounds <= 0 {
		opts.Rounds = 3
	}
	if opts.Out == nil {
		opts.Out = os.Stdout
	}
	w := &world{opts: opts, out: opts.Out}
	defer func() {
		w.step("cleaning up")
		if cerr := w.cleanup(); cerr != nil {
			w.fail(cerr)
			err = errors.Join(err, cerr)
		} else {
			w.ok("nothing left: no %s* namespace, cgroup, pin or iptables rule", prefix)
		}
	}()
	steps := []struct {
		name string
		fn   func(context.Context) error
	}{
		{"checking the machine", w.preflight},
		{"starting the meshsplice agent", w.startAgent},
		{"creating two pods through CNI (bridge + host-local + meshsplice-cni)", w.createPods},
		{"starting sidecars (uid 1337) and echo apps (uid 1000)", w.startWorkloads},
		{"sending traffic frontend -> backend through both sidecars", w.traffic},
		{"timing the same requests: no sidecars, Istio iptables, meshsplice", w.compare},
		{"identity policy: an AuthorizationPolicy enforced in the kernel, sidecar included", w.policy},
	}
	for _, s := range steps {
		if err := ctx.Err(); err != nil {
			return err
		}
		w.step(s.name)
		if err := s.fn(ctx); err != nil {
			if ctx.Err() != nil {
				fmt.Fprintf(w.out, "    interrupted\n")
				return fmt.Errorf("interrupted: %w", ctx.Err())
			}
			w.fail(err)
			return err
		}
	}
	return nil
}

func (w *world) step(s string) {
	w.stepNo++
	fmt.Fprintf(w.out, "\n[%d] %s\n", w.stepNo, s)
}
func (w *world) ok(format string, a ...any) { fmt.Fprintf(w.out, "    ok: "+format+"\n", a...) }
func (w *world) info(format string, a ...any) {
	fmt.Fprintf(w.out, "    "+format+"\n", a...)
}
func (w *world) fail(err error) { fmt.Fprintf(w.out, "    FAILED: %v\n", err) }

func (w *world) bin(name string) string { return filepath.Join(w.opts.BinDir, name) }

func (w *world) preflight(ctx context.Context) error {
	if os.Geteuid() != 0 {
		return errors.New("the demo needs root: it creates network namespaces, a cgroup and BPF programs")
	}
	for _, b := range []string{"meshsplice", "meshsplice-cni", "mstest", "cni/bridge", "cni/host-local"} {
		if _, err := os.Stat(w.bin(b)); err != nil {
			return fmt.Errorf("missing %s: run `make demo`, which builds it (%w)", w.bin(b), err)
		}
	}
	for _, tool := range []string{"ip", "nsenter", "taskset", "iptables-restore"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("missing %s: hack/deps.sh demo (which make demo runs) installs it", tool)
		}
	}
	root, err := cgroups.Mount()
	if err != nil {
		return err
	}
	var uts unix.Utsname
	unix.Uname(&uts)
	w.ok("root, kernel %s, cgroup v2 at %s", unix.ByteSliceToString(uts.Release[:]), root)

	// A previous demo killed hard may have left things: remove them first.
	if left, err := lab.Leftovers(prefix); err == nil && len(left) > 0 {
		w.info("removing what an earlier demo left: %v", left)
		if err := lab.RemoveLeftovers(prefix, func(dir string) error { return lab.UnpinDir(dir, detach) }); err != nil {
			return fmt.Errorf("remove what an earlier demo left: %w", err)
		}
	}
	if w.lab, err = lab.Named(prefix, nil); err != nil {
		return err
	}
	if w.cgroup, err = w.lab.NewCgroup(); err != nil {
		return err
	}
	if w.pinDir, err = w.lab.PinDir(detach); err != nil {
		return err
	}
	if w.runDir, err = os.MkdirTemp("", prefix+"-"); err != nil {
		return err
	}
	w.lab.Defer("remove "+w.runDir, func() error { return os.RemoveAll(w.runDir) })
	return nil
}

// detach removes the datapath pinned at dir, agent or not.
func detach(dir string) error { return datapath.Detach(dir, time.Second) }

func (w *world) startAgent(ctx context.Context) error {
	w.config = filepath.Join(w.runDir, "istio")
	if err := os.MkdirAll(w.config, 0o755); err != nil {
		return err
	}
	mesh := "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: istio\n  namespace: istio-system\ndata:\n  mesh: |-\n    trustDomain: cluster.local\n"
	if err := os.WriteFile(filepath.Join(w.config, "mesh.yaml"), []byte(mesh), 0o644); err != nil {
		return err
	}
	if err := w.setSwitches(ctx, true, true, false); err != nil {
		return err
	}
	logf, err := w.logFile("agent")
	if err != nil {
		return err
	}
	agent, err := lab.Start(lab.ProcOpts{
		Name: "meshsplice agent",
		Args: []string{w.bin("meshsplice"), "agent", "--standalone", "--istio-config", w.config,
			"--cgroup", w.cgroup.Path, "--pin-dir", w.pinDir, "--cni-socket", w.socket(),
			"--state-dir", filepath.Join(w.runDir, "state"), "--metrics-addr", metricAddr},
		OnLine: func(_, line string) { fmt.Fprintln(logf, line) },
	})
	if err != nil {
		return err
	}
	// Before the pin directory's removal: the agent stops, the datapath
	// stays until detach.
	w.lab.Defer("stop the agent", func() error { agent.Stop(10 * time.Second); return nil })
	deadline := time.Now().Add(30 * time.Second)
	for {
		if resp, err := http.Get("http://" + metricAddr + "/readyz"); err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				break
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("agent not ready after 30s; its log: %s", logf.Name())
		}
		if err := sleep(ctx, 50*time.Millisecond); err != nil {
			return err
		}
	}
	w.ok("agent ready: programs attached to %s, pinned at %s; log %s", w.cgroup.Path, w.pinDir, logf.Name())
	w.info("metrics: curl http://%s/metrics   status: meshsplice status --pin-dir %s", metricAddr, w.pinDir)
	return nil
}

func (w *world) socket() string { return filepath.Join(w.runDir, "cni.sock") }

// setSwitches writes the meshsplice ConfigMap in the agent's config folder
// and, when wait is set, waits until the kernel shows the switches.
func (w *world) setSwitches(ctx context.Context, capture, splice, wait bool) error {
	word := func(b bool) string {
		if b {
			return "enabled"
		}
		return "disabled"
	}
	cm := fmt.Sprintf("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: meshsplice\n  namespace: istio-system\ndata:\n  capture: %s\n  splice: %s\n", word(capture), word(splice))
	tmp := filepath.Join(w.config, ".meshsplice.yaml.tmp")
	if err := os.WriteFile(tmp, []byte(cm), 0o644); err != nil {
		return err
	}
	if err := os.Rename(tmp, filepath.Join(w.config, "meshsplice.yaml")); err != nil {
		return err
	}
	if !wait {
		return nil
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		st, err := datapath.Inspect(w.pinDir)
		if err == nil && st.Node.Capture == capture && st.Node.Splice == splice {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the agent did not apply capture=%v splice=%v within 10s", capture, splice)
		}
		if err := sleep(ctx, 20*time.Millisecond); err != nil {
			return err
		}
	}
}

const conflist = `{
  "cniVersion": "1.1.0",
  "name": "meshsplice-demo",
  "plugins": [
    {"type": "bridge", "bridge": "msdemo0", "isGateway": true, "ipMasq": false,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "%s"}]], "dataDir": "%s"}},
    {"type": "meshsplice-cni", "agentSocket": "%s", "agentUnreachable": "fail",
     "capabilities": {"io.kubernetes.cri.pod-annotations": true, "io.meshsplice.pod-labels": true}}
  ]
}`

func (w *world) createPods(ctx context.Context) error {
	var err error
	if w.node, err = w.lab.NewNetns("node"); err != nil {
		return err
	}
	w.conflist, err = libcni.ConfListFromBytes([]byte(fmt.Sprintf(conflist, subnet, filepath.Join(w.runDir, "ipam"), w.socket())))
	if err != nil {
		return fmt.Errorf("CNI config: %w", err)
	}
	pluginDirs := []string{filepath.Join(w.opts.BinDir, "cni"), w.opts.BinDir}
	w.cni = libcni.NewCNIConfigWithCacheDir(pluginDirs, filepath.Join(w.runDir, "cni-cache"), nil)
	annotations := map[string]string{
		// What the Istio injector leaves on a pod it gave a sidecar.
		"sidecar.istio.io/status": `{"initContainers":null,"containers":["istio-proxy"]}`,
	}
	for _, name := range []string{"frontend", "backend"} {
		ns, err := w.lab.NewNetns(name)
		if err != nil {
			return err
		}
		p := &pod{name: name, netns: ns}
		p.rt = &libcni.RuntimeConf{
			ContainerID: prefix + "-" + name, NetNS: ns.Path, IfName: "eth0",
			Args: [][2]string{{"IgnoreUnknown", "1"}, {"K8S_POD_NAME", name}, {"K8S_POD_NAMESPACE", "demo"}, {"K8S_POD_SERVICE_ACCOUNT", name}},
			CapabilityArgs: map[string]any{
				"io.kubernetes.cri.pod-annotations": annotations,
				"io.meshsplice.pod-labels":          map[string]string{"app": name},
			},
		}
		var res *cnitypes100.Result
		// The plugins run in the node's namespace: that is where the
		// bridge goes, not the host's.
		err = w.node.Do(func() error {
			r, err := w.cni.AddNetworkList(ctx, w.conflist, p.rt)
			if err != nil {
				return err
			}
			res, err = cnitypes100.NewResultFromResult(r)
			return err
		})
		if err != nil {
			return fmt.Errorf("CNI ADD %s: %w", name, err)
		}
		w.lab.Defer("CNI DEL "+name, func() error {
			return w.node.Do(func() error { return w.cni.DelNetworkList(context.Background(), w.conflist, p.rt) })
		})
		w.pods = append(w.pods, p)
		for _, ipc := range res.IPs {
			if a, ok := netip.AddrFromSlice(ipc.Address.IP); ok && a.Unmap().Is4() {
				p.ip = a.Unmap()
			}
		}
		if !p.ip.IsValid() {
			return fmt.Errorf("CNI gave %s no IPv4 address", name)
		}
		w.ok("%s: netns %s, eth0 %s, registered with the agent", name, ns.Path, p.ip)
	}
	st, err := datapath.Inspect(w.pinDir)
	if err != nil {
		return err
	}
	w.ok("the kernel registry holds %d pods (meshsplice status --pin-dir %s)", len(st.Pods), w.pinDir)
	return nil
}

func (w *world) startWorkloads(ctx context.Context) error {
	for _, p := range w.pods {
		sc, err := w.start(p, p.name+"-sidecar", proxyUID, "sidecar")
		if err != nil {
			return err
		}
		p.sidecar = sc
		if _, err := sc.WaitEvent(ctx, "ready", 10*time.Second); err != nil {
			return fmt.Errorf("sidecar of %s: %w", p.name, err)
		}
		app, err := w.start(p, p.name+"-app", appUID, "echo", "--port", fmt.Sprint(appPort))
		if err != nil {
			return err
		}
		if _, err := app.WaitEvent(ctx, "ready", 10*time.Second); err != nil {
			return fmt.Errorf("app of %s: %w", p.name, err)
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := datapath.ReadPinnedCounters(w.pinDir)
		if err == nil && c["listener_iter.listener_registered"] >= uint64(len(w.pods)) {
			break
		}
		if time.Now().After(deadline) {
			return errors.New("the sidecars' inbound listeners were not registered within 10s")
		}
		if err := sleep(ctx, 20*time.Millisecond); err != nil {
			return err
		}
	}
	w.ok("sidecars listen on 15001/15006 and read SO_ORIGINAL_DST; inbound listeners registered for sk_lookup")
	return nil
}

func (w *world) traffic(ctx context.Context) error {
	front, back := w.pods[0], w.pods[1]
	before, err := datapath.ReadPinnedCounters(w.pinDir)
	if err != nil {
		return err
	}
	target := netip.AddrPortFrom(back.ip, appPort)
	res, err := w.runClient(ctx, front, target, "--messages", "1000", "--size", "1024")
	if err != nil {
		return err
	}
	after, err := datapath.ReadPinnedCounters(w.pinDir)
	if err != nil {
		return err
	}
	d := after.Sub(before)
	w.ok("1000 requests of 1 KiB echoed, every checksum verified (p50 %.0f us)", res.P50US)
	var orig string
	for _, ev := range front.sidecar.Events() {
		if ev.Str("event") == "accept" {
			orig = ev.Str("orig_dst")
		}
	}
	w.info("frontend's sidecar got the app's connection on 15001 and read SO_ORIGINAL_DST = %s", orig)
	rules := 0
	for _, p := range w.pods {
		out, err := exec.Command("nsenter", "--net="+p.netns.Path, "iptables-save").Output()
		if err != nil {
			return fmt.Errorf("iptables-save in %s: %w", p.name, err)
		}
		for _, line := range strings.Split(string(out), "\n") {
			if strings.HasPrefix(line, "-A ") {
				rules++
			}
		}
	}
	w.info("connections captured by connect4/6: %d, by sk_lookup (inbound): %d; iptables rules in the pods: %d",
		d["connect.captured"], d["sk_lookup.captured"], rules)
	w.info("sockets spliced: %d (sidecar <-> sidecar), bytes handed socket-to-socket: %d in %d sends, misses: %d",
		d["sockops.sock_inserted"], d["sk_msg.bytes_redirected"], d["sk_msg.redirected"],
		d["sk_msg.miss_first_send"]+d["sk_msg.miss_later_send"])
	if d["connect.captured"] != 1 || d["sk_lookup.captured"] != 1 || d["sk_msg.redirected"] == 0 || rules != 0 {
		return fmt.Errorf("traffic was not captured and spliced as expected: %v", d)
	}
	return nil
}

type mode struct {
	name             string
	capture, splice  bool
	iptables         bool
	explain          string
	p50, p99, rpsSum []float64
}

func (w *world) compare(ctx context.Context) error {
	modes := []*mode{
		{name: "no sidecars", explain: "app -> app, the floor"},
		{name: "Istio iptables", iptables: true, explain: "Istio's own sidecar rules (REDIRECT, conntrack)"},
		{name: "meshsplice capture", capture: true, explain: "connect4 + sk_lookup, no splice"},
		{name: "meshsplice", capture: true, splice: true, explain: "capture + sidecar <-> sidecar splice"},
	}
	front, back := w.pods[0], w.pods[1]
	target := netip.AddrPortFrom(back.ip, appPort)
	w.info("%d requests of 64 B per mode and round, %d rounds, modes interleaved; every process pinned to CPU 0", w.opts.Requests, w.opts.Rounds)
	for round := 1; round <= w.opts.Rounds; round++ {
		for _, m := range modes {
			if err := w.setSwitches(ctx, m.capture, m.splice, true); err != nil {
				return err
			}
			var undo []func() error
			if m.iptables {
				for _, p := range w.pods {
					cleanup, err := baseline.Apply(p.netns.Path, baseline.Options{})
					if err != nil {
						return fmt.Errorf("apply Istio's iptables rules in %s: %w", p.name, err)
					}
					undo = append(undo, cleanup)
				}
			}
			res, err := w.runClient(ctx, front, target, "--messages", fmt.Sprint(w.opts.Requests), "--size", "64")
			for _, u := range undo {
				if uerr := u(); uerr != nil && err == nil {
					err = uerr
				}
			}
			if err != nil {
				return fmt.Errorf("%s: %w", m.name, err)
			}
			m.p50 = append(m.p50, res.P50US)
			m.p99 = append(m.p99, res.P99US)
			m.rpsSum = append(m.rpsSum, float64(res.Messages)/(res.ElapsedMS/1000))
		}
		fmt.Fprintf(w.out, "    round %d/%d done\n", round, w.opts.Rounds)
	}
	if err := w.setSwitches(ctx, true, true, true); err != nil {
		return err
	}
	base := median(modes[0].p50)
	ipt := median(modes[1].p50) - base
	fmt.Fprintf(w.out, "\n    %-20s %9s %9s %10s %14s   %s\n", "mode", "p50 us", "p99 us", "req/s", "added p50", "")
	for _, m := range modes {
		added := median(m.p50) - base
		rel := ""
		if m != modes[0] && ipt > 0 {
			rel = fmt.Sprintf("%.2fx iptables", added/ipt)
		}
		fmt.Fprintf(w.out, "    %-20s %9.1f %9.1f %10.0f %8.1f us %s  (%s)\n", m.name, median(m.p50), median(m.p99), median(m.rpsSum), added, rel, m.explain)
	}
	w.info("medians over the rounds; one connection, request/response. The test sidecar is a small")
	w.info("Go proxy, not Envoy: with Envoy's own per-request cost the ratios shrink. `meshsplice bench` measures properly.")
	return nil
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	sort.Float64s(s)
	return s[len(s)/2]
}

const demoPolicy = `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: frontend-from-gateway
  namespace: demo
spec:
  selector:
    matchLabels:
      app: frontend
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/demo/sa/gateway"]
    to:
    - operation:
        methods: ["GET"]
`

// policy writes an AuthorizationPolicy into the agent's folder: frontend
// accepts only the (absent) gateway. backend's sidecar, uid 1337, then
// tries to reach frontend, as a compromised sidecar would: the kernel
// refuses the connect itself.
func (w *world) policy(ctx context.Context) error {
	front, back := w.pods[0], w.pods[1]
	if err := os.WriteFile(filepath.Join(w.config, "policy.yaml"), []byte(demoPolicy), 0o644); err != nil {
		return err
	}
	w.info("wrote %s: frontend accepts only spiffe://cluster.local/ns/demo/sa/gateway (GET: L7, so L4 allow in the kernel)", filepath.Join(w.config, "policy.yaml"))
	target := netip.AddrPortFrom(front.ip, appPort)
	deadline := time.Now().Add(10 * time.Second)
	var got string
	for {
		c, err := w.start(back, back.name+"-attacker", proxyUID, "client", "--target", target.String(), "--messages", "1", "--timeout", "2s")
		if err != nil {
			return err
		}
		ev, err := c.WaitEvent(ctx, "result", 20*time.Second)
		finish(c) // it exits 1 when refused, as it should
		if err != nil {
			return err
		}
		if !ev.Bool("ok") {
			got = fmt.Sprint(ev["errors"])
			if strings.Contains(got, "operation not permitted") {
				break
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the policy did not take effect within 10s (last result: %v)", ev)
		}
		if err := sleep(ctx, 100*time.Millisecond); err != nil {
			return err
		}
	}
	w.ok("backend's sidecar (uid 1337) -> frontend:%d refused at connect(): %s", appPort, got)
	if _, err := w.runClient(ctx, front, netip.AddrPortFrom(back.ip, appPort), "--messages", "10"); err != nil {
		return fmt.Errorf("frontend -> backend must still work: %w", err)
	}
	w.ok("frontend -> backend still works (no policy there)")
	st, err := datapath.Inspect(w.pinDir)
	if err != nil {
		return err
	}
	if n := len(st.RecentDenials); n > 0 {
		d := st.RecentDenials[n-1]
		w.info("meshsplice status: %s denial %s -> %s, identity %d, %s", d.Direction, d.Src, netip.AddrPortFrom(d.Dst, d.Port), d.SrcIdentity, d.Reason)
	}
	return os.Remove(filepath.Join(w.config, "policy.yaml"))
}

type clientResult struct {
	OK        bool    `json:"ok"`
	Messages  int     `json:"messages"`
	ElapsedMS float64 `json:"elapsed_ms"`
	P50US     float64 `json:"p50_us"`
	P99US     float64 `json:"p99_us"`
	Errors    []string
}

func (w *world) runClient(ctx context.Context, p *pod, target netip.AddrPort, args ...string) (clientResult, error) {
	c, err := w.start(p, p.name+"-client", appUID, append([]string{"client", "--target", target.String()}, args...)...)
	if err != nil {
		return clientResult{}, err
	}
	ev, err := c.WaitEvent(ctx, "result", 120*time.Second)
	finish(c) // its result says whether it failed
	if err != nil {
		return clientResult{}, err
	}
	var r clientResult
	if err := ev.Decode(&r); err != nil {
		return clientResult{}, fmt.Errorf("client result: %w", err)
	}
	if !r.OK {
		return r, fmt.Errorf("client failed: %v", ev["errors"])
	}
	return r, nil
}

// start runs mstest inside the pod's netns and the demo cgroup (from its
// first instruction), as uid, pinned to CPU 0, its output in a log file.
func (w *world) start(p *pod, name string, uid int, args ...string) (*lab.Proc, error) {
	logf, err := w.logFile(name)
	if err != nil {
		return nil, err
	}
	pr, err := lab.Start(lab.ProcOpts{
		Name: name, Netns: p.netns, Cgroup: w.cgroup, UID: uid, GID: uid, CPUs: "0",
		Args:   append([]string{w.bin("mstest")}, args...),
		Env:    []string{"GODEBUG=multipathtcp=0"}, // Envoy does not listen with MPTCP
		OnLine: func(_, line string) { fmt.Fprintln(logf, line) },
	})
	if err != nil {
		return nil, err
	}
	w.lab.Defer("stop "+name, func() error { pr.Kill(); return nil })
	return pr, nil
}

// finish waits for a client that printed its result to exit, and kills it
// after 10 s.
func finish(p *lab.Proc) {
	select {
	case <-p.Done():
	case <-time.After(10 * time.Second):
		p.Kill()
	}
}

// logFile creates RUNDIR/name.log, closed with the lab.
func (w *world) logFile(name string) (*os.File, error) {
	f, err := os.Create(filepath.Join(w.runDir, name+".log"))
	if err != nil {
		return nil, err
	}
	w.lab.Defer("close "+f.Name(), f.Close)
	return f, nil
}

// cleanup removes everything the demo made, in reverse order, and checks
// that nothing named meshsplice-demo* is left; it reports every failure.
func (w *world) cleanup() error {
	if w.lab == nil {
		return nil
	}
	return w.lab.Close()
}

func sleep(ctx context.Context, d time.Duration) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(d):
		return nil
	}
}
