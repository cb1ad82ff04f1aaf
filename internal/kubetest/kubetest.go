// Package kubetest runs a real Kubernetes API server for tests: Debian's
// etcd and a kube-apiserver built from the Go module proxy (hack/deps.sh,
// tools/kube-apiserver), on loopback, on free ports, in a temporary
// directory, with a static admin token, RBAC, and Istio's CRDs applied
// (testdata/istio-crds.yaml: manifests/charts/base/files/crd-all.gen.yaml
// of the istio.io/istio version tools/istio/go.mod pins; refresh with
// cp "$(go list -C tools/istio -m -f '{{.Dir}}' istio.io/istio)/manifests/charts/base/files/crd-all.gen.yaml"
// internal/kubetest/testdata/istio-crds.yaml). No controller-manager or
// scheduler runs: tests create what those would (the default
// ServiceAccount, pod status) themselves.
//
// One server serves a whole test package, started on first use and
// stopped by Main:
//
//	func TestMain(m *testing.M) { os.Exit(kubetest.Main(m)) }
//
//	func TestX(t *testing.T) {
//		srv := kubetest.Shared(t)
//		ns := srv.Namespace(t) // a fresh namespace, deleted at the end
//		...
//	}
//
// Every wait is bounded (StartTimeout) and fails with the end of the
// server's log; processes get SIGTERM, then SIGKILL after 5 s.
package kubetest

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/yaml"
)

// StartTimeout bounds each start-up step: etcd serving, /readyz, the CRDs
// established.
var StartTimeout = 60 * time.Second

// stopGrace is how long a process gets between SIGTERM and SIGKILL.
const stopGrace = 5 * time.Second

// adminToken authenticates as a member of system:masters.
const adminToken = "meshsplice-kubetest-admin"

// Server is a running etcd + kube-apiserver.
type Server struct {
	// Config reaches the API server as cluster admin.
	Config *rest.Config
	// Client is a clientset for Config.
	Client kubernetes.Interface
	// Kubeconfig is the path of a kubeconfig file for Config.
	Kubeconfig string
	// Dir holds the servers' data, certificates and logs.
	Dir string

	procs []*proc
}

// proc is a started program and its log.
type proc struct {
	name string
	cmd  *exec.Cmd
	log  string
	done chan struct{} // closed when it exited
	err  error
}

var (
	sharedMu  sync.Mutex
	shared    *Server
	sharedErr error
)

// Main runs the package's tests and stops the shared server, if a test
// started one. Use it as TestMain's exit code.
func Main(m *testing.M) int {
	code := m.Run()
	sharedMu.Lock()
	defer sharedMu.Unlock()
	if shared != nil {
		shared.Stop()
		shared = nil
	}
	return code
}

// Shared returns the package's API server, starting it on first use. It
// fails the test if the server cannot start (and every later caller, with
// the same error, without trying again).
func Shared(tb testing.TB) *Server {
	tb.Helper()
	sharedMu.Lock()
	defer sharedMu.Unlock()
	if shared == nil && sharedErr == nil {
		shared, sharedErr = Start()
	}
	if sharedErr != nil {
		tb.Fatalf("kubetest: %v", sharedErr)
	}
	return shared
}

// Start starts etcd and kube-apiserver in a new directory (Dir, under
// os.TempDir: a test's TempDir would go with that test, and the server
// serves the package), waits until the API server is ready and Istio's
// CRDs are established. Stop ends them and removes Dir. On error nothing
// is left running.
func Start() (s *Server, err error) {
	dir, err := os.MkdirTemp("", "mstest-kube-")
	if err != nil {
		return nil, err
	}
	s = &Server{Dir: dir}
	defer func() {
		if err != nil {
			s.Stop()
		}
	}()
	apiserver, err := apiserverPath()
	if err != nil {
		return nil, err
	}
	etcd, err := exec.LookPath("etcd")
	if err != nil {
		return nil, fmt.Errorf("no etcd (Debian package etcd-server; hack/deps.sh test installs it): %w", err)
	}
	ports, err := freePorts(3)
	if err != nil {
		return nil, err
	}
	etcdURL := fmt.Sprintf("http://127.0.0.1:%d", ports[0])
	peerURL := fmt.Sprintf("http://127.0.0.1:%d", ports[1])
	if err := s.start("etcd", etcd,
		"--name=kubetest", "--data-dir="+filepath.Join(dir, "etcd"),
		"--listen-client-urls="+etcdURL, "--advertise-client-urls="+etcdURL,
		"--listen-peer-urls="+peerURL, "--initial-advertise-peer-urls="+peerURL,
		"--initial-cluster=kubetest="+peerURL, "--log-level=warn"); err != nil {
		return nil, err
	}
	if err := s.waitFor("etcd", func() error {
		resp, err := http.Get(etcdURL + "/health")
		if err != nil {
			return err
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("/health: %s", resp.Status)
		}
		return nil
	}); err != nil {
		return nil, err
	}

	keyFile := filepath.Join(dir, "sa.key")
	if err := writeKey(keyFile); err != nil {
		return nil, err
	}
	tokens := filepath.Join(dir, "tokens.csv")
	if err := os.WriteFile(tokens, []byte(adminToken+`,kubetest-admin,kubetest-admin,"system:masters"`+"\n"), 0o600); err != nil {
		return nil, err
	}
	url := fmt.Sprintf("https://127.0.0.1:%d", ports[2])
	if err := s.start("kube-apiserver", apiserver,
		"--bind-address=127.0.0.1", "--advertise-address=127.0.0.1",
		fmt.Sprintf("--secure-port=%d", ports[2]),
		"--endpoint-reconciler-type=none", "--etcd-servers="+etcdURL,
		"--cert-dir="+filepath.Join(dir, "certs"),
		"--service-account-key-file="+keyFile, "--service-account-signing-key-file="+keyFile,
		"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
		"--service-cluster-ip-range=10.96.0.0/16",
		"--token-auth-file="+tokens, "--authorization-mode=RBAC",
		"--v=1"); err != nil {
		return nil, err
	}
	s.Config = &rest.Config{Host: url, BearerToken: adminToken, QPS: 100, Burst: 200, Timeout: 30 * time.Second,
		TLSClientConfig: rest.TLSClientConfig{Insecure: true}}
	s.Client, err = kubernetes.NewForConfig(s.Config)
	if err != nil {
		return nil, err
	}
	hc := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	if err := s.waitFor("kube-apiserver", func() error {
		req, _ := http.NewRequest(http.MethodGet, url+"/readyz", nil)
		req.Header.Set("Authorization", "Bearer "+adminToken)
		resp, err := hc.Do(req)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("/readyz: %s", resp.Status)
		}
		return nil
	}); err != nil {
		return nil, err
	}
	if err := s.writeKubeconfig(); err != nil {
		return nil, err
	}
	if err := s.applyCRDs(); err != nil {
		return nil, err
	}
	return s, nil
}

// apiserverPath is the cached kube-apiserver, built by hack/deps.sh if
// missing (minutes, once).
func apiserverPath() (string, error) {
	if p := os.Getenv("MESHSPLICE_KUBE_APISERVER"); p != "" {
		return p, nil
	}
	root, err := moduleRoot()
	if err != nil {
		return "", err
	}
	var out, errb bytes.Buffer
	cmd := exec.Command(filepath.Join(root, "hack", "deps.sh"), "--path", "kube-apiserver")
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("hack/deps.sh --path kube-apiserver: %w: %s", err, errb.String())
	}
	return strings.TrimSpace(out.String()), nil
}

func moduleRoot() (string, error) {
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		return "", errors.New("kubetest: cannot find the module root")
	}
	return filepath.Join(filepath.Dir(file), "..", ".."), nil
}

// start runs a program in its own process group, logging to Dir/NAME.log.
// The process is started from a goroutine locked to its own thread for
// the life of the process, so that Pdeathsig (tied to the parent thread)
// kills it when the test binary dies, and not when an unrelated thread
// (one a netns helper locked and dropped) exits.
func (s *Server) start(name, path string, args ...string) error {
	logPath := filepath.Join(s.Dir, name+".log")
	logf, err := os.Create(logPath)
	if err != nil {
		return err
	}
	p := &proc{name: name, log: logPath, done: make(chan struct{})}
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread ends with the process
		defer logf.Close()
		cmd := exec.Command(path, args...)
		cmd.Stdout, cmd.Stderr = logf, logf
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
		if err := cmd.Start(); err != nil {
			started <- fmt.Errorf("start %s: %w", name, err)
			close(p.done)
			return
		}
		p.cmd = cmd
		started <- nil
		p.err = cmd.Wait()
		close(p.done)
	}()
	if err := <-started; err != nil {
		return err
	}
	s.procs = append(s.procs, p)
	return nil
}

// waitFor polls ready until it succeeds, the program exits or
// StartTimeout passes.
func (s *Server) waitFor(name string, ready func() error) error {
	p := s.procs[len(s.procs)-1]
	deadline := time.Now().Add(StartTimeout)
	var last error
	for {
		if last = ready(); last == nil {
			return nil
		}
		select {
		case <-p.done:
			return fmt.Errorf("%s exited (%v) before it was ready; its log ends:\n%s", name, p.err, tail(p.log))
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not ready after %v (last: %v); its log ends:\n%s", name, StartTimeout, last, tail(p.log))
		}
	}
}

// tail is the end of a log file.
func tail(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	if len(b) > 3000 {
		b = b[len(b)-3000:]
	}
	return string(b)
}

// Stop ends the programs (API server first), SIGTERM then SIGKILL after 5
// s each, and removes Dir.
func (s *Server) Stop() {
	for i := len(s.procs) - 1; i >= 0; i-- {
		p := s.procs[i]
		select {
		case <-p.done:
			continue
		default:
		}
		syscall.Kill(-p.cmd.Process.Pid, syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(stopGrace):
			syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
			<-p.done
		}
	}
	s.procs = nil
	if s.Dir != "" {
		os.RemoveAll(s.Dir)
	}
}

// freePorts returns n loopback TCP ports nobody listens on now.
func freePorts(n int) ([]int, error) {
	var ports []int
	var lns []net.Listener
	defer func() {
		for _, ln := range lns {
			ln.Close()
		}
	}()
	for range n {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("find a free port: %w", err)
		}
		lns = append(lns, ln)
		ports = append(ports, ln.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

// writeKey writes a new RSA key for service-account tokens.
func writeKey(path string) error {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return err
	}
	b := pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)})
	return os.WriteFile(path, b, 0o600)
}

func (s *Server) writeKubeconfig() error {
	s.Kubeconfig = filepath.Join(s.Dir, "kubeconfig")
	kc := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: kubetest
  cluster:
    server: %s
    insecure-skip-tls-verify: true
users:
- name: admin
  user:
    token: %s
contexts:
- name: kubetest
  context:
    cluster: kubetest
    user: admin
current-context: kubetest
`, s.Config.Host, adminToken)
	return os.WriteFile(s.Kubeconfig, []byte(kc), 0o600)
}

var crdGVR = schema.GroupVersionResource{Group: "apiextensions.k8s.io", Version: "v1", Resource: "customresourcedefinitions"}

// applyCRDs creates Istio's CRDs and waits until each is established.
func (s *Server) applyCRDs() error {
	root, err := moduleRoot()
	if err != nil {
		return err
	}
	b, err := os.ReadFile(filepath.Join(root, "internal", "kubetest", "testdata", "istio-crds.yaml"))
	if err != nil {
		return err
	}
	dyn, err := dynamic.NewForConfig(s.Config)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), StartTimeout)
	defer cancel()
	var names []string
	for _, doc := range bytes.Split(b, []byte("\n---\n")) {
		var obj map[string]any
		if err := yaml.Unmarshal(doc, &obj); err != nil {
			return fmt.Errorf("istio-crds.yaml: %w", err)
		}
		if obj == nil {
			continue
		}
		u := &unstructured.Unstructured{Object: obj}
		if u.GetKind() != "CustomResourceDefinition" {
			continue
		}
		if _, err := dyn.Resource(crdGVR).Create(ctx, u, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("create CRD %s: %w", u.GetName(), err)
		}
		names = append(names, u.GetName())
	}
	if len(names) == 0 {
		return errors.New("istio-crds.yaml holds no CRD")
	}
	for _, name := range names {
		for {
			u, err := dyn.Resource(crdGVR).Get(ctx, name, metav1.GetOptions{})
			if err == nil && established(u) {
				break
			}
			select {
			case <-ctx.Done():
				return fmt.Errorf("CRD %s not established after %v (last error: %v)", name, StartTimeout, err)
			case <-time.After(50 * time.Millisecond):
			}
		}
	}
	return nil
}

func established(u *unstructured.Unstructured) bool {
	conds, _, _ := unstructured.NestedSlice(u.Object, "status", "conditions")
	for _, c := range conds {
		m, _ := c.(map[string]any)
		if m["type"] == "Established" && m["status"] == "True" {
			return true
		}
	}
	return false
}

// Namespace creates a namespace with a unique name (and its default
// ServiceAccount, which no controller-manager creates here). When the test
// ends its pods are deleted at once (no kubelet confirms a graceful
// deletion here) and then the namespace; with no namespace controller the
// namespace stays Terminating and its other objects stay: tests that list
// cluster-wide filter by namespace.
func (s *Server) Namespace(tb testing.TB, labels ...string) string {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{GenerateName: "mstest-", Labels: map[string]string{}}}
	for i := 0; i+1 < len(labels); i += 2 {
		ns.Labels[labels[i]] = labels[i+1]
	}
	got, err := s.Client.CoreV1().Namespaces().Create(ctx, ns, metav1.CreateOptions{})
	if err != nil {
		tb.Fatalf("create namespace: %v", err)
	}
	tb.Cleanup(func() {
		// Minutes: a scale benchmark leaves thousands of pods.
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		zero := int64(0)
		if err := s.Client.CoreV1().Pods(got.Name).DeleteCollection(ctx, metav1.DeleteOptions{GracePeriodSeconds: &zero}, metav1.ListOptions{}); err != nil {
			tb.Logf("delete the pods of %s: %v", got.Name, err)
		}
		if err := s.Client.CoreV1().Namespaces().Delete(ctx, got.Name, metav1.DeleteOptions{}); err != nil {
			tb.Logf("delete namespace %s: %v", got.Name, err)
		}
	})
	sa := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "default"}}
	if _, err := s.Client.CoreV1().ServiceAccounts(got.Name).Create(ctx, sa, metav1.CreateOptions{}); err != nil {
		tb.Fatalf("create the default ServiceAccount of %s: %v", got.Name, err)
	}
	return got.Name
}
