// Package kubenode runs a real single-node Kubernetes on this machine for
// make e2e-node: etcd, kube-apiserver, kube-controller-manager,
// kube-scheduler, containerd, runc and kubelet v1.37.2, as
// /work/shared/k8s-node (docs/e2e-node.md) shows, with this VM's quirks:
//
//   - hybrid cgroups (v1 hierarchies, cgroup v2 at /sys/fs/cgroup/unified):
//     kubelet runs with failCgroupV1: false and the cgroupfs driver;
//   - root lacks CAP_SYS_RESOURCE: containerd's restrict_oom_score_adj;
//   - kubelet refuses a loopback node IP: NodeIP/32 is added to lo.
//
// Everything lives in one directory (Dir, mstest-node-* under the temp
// dir) except what kubelet, containerd and libcni write at fixed paths.
// Start records the host state those touch (sysctls, lo's addresses,
// iptables rules, nft tables, fixed directories, cgroups) and Stop undoes
// every change: pods deleted while kubelet runs (so CNI DEL runs), all
// processes stopped, mounts under Dir and kubelet's fixed paths unmounted,
// kubelet's cgroups removed, the bridge deleted, lo's address removed,
// sysctls restored, new empty nft tables and the fixed directories that
// were not there removed. Snapshot and Diff prove it.
package kubenode

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

const (
	// NodeName is the node's name.
	NodeName = "mstest-node"
	// NodeIP is the node's address, on lo (kubelet refuses 127.0.0.0/8).
	NodeIP = "10.245.255.1"
	// Bridge is the node CNI's bridge; PodCIDR its pods' subnet.
	Bridge  = "mstest-kp0"
	PodCIDR = "10.247.0.0/24"
	// NetworkName is the node's CNI network (conflist name).
	NetworkName = "mstest-node-net"
	// Version is the Kubernetes version of the programs.
	Version = "v1.37.2"
)

// Binaries are the programs a node runs. Without ControllerManager and
// Scheduler (both or neither) pods need spec.nodeName and the default
// ServiceAccount is created by Start.
type Binaries struct {
	APIServer, ControllerManager, Scheduler, Kubelet string
}

// Node is a running single-node cluster.
type Node struct {
	Dir string
	// Config reaches the API server as cluster admin; Client is its
	// clientset; Kubeconfig its file.
	Config     *rest.Config
	Client     kubernetes.Interface
	Kubeconfig string
	// APIPort is the API server's port on 127.0.0.1 (hostNetwork pods
	// reach it there).
	APIPort int
	// ConfDir and BinDir are the node's CNI dirs; Conflist the node's own
	// conflist in ConfDir.
	ConfDir, BinDir, Conflist string
	// Socket is containerd's socket.
	Socket string

	before     *Snapshot
	lock       net.Listener
	singleConf bool
	procs      []*proc
	addrLo     bool
	logf       func(string, ...any)
}

type proc struct {
	name string
	cmd  *exec.Cmd
	done chan struct{}
}

// sysctls are what kubelet (kernel tunables) and the bridge plugin
// (ip_forward) change.
var sysctls = []string{
	"vm.overcommit_memory", "vm.panic_on_oom", "kernel.panic", "kernel.panic_on_oops",
	"kernel.keys.root_maxkeys", "kernel.keys.root_maxbytes", "net.ipv4.ip_forward",
}

// fixedDirs are what kubelet, containerd and libcni create at fixed paths.
var fixedDirs = []string{
	"/var/lib/kubelet", "/var/log/containers", "/var/log/pods", "/run/containerd",
	"/var/lib/cni", "/usr/libexec/kubernetes", "/etc/kubernetes",
}

// cgroupNames are the cgroups kubelet and containerd create in each
// hierarchy.
var cgroupNames = []string{"kubepods", "k8s.io"}

// Start brings the node up, with the images (OCI archives) imported into
// containerd, and returns when the node is Ready and the default
// ServiceAccount exists. On error everything is undone.
func Start(ctx context.Context, bins Binaries, images []string, logf func(string, ...any), opts ...Option) (n *Node, err error) {
	// One node per machine: the node IP, the bridge, kubelet's port and
	// fixed paths are the machine's. The lock is an abstract unix socket:
	// it goes with the process and leaves no file.
	var lock net.Listener
	for {
		if lock, err = net.Listen("unix", LockName); err == nil {
			break
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("another node runs on this machine (%s is bound): %w", LockName, ctx.Err())
		case <-time.After(time.Second):
		}
	}
	dir, err := os.MkdirTemp("", "mstest-node-")
	if err != nil {
		lock.Close()
		return nil, err
	}
	node := &Node{Dir: dir, logf: logf, lock: lock}
	for _, o := range opts {
		o(node)
	}
	n = node
	defer func() {
		if err != nil { // n is nil here: the node is node
			if serr := node.Stop(); serr != nil {
				logf("kubenode: stop after a failed start: %v", serr)
			}
		}
	}()
	if n.before, err = TakeSnapshot(); err != nil {
		return nil, err
	}
	for _, d := range []string{"logs", "etcd", "pki", "conf", "containerd", "kubelet", "pod-logs", "cni/net.d", "cni/bin", "cni/ipam"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			return nil, err
		}
	}
	if err := n.writePKI(); err != nil {
		return nil, fmt.Errorf("pki: %w", err)
	}
	if out, err := exec.Command("ip", "addr", "add", NodeIP+"/32", "dev", "lo").CombinedOutput(); err != nil {
		return nil, fmt.Errorf("ip addr add %s/32 dev lo: %v: %s", NodeIP, err, out)
	}
	n.addrLo = true
	if err := n.writeCNI(); err != nil {
		return nil, err
	}

	ports, err := freePorts(3)
	if err != nil {
		return nil, err
	}
	n.APIPort = ports[2]
	etcdURL := fmt.Sprintf("http://127.0.0.1:%d", ports[0])
	peerURL := fmt.Sprintf("http://127.0.0.1:%d", ports[1])
	if err := n.start("etcd", "etcd", "--name=mstest-node", "--data-dir="+filepath.Join(dir, "etcd"),
		"--listen-client-urls="+etcdURL, "--advertise-client-urls="+etcdURL,
		"--listen-peer-urls="+peerURL, "--initial-advertise-peer-urls="+peerURL,
		"--initial-cluster=mstest-node="+peerURL, "--log-level=warn"); err != nil {
		return nil, err
	}
	n.Socket = filepath.Join(dir, "containerd", "containerd.sock")
	if err := n.writeContainerd(); err != nil {
		return nil, err
	}
	if err := n.start("containerd", "containerd", "--config", filepath.Join(dir, "conf", "containerd.toml")); err != nil {
		return nil, err
	}
	if err := n.waitFor(ctx, "etcd", func() error { return httpOK(etcdURL + "/health") }); err != nil {
		return nil, err
	}
	p := func(f string) string { return filepath.Join(dir, "pki", f) }
	if err := n.start("kube-apiserver", bins.APIServer,
		"--etcd-servers="+etcdURL, "--bind-address=127.0.0.1", fmt.Sprintf("--secure-port=%d", n.APIPort),
		"--advertise-address="+NodeIP,
		"--tls-cert-file="+p("apiserver.crt"), "--tls-private-key-file="+p("apiserver.key"),
		"--client-ca-file="+p("ca.crt"), "--token-auth-file="+filepath.Join(dir, "conf", "tokens.csv"),
		"--authorization-mode=Node,RBAC", "--enable-admission-plugins=NodeRestriction",
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-account-key-file="+p("sa.pub"), "--service-account-signing-key-file="+p("sa.key"),
		"--service-cluster-ip-range=10.96.0.0/24", "--endpoint-reconciler-type=none",
		"--kubelet-preferred-address-types=InternalIP", "--allow-privileged=true",
		"--cert-dir="+filepath.Join(dir, "apiserver-certs"), "--profiling=false", "--v=1"); err != nil {
		return nil, err
	}
	if err := n.waitFor(ctx, "containerd", func() error {
		return exec.Command("ctr", "-a", n.Socket, "version").Run()
	}); err != nil {
		return nil, err
	}
	for _, img := range images {
		if out, err := n.ctr("images", "import", "--all-platforms", img); err != nil {
			return nil, fmt.Errorf("import %s: %v: %s", img, err, out)
		}
	}
	n.Kubeconfig = filepath.Join(dir, "conf", "admin.kubeconfig")
	n.Config = &rest.Config{Host: fmt.Sprintf("https://127.0.0.1:%d", n.APIPort), BearerToken: n.token("admin"),
		QPS: 50, Burst: 100, Timeout: 30 * time.Second, TLSClientConfig: rest.TLSClientConfig{CAFile: p("ca.crt")}}
	if n.Client, err = kubernetes.NewForConfig(n.Config); err != nil {
		return nil, err
	}
	if err := n.waitFor(ctx, "kube-apiserver /readyz", func() error {
		_, err := n.Client.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		return err
	}); err != nil {
		return nil, err
	}
	if err := n.writeKubeletConfig(); err != nil {
		return nil, err
	}
	conf := func(f string) string { return filepath.Join(dir, "conf", f) }
	if err := n.start("kubelet", bins.Kubelet, "--config="+conf("kubelet-config.yaml"),
		"--kubeconfig="+conf("kubelet.kubeconfig"), "--root-dir="+filepath.Join(dir, "kubelet"),
		"--cert-dir="+filepath.Join(dir, "kubelet", "pki"), "--hostname-override="+NodeName,
		"--node-ip="+NodeIP, "--v=1"); err != nil {
		return nil, err
	}
	if bins.ControllerManager != "" {
		if err := n.start("kube-controller-manager", bins.ControllerManager, "--kubeconfig="+n.Kubeconfig,
			"--secure-port=0", "--leader-elect=false", "--service-account-private-key-file="+p("sa.key"),
			"--root-ca-file="+p("ca.crt"), "--use-service-account-credentials=false",
			"--flex-volume-plugin-dir="+filepath.Join(dir, "kcm-volume-plugins"), "--v=1"); err != nil {
			return nil, err
		}
		if err := n.start("kube-scheduler", bins.Scheduler, "--kubeconfig="+n.Kubeconfig,
			"--secure-port=0", "--leader-elect=false", "--v=1"); err != nil {
			return nil, err
		}
	}
	if err := n.waitFor(ctx, "node Ready", func() error {
		node, err := n.Client.CoreV1().Nodes().Get(ctx, NodeName, metav1.GetOptions{})
		if err != nil {
			return err
		}
		for _, c := range node.Status.Conditions {
			if c.Type == corev1.NodeReady && c.Status == corev1.ConditionTrue {
				return nil
			}
		}
		return errors.New("not Ready")
	}); err != nil {
		return nil, err
	}
	if bins.ControllerManager == "" { // no ServiceAccount controller
		if _, err := n.Client.CoreV1().ServiceAccounts("default").Create(ctx,
			&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "default"}}, metav1.CreateOptions{}); err != nil {
			return nil, err
		}
	}
	if err := n.waitFor(ctx, "default ServiceAccount", func() error {
		_, err := n.Client.CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{})
		return err
	}); err != nil {
		return nil, err
	}
	return n, nil
}

// LockName is the abstract unix socket that serializes nodes on the
// machine.
const LockName = "@mstest-node.lock"

// Option changes how Start sets a node up.
type Option func(*Node)

// SingleConf gives the node a single-plugin bridge .conf instead of a
// conflist (Conflist is then that .conf), as some node CNIs write.
func SingleConf(n *Node) { n.singleConf = true }

// StartTimeout bounds each wait of Start.
var StartTimeout = 90 * time.Second

func (n *Node) waitFor(ctx context.Context, what string, ready func() error) error {
	deadline := time.Now().Add(StartTimeout)
	t0 := time.Now()
	for {
		err := ready()
		if err == nil {
			n.logf("kubenode: %s after %v", what, time.Since(t0).Round(time.Millisecond))
			return nil
		}
		for _, p := range n.procs {
			select {
			case <-p.done:
				return fmt.Errorf("waiting for %s: %s exited: %s", what, p.name, tail(n.logPath(p.name)))
			default:
			}
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("waiting for %s: %v", what, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func httpOK(url string) error {
	c := &http.Client{Timeout: 2 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return errors.New(resp.Status)
	}
	return nil
}

func (n *Node) logPath(name string) string { return filepath.Join(n.Dir, "logs", name+".log") }

// Log is the end of a component's log.
func (n *Node) Log(name string) string { return tail(n.logPath(name)) }

func tail(path string) string {
	b, _ := os.ReadFile(path)
	if len(b) > 3000 {
		b = b[len(b)-3000:]
	}
	return string(b)
}

// start runs a component in its own process group, its output in
// logs/NAME.log.
func (n *Node) start(name, path string, args ...string) error {
	f, err := os.Create(n.logPath(name))
	if err != nil {
		return err
	}
	defer f.Close()
	cmd := exec.Command(path, args...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.Env = append(os.Environ(), "PATH=/usr/sbin:/usr/bin:/sbin:/bin")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start %s: %w", name, err)
	}
	p := &proc{name: name, cmd: cmd, done: make(chan struct{})}
	go func() { cmd.Wait(); close(p.done) }()
	n.procs = append(n.procs, p)
	return nil
}

// stop ends a component: SIGTERM, SIGKILL after 15 s.
func (n *Node) stop(name string) {
	for _, p := range n.procs {
		if p.name != name {
			continue
		}
		select {
		case <-p.done:
			return
		default:
		}
		p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(15 * time.Second):
			n.logf("kubenode: %s ignored SIGTERM for 15 s: SIGKILL", name)
			p.cmd.Process.Kill()
			<-p.done
		}
	}
}

func (n *Node) ctr(args ...string) ([]byte, error) {
	return exec.Command("ctr", append([]string{"-a", n.Socket, "-n", "k8s.io"}, args...)...).CombinedOutput()
}

func (n *Node) token(who string) string {
	b, _ := os.ReadFile(filepath.Join(n.Dir, "conf", who+".token"))
	return strings.TrimSpace(string(b))
}

// Stop deletes every pod while kubelet runs (CNI DEL runs for each), then
// stops everything and undoes every host change Start made. It runs every
// step even when one fails, and returns the failures joined.
func (n *Node) Stop() error {
	var errs []error
	fail := func(err error) {
		if err != nil {
			errs = append(errs, err)
		}
	}
	if n.Client != nil && n.running("kubelet") && n.running("kube-apiserver") {
		n.stop("kube-controller-manager")
		n.stop("kube-scheduler")
		ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
		fail(n.deleteAllPods(ctx))
		cancel()
	}
	for _, c := range []string{"kube-controller-manager", "kube-scheduler", "kubelet"} {
		n.stop(c)
	}
	if n.running("containerd") {
		// What the kubelet did not stop: kill and delete the tasks (their
		// netns and veths go with them), then the sandboxes (CNI DEL).
		out, _ := n.ctr("tasks", "ls", "-q")
		for _, t := range strings.Fields(string(out)) {
			n.ctr("tasks", "kill", "-s", "KILL", t)
		}
		time.Sleep(500 * time.Millisecond)
		for _, t := range strings.Fields(string(out)) {
			n.ctr("tasks", "delete", "-f", t)
		}
		out, _ = n.ctr("containers", "ls", "-q")
		for _, c := range strings.Fields(string(out)) {
			n.ctr("containers", "delete", c)
		}
	}
	n.stop("containerd")
	fail(n.killShims())
	n.stop("kube-apiserver")
	n.stop("etcd")
	fail(n.unmount())
	fail(removeCgroups(n.before))
	if _, err := net.InterfaceByName(Bridge); err == nil {
		if out, err := exec.Command("ip", "link", "del", Bridge).CombinedOutput(); err != nil {
			fail(fmt.Errorf("ip link del %s: %v: %s", Bridge, err, out))
		}
	}
	if n.addrLo {
		if out, err := exec.Command("ip", "addr", "del", NodeIP+"/32", "dev", "lo").CombinedOutput(); err != nil {
			fail(fmt.Errorf("ip addr del %s/32 dev lo: %v: %s", NodeIP, err, out))
		}
	}
	if n.before != nil {
		fail(n.before.restore())
	}
	if os.Getenv("MESHSPLICE_E2E_NODE_KEEP") == "" {
		fail(os.RemoveAll(n.Dir))
	} else {
		n.logf("kubenode: kept %s (MESHSPLICE_E2E_NODE_KEEP)", n.Dir)
	}
	if n.lock != nil {
		n.lock.Close()
	}
	return errors.Join(errs...)
}

func (n *Node) running(name string) bool {
	for _, p := range n.procs {
		if p.name == name {
			select {
			case <-p.done:
				return false
			default:
				return true
			}
		}
	}
	return false
}

// deleteAllPods deletes the workloads and pods of every namespace and
// waits until containerd has no task left.
func (n *Node) deleteAllPods(ctx context.Context) error {
	nss, err := n.Client.CoreV1().Namespaces().List(ctx, metav1.ListOptions{})
	if err != nil {
		return err
	}
	grace := int64(1)
	bg := metav1.DeletePropagationBackground
	del := metav1.DeleteOptions{PropagationPolicy: &bg}
	for _, ns := range nss.Items {
		n.Client.AppsV1().DaemonSets(ns.Name).DeleteCollection(ctx, del, metav1.ListOptions{})
		n.Client.AppsV1().Deployments(ns.Name).DeleteCollection(ctx, del, metav1.ListOptions{})
		n.Client.BatchV1().Jobs(ns.Name).DeleteCollection(ctx, del, metav1.ListOptions{})
		n.Client.CoreV1().Pods(ns.Name).DeleteCollection(ctx, metav1.DeleteOptions{GracePeriodSeconds: &grace}, metav1.ListOptions{})
	}
	for {
		out, err := n.ctr("tasks", "ls", "-q")
		if err == nil && len(strings.TrimSpace(string(out))) == 0 {
			pods, err := n.Client.CoreV1().Pods("").List(ctx, metav1.ListOptions{})
			if err == nil && len(pods.Items) == 0 {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("pods still running after deleting them all: %s", out)
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// killShims kills containerd-shim processes of this node's containerd
// (they normally exit with their tasks).
func (n *Node) killShims() error {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return err
	}
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		cmd := strings.ReplaceAll(string(b), "\x00", " ")
		if strings.Contains(cmd, "containerd-shim") && strings.Contains(cmd, n.Socket) {
			var pid int
			fmt.Sscan(e.Name(), &pid)
			n.logf("kubenode: killing leftover shim %d", pid)
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	return nil
}

// unmount detaches every mount under Dir and under the fixed paths that
// were not mounted before, deepest first.
func (n *Node) unmount() error {
	var errs []error
	for pass := 0; pass < 3; pass++ {
		mounts, err := mountPoints()
		if err != nil {
			return err
		}
		var ours []string
		for _, m := range mounts {
			if n.before != nil && n.before.Mounts[m] {
				continue
			}
			if under(m, n.Dir) || under(m, "/var/lib/kubelet") || under(m, "/run/containerd") || strings.HasPrefix(m, "/run/netns/cni-") {
				ours = append(ours, m)
			}
		}
		if len(ours) == 0 {
			return nil
		}
		sort.Sort(sort.Reverse(sort.StringSlice(ours)))
		errs = errs[:0]
		for _, m := range ours {
			if err := syscall.Unmount(m, syscall.MNT_DETACH); err != nil && !errors.Is(err, syscall.EINVAL) && !errors.Is(err, syscall.ENOENT) {
				errs = append(errs, fmt.Errorf("umount %s: %w", m, err))
			}
		}
	}
	for _, f := range mustGlob("/run/netns/cni-*") {
		os.Remove(f)
	}
	return errors.Join(errs...)
}

func mustGlob(p string) []string { m, _ := filepath.Glob(p); return m }

func under(p, dir string) bool { return p == dir || strings.HasPrefix(p, dir+"/") }

// mountPoints lists the mount points of this mount namespace
// (/proc/self/mountinfo, octal escapes decoded).
func mountPoints() ([]string, error) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		f := strings.Fields(l)
		if len(f) > 4 {
			out = append(out, unescape(f[4]))
		}
	}
	return out, nil
}

func unescape(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var v int
			if _, err := fmt.Sscanf(s[i+1:i+4], "%03o", &v); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// removeCgroups removes, deepest first, the cgroups kubelet and
// containerd created in every hierarchy (those that were not there).
func removeCgroups(before *Snapshot) error {
	var errs []error
	for _, root := range cgroupRoots() {
		for _, name := range cgroupNames {
			top := filepath.Join(root, name)
			if before != nil && before.Cgroups[top] {
				continue
			}
			var dirs []string
			filepath.WalkDir(top, func(p string, d os.DirEntry, err error) error {
				if err == nil && d.IsDir() {
					dirs = append(dirs, p)
				}
				return nil
			})
			sort.Sort(sort.Reverse(sort.StringSlice(dirs)))
			for _, d := range dirs {
				var err error
				for i := 0; i < 20; i++ { // a dying process can keep it busy a moment
					if err = syscall.Rmdir(d); err == nil || errors.Is(err, syscall.ENOENT) {
						err = nil
						break
					}
					time.Sleep(100 * time.Millisecond)
				}
				if err != nil {
					errs = append(errs, fmt.Errorf("rmdir %s: %w", d, err))
				}
			}
		}
	}
	return errors.Join(errs...)
}

// cgroupRoots are the mounted cgroup hierarchies (v1 and v2).
func cgroupRoots() []string {
	b, _ := os.ReadFile("/proc/self/mountinfo")
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		i := strings.Index(l, " - ")
		f := strings.Fields(l)
		if i < 0 || len(f) < 5 {
			continue
		}
		fs := strings.Fields(l[i+3:])
		if len(fs) > 0 && (fs[0] == "cgroup" || fs[0] == "cgroup2") {
			out = append(out, unescape(f[4]))
		}
	}
	return out
}

// freePorts returns n distinct free TCP ports on 127.0.0.1.
func freePorts(n int) ([]int, error) {
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	var ports []int
	for i := 0; i < n; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// writePKI writes the CA, the API server's serving certificate (for
// 127.0.0.1, the node IP and the kubernetes Service), the service-account
// key pair, static tokens (admin: system:masters; kubelet:
// system:node:NodeName) and kubeconfigs.
func (n *Node) writePKI() error {
	dir := filepath.Join(n.Dir, "pki")
	caKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return err
	}
	now := time.Now()
	ca := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "mstest-node-ca"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(48 * time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature}
	caDER, err := x509.CreateCertificate(rand.Reader, ca, ca, &caKey.PublicKey, caKey)
	if err != nil {
		return err
	}
	ca, _ = x509.ParseCertificate(caDER)
	srvKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return err
	}
	srv := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "kube-apiserver"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(48 * time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1"), net.ParseIP(NodeIP), net.ParseIP("10.96.0.1")},
		DNSNames:    []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc"}}
	srvDER, err := x509.CreateCertificate(rand.Reader, srv, ca, &srvKey.PublicKey, caKey)
	if err != nil {
		return err
	}
	saKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return err
	}
	saPub, err := x509.MarshalPKIXPublicKey(&saKey.PublicKey)
	if err != nil {
		return err
	}
	files := map[string][]byte{
		"ca.crt":        pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}),
		"ca.key":        pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(caKey)}),
		"apiserver.crt": pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srvDER}),
		"apiserver.key": pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(srvKey)}),
		"sa.key":        pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(saKey)}),
		"sa.pub":        pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: saPub}),
	}
	for f, b := range files {
		if err := os.WriteFile(filepath.Join(dir, f), b, 0o600); err != nil {
			return err
		}
	}
	conf := filepath.Join(n.Dir, "conf")
	var tokens strings.Builder
	for _, u := range []struct{ who, user, groups string }{
		{"admin", "mstest-admin", "system:masters"},
		{"kubelet", "system:node:" + NodeName, "system:nodes"},
	} {
		b := make([]byte, 16)
		rand.Read(b)
		tok := hex.EncodeToString(b)
		fmt.Fprintf(&tokens, "%s,%s,%s-uid,\"%s\"\n", tok, u.user, u.who, u.groups)
		if err := os.WriteFile(filepath.Join(conf, u.who+".token"), []byte(tok+"\n"), 0o600); err != nil {
			return err
		}
	}
	if err := os.WriteFile(filepath.Join(conf, "tokens.csv"), []byte(tokens.String()), 0o600); err != nil {
		return err
	}
	return nil
}

func (n *Node) writeKubeconfig(who string) error {
	kc := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: mstest-node
  cluster: {server: "https://127.0.0.1:%d", certificate-authority: %s}
users:
- name: %s
  user: {token: %s}
contexts:
- name: mstest-node
  context: {cluster: mstest-node, user: %s}
current-context: mstest-node
`, n.APIPort, filepath.Join(n.Dir, "pki", "ca.crt"), who, n.token(who), who)
	return os.WriteFile(filepath.Join(n.Dir, "conf", who+".kubeconfig"), []byte(kc), 0o600)
}

// writeCNI writes the node's own CNI: the bridge, host-local and loopback
// plugins of Debian's containernetworking-plugins copied into BinDir, and
// a bridge conflist in ConfDir (what meshsplice-cni chains into); with
// SingleConf a single-plugin .conf instead.
func (n *Node) writeCNI() error {
	n.ConfDir = filepath.Join(n.Dir, "cni", "net.d")
	n.BinDir = filepath.Join(n.Dir, "cni", "bin")
	for _, p := range []string{"bridge", "host-local", "loopback"} {
		b, err := os.ReadFile(filepath.Join("/usr/lib/cni", p))
		if err != nil {
			return fmt.Errorf("CNI plugin %s (Debian package containernetworking-plugins; hack/deps.sh e2e-node installs it): %w", p, err)
		}
		if err := os.WriteFile(filepath.Join(n.BinDir, p), b, 0o755); err != nil {
			return err
		}
	}
	bridge := fmt.Sprintf(`{
  "type": "bridge",
  "bridge": %q,
  "isGateway": true,
  "ipMasq": false,
  "hairpinMode": true,
  "ipam": {
    "type": "host-local",
    "dataDir": %q,
    "ranges": [[{"subnet": %q}]],
    "routes": [{"dst": "0.0.0.0/0"}]
  }
}`, Bridge, filepath.Join(n.Dir, "cni", "ipam"), PodCIDR)
	if n.singleConf {
		n.Conflist = filepath.Join(n.ConfDir, "10-mstest-node.conf")
		return os.WriteFile(n.Conflist, []byte(fmt.Sprintf("{\n  \"cniVersion\": \"1.0.0\",\n  \"name\": %q,\n%s\n", NetworkName, bridge[2:])), 0o644)
	}
	n.Conflist = filepath.Join(n.ConfDir, "10-mstest-node.conflist")
	plugin := "    " + strings.ReplaceAll(bridge, "\n", "\n    ")
	return os.WriteFile(n.Conflist, []byte(fmt.Sprintf("{\n  \"cniVersion\": \"1.0.0\",\n  \"name\": %q,\n  \"plugins\": [\n%s\n  ]\n}\n", NetworkName, plugin)), 0o644)
}

// TestImage is the tests' image (BuildTestImage) and the sandbox image.
const TestImage = "mstest.local/mstest:1"

func (n *Node) writeContainerd() error {
	d := func(f string) string { return filepath.Join(n.Dir, "containerd", f) }
	toml := fmt.Sprintf(`version = 2
root = %q
state = %q
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = %q

[ttrpc]
  address = %q

[debug]
  address = %q
  level = "info"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = %q

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %q
  disable_apparmor = true
  # this VM drops CAP_SYS_RESOURCE from root's bounding set: runc cannot
  # set oom_score_adj < 0 (-998 for sandboxes)
  restrict_oom_score_adj = true
  enable_selinux = false
  # pods' netns at /run/netns/cni-*, where the chart's agent finds them
  netns_mounts_under_state_dir = false
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "/usr/sbin/runc"
        Root = %q
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = %q
    conf_dir = %q
    max_conf_num = 1
`, d("root"), d("state"), n.Socket, n.Socket+".ttrpc", d("debug.sock"), d("opt"), TestImage, d("runc"), n.BinDir, n.ConfDir)
	return os.WriteFile(filepath.Join(n.Dir, "conf", "containerd.toml"), []byte(toml), 0o644)
}

func (n *Node) writeKubeletConfig() error {
	for _, who := range []string{"admin", "kubelet"} {
		if err := n.writeKubeconfig(who); err != nil {
			return err
		}
	}
	cfg := fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# the host is cgroup v1 (hybrid); kubelet >= 1.35 defaults failCgroupV1 to true
failCgroupV1: false
failSwapOn: false
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix://%s
address: %s
port: 10250
readOnlyPort: 0
healthzPort: 0
authentication:
  anonymous:
    enabled: true
  webhook:
    enabled: false
  x509:
    clientCAFile: %s
authorization:
  mode: AlwaysAllow
podLogsDir: %s
maxPods: 30
evictionHard:
  memory.available: "100Mi"
  nodefs.available: "1%%"
  imagefs.available: "1%%"
  nodefs.inodesFree: "1%%"
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
serializeImagePulls: false
volumePluginDir: %s
# no KUBE-FIREWALL / KUBE-KUBELET-CANARY chains in the host's iptables
makeIPTablesUtilChains: false
`, n.Socket, NodeIP, filepath.Join(n.Dir, "pki", "ca.crt"), filepath.Join(n.Dir, "pod-logs"), filepath.Join(n.Dir, "kubelet", "volume-plugins"))
	return os.WriteFile(filepath.Join(n.Dir, "conf", "kubelet-config.yaml"), []byte(cfg), 0o644)
}
