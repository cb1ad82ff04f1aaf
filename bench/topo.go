package bench

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/hashicorp/go-multierror"

	"github.com/meshsplice/meshsplice/baseline"
	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/internal/lab"
	"github.com/meshsplice/meshsplice/istio"
	"github.com/meshsplice/meshsplice/redirect"
)

// Ports and identities inside the pods.
const (
	echoPort   = 8080 // mstest echo: tcp-rr and connect
	sinkPort   = 8081 // mstest sink: stream
	fortioPort = 8090 // fortio server: http (its other servers are off)
	proxyUID   = 1337 // the sidecar, as Envoy
	appUID     = 1000
)

// Roles are the cgroups CPU time is accounted by.
const (
	roleClientApp     = "client-app"
	roleClientSidecar = "client-sidecar"
	roleServerSidecar = "server-sidecar"
	roleServerApp     = "server-app"
)

// mpOff keeps Go programs from listening with MPTCP (the default since Go
// 1.24): Envoy does not, and sk_lookup cannot hand connections to an MPTCP
// listener.
const mpOff = "GODEBUG=multipathtcp=0"

// node is a "node" of a topology: its namespace and bridge, its cgroup,
// and the meshsplice datapath attached to that cgroup.
type node struct {
	*lab.Node
	cg *lab.Cgroup
	dp *datapath.Datapath
}

// pod is a pod of a topology.
type pod struct {
	*lab.Pod
	node   *node
	meshed bool
	cookie uint64
	// app and sidecar are the role cgroups of the pod's processes.
	app, sidecar *lab.Cgroup
}

// env is one topology, built and ready to measure.
type env struct {
	opts    *Options
	topo    Topology
	lab     *lab.Lab
	root    *lab.Cgroup
	nodes   []*node
	client  *pod
	server  *pod
	meshed  []*pod
	roles   map[string]*lab.Cgroup
	servers []*lab.Proc

	mode      Mode
	appSplice bool
	undoRules []func() error
}

// cpus returns the CPU list a process of role runs on.
func (o *Options) cpus(role string) string {
	switch o.Pin {
	case PinOne:
		return "0"
	case PinSplit:
		if strings.HasSuffix(role, "sidecar") {
			return "1"
		}
		return "0"
	}
	return ""
}

// build creates a topology. On error, what was built is left for
// e.lab.Close.
func (e *env) build(ctx context.Context) error {
	root, err := e.lab.NewCgroup()
	if err != nil {
		return err
	}
	e.root = root
	pins, err := e.lab.PinDir(detachAll)
	if err != nil {
		return err
	}
	names := []string{"node-a"}
	if e.topo == TwoNodes {
		names = append(names, "node-b")
	}
	for i, name := range names {
		n, err := e.lab.NewNode(name, 71+i)
		if err != nil {
			return err
		}
		cg, err := e.lab.Child(root, name)
		if err != nil {
			return err
		}
		dp, err := datapath.Open(datapath.Options{
			PinDir:     filepath.Join(pins, name),
			CgroupPath: cg.Path,
			Node:       datapath.NodeSettings{Capture: true, Splice: true},
			Logger:     e.opts.Log.With("node", name),
		})
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		e.lab.Defer("close datapath of "+name, dp.Close)
		e.nodes = append(e.nodes, &node{Node: n, cg: cg, dp: dp})
	}
	if e.topo == TwoNodes {
		if err := lab.ConnectNodes(e.nodes[0].Node, e.nodes[1].Node); err != nil {
			return err
		}
	}
	serverNode := e.nodes[len(e.nodes)-1]
	if e.client, err = e.addPod(e.nodes[0], "client", true); err != nil {
		return err
	}
	if e.server, err = e.addPod(serverNode, "server", e.topo != InPod); err != nil {
		return err
	}
	e.roles = map[string]*lab.Cgroup{roleClientApp: e.client.app, roleClientSidecar: e.client.sidecar, roleServerApp: e.server.app}
	if e.server.meshed {
		e.roles[roleServerSidecar] = e.server.sidecar
	}
	if err := e.startServers(ctx); err != nil {
		return err
	}
	for _, p := range e.meshed {
		if err := e.startSidecar(ctx, p); err != nil {
			return err
		}
	}
	e.mode = Meshsplice
	return nil
}

// addPod creates a pod with its role cgroups and, when meshed, registers
// it with its node's datapath as the CNI plugin would.
func (e *env) addPod(n *node, name string, meshed bool) (*pod, error) {
	lp, err := n.AddPod(name)
	if err != nil {
		return nil, err
	}
	p := &pod{Pod: lp, node: n, meshed: meshed}
	// Connection-rate runs leave tens of thousands of TIME_WAIT sockets:
	// widen the port range and let connect reuse them, in the pod only.
	for k, v := range map[string]string{
		"net.ipv4.ip_local_port_range": "10000 65535",
		"net.ipv4.tcp_tw_reuse":        "1",
	} {
		if err := lp.NS.Sysctl(k, v); err != nil {
			return nil, err
		}
	}
	if p.app, err = e.lab.Child(n.cg, name+"-app"); err != nil {
		return nil, err
	}
	if !meshed {
		return p, nil
	}
	if p.sidecar, err = e.lab.Child(n.cg, name+"-sidecar"); err != nil {
		return nil, err
	}
	if p.cookie, err = datapath.NetnsCookie(lp.NS.Path); err != nil {
		return nil, err
	}
	if err := redirect.PreparePodNetns(lp.NS.Path); err != nil {
		return nil, err
	}
	if err := e.register(p, false); err != nil {
		return nil, err
	}
	e.meshed = append(e.meshed, p)
	return p, nil
}

// annotations are those of a pod the Istio injector processed.
func annotations(appSplice bool) map[string]string {
	ann := map[string]string{istio.AnnotationStatus: `{"containers":["istio-proxy"]}`}
	if appSplice {
		ann[istio.AnnotationAppSplice] = "true"
	}
	return ann
}

// register (re-)registers a meshed pod, with or without app-splice.
func (e *env) register(p *pod, appSplice bool) error {
	tr, _, err := istio.ParseTraffic(annotations(appSplice), istio.DefaultDefaults())
	if err != nil {
		return fmt.Errorf("pod %s: %w", p.Name, err)
	}
	err = p.node.dp.AddPod(datapath.Pod{NetnsPath: p.NS.Path, Cookie: p.cookie, IPs: []netip.Addr{p.IP}, Traffic: tr})
	if err != nil {
		return fmt.Errorf("register pod %s: %w", p.Name, err)
	}
	return nil
}

// start starts a program in pod p, in cgroup cg, as uid, on the role's
// CPUs, with MPTCP off. A server (long-lived) is stopped when the topology
// is torn down; a client is waited for by its caller (lab.Proc.Wait kills
// it on timeout or cancellation), and the cgroup's removal kills whatever
// is left.
func (e *env) start(p *pod, role string, cg *lab.Cgroup, uid int, args []string, onLine func(stream, line string), client bool) (*lab.Proc, error) {
	proc, err := lab.Start(lab.ProcOpts{
		Name: p.Name + " " + role + " (" + filepath.Base(args[0]) + ")", Netns: p.NS, Cgroup: cg,
		UID: uid, GID: uid, CPUs: e.opts.cpus(role), Args: args, Env: []string{mpOff},
		Dir: "/", OnLine: onLine, KeepStdout: client,
	})
	if err != nil {
		return nil, err
	}
	if !client {
		e.lab.Defer("stop "+p.Name+" "+role, func() error { proc.Stop(2 * time.Second); return nil })
	}
	return proc, nil
}

// startServers starts the server pod's apps: echo, sink and fortio.
func (e *env) startServers(ctx context.Context) error {
	s := e.server
	mstest := e.opts.bin("mstest")
	for _, args := range [][]string{
		{mstest, "echo", "--port", fmt.Sprint(echoPort), "--quiet"},
		{mstest, "sink", "--port", fmt.Sprint(sinkPort), "--quiet"},
	} {
		p, err := e.start(s, roleServerApp, s.app, appUID, args, nil, false)
		if err != nil {
			return err
		}
		if _, err := p.WaitEvent(ctx, "ready", 10*time.Second); err != nil {
			return err
		}
		e.servers = append(e.servers, p)
	}
	listening := make(chan struct{})
	var once bool
	p, err := e.start(s, roleServerApp, s.app, appUID, []string{
		e.opts.bin("fortio"), "server", "-http-port", fmt.Sprint(fortioPort),
		"-tcp-port", "disabled", "-udp-port", "disabled", "-grpc-port", "disabled", "-redirect-port", "disabled",
		"-logger-json=false",
	}, func(_, line string) {
		if !once && strings.Contains(line, "http-echo server listening") {
			once = true
			close(listening)
		}
	}, false)
	if err != nil {
		return err
	}
	select {
	case <-listening:
	case <-time.After(10 * time.Second):
		return fmt.Errorf("fortio server did not listen within 10s; last output:\n%s", p.Tail())
	case <-ctx.Done():
		return ctx.Err()
	}
	e.servers = append(e.servers, p)
	return nil
}

// startSidecar starts a meshed pod's sidecar (uid 1337) and waits until the
// datapath holds its inbound listener.
func (e *env) startSidecar(ctx context.Context, p *pod) error {
	role := roleClientSidecar
	if p == e.server {
		role = roleServerSidecar
	}
	sc, err := e.start(p, role, p.sidecar, proxyUID, []string{e.opts.bin("mstest"), "sidecar", "--quiet"}, nil, false)
	if err != nil {
		return err
	}
	if _, err := sc.WaitEvent(ctx, "ready", 10*time.Second); err != nil {
		return err
	}
	e.servers = append(e.servers, sc)
	if err := p.node.dp.WaitListener(p.cookie, 10*time.Second); err != nil {
		return fmt.Errorf("pod %s: %w", p.Name, err)
	}
	return nil
}

// setMode switches the topology to m: node switches, the pods' app-splice
// registration and Istio's iptables rules. It acts on new connections;
// every run opens its own.
func (e *env) setMode(m Mode) error {
	if e.mode == m {
		return nil
	}
	if m != Iptables && len(e.undoRules) > 0 {
		if err := e.removeRules(); err != nil {
			return err
		}
	}
	settings := datapath.NodeSettings{
		Capture: m == Capture || m == Meshsplice || m == MeshspliceFull,
		Splice:  m == Meshsplice || m == MeshspliceFull,
	}
	for _, n := range e.nodes {
		if err := n.dp.SetNode(settings); err != nil {
			return fmt.Errorf("%s: %w", n.Name, err)
		}
	}
	if want := m == MeshspliceFull; want != e.appSplice {
		for _, p := range e.meshed {
			if err := e.register(p, want); err != nil {
				return err
			}
		}
		e.appSplice = want
	}
	if m == Iptables && len(e.undoRules) == 0 {
		for _, p := range e.meshed {
			undo, err := baseline.Apply(p.NS.Path, baseline.Options{})
			if err != nil {
				return fmt.Errorf("apply Istio's iptables rules in %s: %w", p.Name, err)
			}
			e.undoRules = append(e.undoRules, undo)
		}
	}
	e.mode = m
	return nil
}

func (e *env) removeRules() error {
	var result *multierror.Error
	for _, undo := range e.undoRules {
		if err := undo(); err != nil {
			result = multierror.Append(result, err)
		}
	}
	e.undoRules = nil
	if err := result.ErrorOrNil(); err != nil {
		return fmt.Errorf("remove Istio's iptables rules: %w", err)
	}
	return nil
}

// close tears the topology down: rules first (conntrack state lives in the
// namespaces, which go with the lab), then everything the lab made.
func (e *env) close() error {
	var errs []error
	if len(e.undoRules) > 0 {
		errs = append(errs, e.removeRules())
	}
	errs = append(errs, e.lab.Close())
	return errors.Join(errs...)
}

// counters sums the kernel counters of every node's datapath.
func (e *env) counters() (datapath.Counters, error) {
	sum := datapath.Counters{}
	for _, n := range e.nodes {
		c, err := n.dp.Counters()
		if err != nil {
			return nil, fmt.Errorf("%s: %w", n.Name, err)
		}
		for k, v := range c {
			sum[k] += v
		}
	}
	return sum, nil
}

// istioRules counts the nat rules of Istio's chains in the pod, read with
// iptables-save inside its namespace.
func istioRules(p *pod) (int, error) {
	out, err := exec.Command("nsenter", "--net="+p.NS.Path, "--", "iptables-save", "-t", "nat").CombinedOutput()
	if err != nil {
		return 0, fmt.Errorf("iptables-save in %s: %w: %s", p.Name, err, out)
	}
	n := 0
	for _, line := range strings.Split(string(out), "\n") {
		if strings.HasPrefix(line, "-A ") && strings.Contains(line, "ISTIO") {
			n++
		}
	}
	return n, nil
}

// detachAll detaches every datapath pinned below dir (one per node).
func detachAll(dir string) error {
	entries, err := os.ReadDir(dir)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil
		}
		return err
	}
	var result *multierror.Error
	for _, e := range entries {
		if e.IsDir() {
			if err := datapath.Detach(filepath.Join(dir, e.Name()), time.Second); err != nil {
				result = multierror.Append(result, err)
			}
		}
	}
	return result.ErrorOrNil()
}

// inspection describes the run that just ended (see Options.Inspect).
func (e *env) inspection(c Cell, s *sample) Inspection {
	in := Inspection{Cell: c, Mode: e.mode, Evidence: s.evidence, Prefix: e.lab.Prefix}
	for _, p := range []*pod{e.client, e.server} {
		in.Netns = append(in.Netns, p.NS.Path)
		if p.meshed {
			in.MeshedNetns = append(in.MeshedNetns, p.NS.Path)
		}
	}
	for _, n := range e.nodes {
		in.Cgroups = append(in.Cgroups, n.cg.Path)
	}
	return in
}
