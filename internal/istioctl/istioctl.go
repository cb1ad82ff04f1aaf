// Package istioctl runs Istio's own istioctl for tests: `manifest
// generate` with an IstioOperator overlay (offline, the charts are
// embedded) and `kube-inject` with the injection configuration that
// generate rendered, as the sidecar injector webhook of such an install
// would inject. istioctl is built from the istio.io/istio version
// tools/istio/go.mod pins, once, into .cache/bin by hack/deps.sh (several
// minutes of CPU the first time).
//
// kube-inject needs an API server even when it is given every
// configuration file (it hangs without one): pass the kubeconfig of
// internal/kubetest's server. Every run is bounded by Timeout.
package istioctl

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"
)

// Timeout bounds one istioctl run.
var Timeout = 2 * time.Minute

// Path returns the cached istioctl, building it with hack/deps.sh if it
// is missing.
func Path(tb testing.TB) string {
	tb.Helper()
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		tb.Fatal("istioctl: cannot find the module root")
	}
	root := filepath.Join(filepath.Dir(file), "..", "..")
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(filepath.Join(root, "hack", "deps.sh"), "--path", "istioctl")
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		tb.Fatalf("hack/deps.sh --path istioctl: %v: %s", err, stderr.String())
	}
	return strings.TrimSpace(stdout.String())
}

// Run runs istioctl with args and returns its standard output; it fails
// the test with its standard error when istioctl fails or outlives
// Timeout.
func Run(tb testing.TB, args ...string) []byte {
	tb.Helper()
	return RunEnv(tb, nil, args...)
}

// RunEnv is Run with extra environment variables (NAME=VALUE).
func RunEnv(tb testing.TB, env []string, args ...string) []byte {
	tb.Helper()
	out, err := run(Path(tb), env, args...)
	if err != nil {
		tb.Fatal(err)
	}
	return out
}

func run(bin string, env []string, args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), Timeout)
	defer cancel()
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	cmd.Env = append(os.Environ(), env...)
	cmd.WaitDelay = 5 * time.Second
	err := cmd.Run()
	if ctx.Err() != nil {
		return nil, fmt.Errorf("istioctl %s: no answer in %v: %s", strings.Join(args, " "), Timeout, stderr.String())
	}
	if err != nil {
		return nil, fmt.Errorf("istioctl %s: %w: %s", strings.Join(args, " "), err, stderr.String())
	}
	return stdout.Bytes(), nil
}

// Generate is `istioctl manifest generate` with the overlays given: the
// Kubernetes objects `istioctl install` would apply.
func Generate(tb testing.TB, overlays ...string) []byte {
	tb.Helper()
	args := []string{"manifest", "generate"}
	for _, o := range overlays {
		args = append(args, "-f", o)
	}
	return Run(tb, args...)
}

// InjectConfig is what the sidecar injector of an install reads: the
// files kube-inject takes in place of the ConfigMaps.
type InjectConfig struct {
	Config, Values, Mesh string // paths: --injectConfigFile, --valuesFile, --meshConfigFile
	// NativeSidecars makes istio-proxy a native sidecar (an init container
	// with restartPolicy: Always), as the injector does on a cluster whose
	// nodes run Kubernetes 1.33 or later (kube-inject detects it from the
	// nodes; the tests' API server has none).
	NativeSidecars bool
	// Revision is the install's revision (IstioOperator spec.revision;
	// "" for the default one): kube-inject marks the pods with it, as
	// the injector of that revision does.
	Revision string
}

// ConfigOf writes the injection template configuration (ConfigMap
// istio-sidecar-injector: config, values) and the mesh config (ConfigMap
// istio: mesh) of a manifest into files under dir. The ConfigMaps of a
// revision REV are istio-sidecar-injector-REV and istio-REV (labelled
// istio.io/rev=REV); Revision is then REV.
func ConfigOf(manifest []byte, dir string) (InjectConfig, error) {
	want := map[string]map[string]string{
		"istio-sidecar-injector": {"config": "inject-config.yaml", "values": "inject-values.json"},
		"istio":                  {"mesh": "mesh.yaml"},
	}
	found := map[string]string{}
	revision := ""
	for _, doc := range Docs(manifest) {
		var cm corev1.ConfigMap
		if err := yaml.Unmarshal(doc, &cm); err != nil || cm.Kind != "ConfigMap" {
			continue
		}
		name, rev := cm.Name, cm.Labels["istio.io/rev"]
		if rev != "" && rev != "default" {
			name = strings.TrimSuffix(name, "-"+rev)
		}
		if want[name] == nil {
			continue
		}
		if rev != "default" {
			revision = rev
		}
		for key, file := range want[name] {
			v, ok := cm.Data[key]
			if !ok {
				return InjectConfig{}, fmt.Errorf("ConfigMap %s has no %q", cm.Name, key)
			}
			path := filepath.Join(dir, file)
			if err := os.WriteFile(path, []byte(v), 0o644); err != nil {
				return InjectConfig{}, err
			}
			found[file] = path
		}
	}
	c := InjectConfig{Config: found["inject-config.yaml"], Values: found["inject-values.json"], Mesh: found["mesh.yaml"], Revision: revision}
	if c.Config == "" || c.Values == "" || c.Mesh == "" {
		return c, errors.New("the manifest lacks ConfigMap istio-sidecar-injector (config, values) or istio (mesh)")
	}
	return c, nil
}

// Inject is `istioctl kube-inject` of the workload YAML in, with c, using
// the API server of kubeconfig; it returns the injected YAML, or what
// istioctl said when it refused (as the injector webhook would refuse the
// pod).
func Inject(tb testing.TB, kubeconfig string, c InjectConfig, in []byte) ([]byte, error) {
	tb.Helper()
	file := filepath.Join(tb.TempDir(), "workload.yaml")
	if err := os.WriteFile(file, in, 0o644); err != nil {
		tb.Fatal(err)
	}
	env := []string{"ENABLE_NATIVE_SIDECARS=false"}
	if c.NativeSidecars {
		env = []string{"ENABLE_NATIVE_SIDECARS=true"}
	}
	args := []string{"kube-inject", "--kubeconfig", kubeconfig, "--injectConfigFile", c.Config,
		"--valuesFile", c.Values, "--meshConfigFile", c.Mesh, "-f", file}
	if c.Revision != "" {
		args = append(args, "--revision", c.Revision)
	}
	return run(Path(tb), env, args...)
}

// InjectPod is Inject of a Deployment's YAML and PodOf its output: the
// pod the injector of c makes of the workload. Any failure fails the test.
func InjectPod(tb testing.TB, kubeconfig string, c InjectConfig, deployment []byte) *corev1.Pod {
	tb.Helper()
	out, err := Inject(tb, kubeconfig, c, deployment)
	if err != nil {
		tb.Fatal(err)
	}
	pod, err := PodOf(out)
	if err != nil {
		tb.Fatal(err)
	}
	return pod
}

// PodOf returns the pod a Deployment's YAML makes: its template's
// metadata and spec.
func PodOf(deployment []byte) (*corev1.Pod, error) {
	var d appsv1.Deployment
	if err := yaml.Unmarshal(deployment, &d); err != nil {
		return nil, err
	}
	if d.Kind != "Deployment" {
		return nil, fmt.Errorf("not a Deployment: %q", d.Kind)
	}
	pod := &corev1.Pod{ObjectMeta: *d.Spec.Template.ObjectMeta.DeepCopy(), Spec: *d.Spec.Template.Spec.DeepCopy()}
	pod.Namespace = d.Namespace
	pod.Kind, pod.APIVersion = "Pod", "v1"
	return pod, nil
}

// Docs splits a multi-document YAML; documents with no object (comments
// only) are left out.
func Docs(b []byte) [][]byte {
	var out [][]byte
	for _, doc := range strings.Split("\n"+string(b), "\n---") {
		var m map[string]any
		if yaml.Unmarshal([]byte(doc), &m) == nil && len(m) > 0 {
			out = append(out, []byte(doc))
		}
	}
	return out
}
