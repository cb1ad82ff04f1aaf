//go:build e2enode

package node

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/internal/kubenode"
	"github.com/meshsplice/meshsplice/internal/kubetest"
)

// setup is a node ready for the chart, and the node state the chart must
// leave as it found it.
type setup struct {
	n                           *kubenode.Node
	root, helm                  string
	cgroup, bpffs, pins, runDir string
	conflist                    []byte // the node's own CNI file
	bpffsBefore, attachedBefore string
}

// chained is the file the runtime reads once meshsplice-cni is chained:
// the node's conflist, or the NAME.conflist cni-install makes of a .conf.
func (s *setup) chained() string {
	if filepath.Ext(s.n.Conflist) == ".conflist" {
		return s.n.Conflist
	}
	return strings.TrimSuffix(s.n.Conflist, filepath.Ext(s.n.Conflist)) + ".conflist"
}

// newSetup starts a node (stopped, and the host compared with its state
// before, when the test ends), applies Istio's CRDs and mounts the chart's
// bpffs.
func newSetup(t *testing.T, ctx context.Context, opts ...kubenode.Option) *setup {
	t.Helper()
	if os.Getuid() != 0 {
		t.Fatal("make e2e-node needs root")
	}
	s := &setup{}
	var err error
	if s.root, err = kubenode.RepoRoot(); err != nil {
		t.Fatal(err)
	}
	image := os.Getenv("MESHSPLICE_IMAGE")
	if image == "" {
		image = filepath.Join(s.root, "bin", "meshsplice-image.tar")
	}
	if _, err := os.Stat(image); err != nil {
		t.Fatalf("the meshsplice image (make image): %v", err)
	}
	testImage, err := kubenode.BuildTestImage(s.root, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	bins, err := kubenode.NodeBinaries(s.root)
	if err != nil {
		t.Fatal(err)
	}
	if s.helm, err = kubenode.Tool(s.root, "helm"); err != nil {
		t.Fatal(err)
	}
	host, err := kubenode.TakeSnapshot()
	if err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	n, err := kubenode.Start(ctx, bins, []string{image, testImage}, t.Logf, opts...)
	if err != nil {
		t.Fatal(err)
	}
	s.n = n
	t.Logf("node up in %v", time.Since(t0).Round(time.Millisecond))
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("pods:\n%s", podsReport(n))
			for _, c := range []string{"kubelet", "containerd"} {
				t.Logf("%s log:\n%s", c, n.Log(c))
			}
		}
		t1 := time.Now()
		if err := n.Stop(); err != nil {
			t.Errorf("node stop: %v", err)
		}
		t.Logf("node down in %v", time.Since(t1).Round(time.Millisecond))
		after, err := kubenode.TakeSnapshot()
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range host.Diff(after) {
			t.Errorf("host not as before the node: %s", d)
		}
	})
	if err := kubetest.ApplyIstioCRDs(n.Config); err != nil {
		t.Fatal(err)
	}

	// The node's state meshsplice must leave as it found it.
	if s.conflist, err = os.ReadFile(n.Conflist); err != nil {
		t.Fatal(err)
	}
	s.cgroup = podCgroupRoot(t)
	s.attachedBefore = cgroupPrograms(t, s.cgroup)
	s.bpffs = filepath.Join(n.Dir, "bpffs")
	if err := os.MkdirAll(s.bpffs, 0o755); err != nil {
		t.Fatal(err)
	}
	// The chart's bpffs: a bpffs of its own (unmounted with the node), so
	// "no pins left" is about meshsplice's alone. Shared, as systemd
	// mounts /sys/fs/bpf: the chart mounts it with HostToContainer
	// propagation, which the runtime refuses on a private mount.
	for _, args := range [][]string{{"-t", "bpf", "bpf", s.bpffs}, {"--make-shared", s.bpffs}} {
		if out, err := exec.Command("mount", args...).CombinedOutput(); err != nil {
			t.Fatalf("mount %v: %v: %s", args, err, out)
		}
	}
	// A fresh bpffs holds the kernel's own maps.debug and progs.debug.
	s.bpffsBefore = dirNames(t, s.bpffs)
	s.runDir = filepath.Join(n.Dir, "run-meshsplice")
	s.pins = filepath.Join(s.bpffs, "meshsplice")
	t.Cleanup(func() { // before the node's Stop (Cleanup runs last first)
		if t.Failed() {
			c, err := datapath.ReadPinnedCounters(s.pins)
			t.Logf("counters: %v %v", c, err)
			out, _ := exec.Command("curl", "-s", "-m", "2", "http://127.0.0.1:15299/pods").CombinedOutput()
			t.Logf("agent /pods: %s", out)
		}
	})
	return s
}

// install runs helm install and waits until the agent is ready and
// meshsplice-cni is chained.
func (s *setup) install(t *testing.T, ctx context.Context) {
	t.Helper()
	n := s.n
	t1 := time.Now()
	out, err := helmRun(s.helm, n, "install", "meshsplice", filepath.Join(s.root, "manifests", "chart", "meshsplice"),
		"--namespace", "istio-system", "--create-namespace", "--wait", "--timeout", "3m",
		"--set", "image.pullPolicy=Never",
		// This VM's root lacks CAP_SYS_RESOURCE (runc: "unable to apply
		// caps"); the kernel (>= 5.11) does not need it for BPF maps.
		"--set", "securityContext.capabilities.add={BPF,PERFMON,NET_ADMIN,SYS_ADMIN}",
		"--set", "cgroupRoot="+s.cgroup,
		"--set", "bpffs="+s.bpffs,
		"--set", "runDir="+s.runDir,
		"--set", "cni.confDir="+n.ConfDir,
		"--set", "cni.binDir="+n.BinDir,
		"--set", "kubernetes.serviceHost=127.0.0.1",
		"--set-string", fmt.Sprintf("kubernetes.servicePort=%d", n.APIPort))
	if err != nil {
		t.Fatalf("helm install: %v\n%s\nagent pods:\n%s", err, out, podsReport(n))
	}
	// helm --wait can return before the DaemonSet controller made the pod.
	eventually(t, 2*time.Minute, "the agent ready on the node", func() error {
		ds, err := n.Client.AppsV1().DaemonSets("istio-system").Get(ctx, "meshsplice", metav1.GetOptions{})
		if err != nil {
			return err
		}
		if ds.Status.DesiredNumberScheduled != 1 || ds.Status.NumberReady != 1 {
			return fmt.Errorf("DaemonSet status %+v\n%s", ds.Status, podsReport(n))
		}
		return nil
	})
	t.Logf("helm install, agent ready: %v", time.Since(t1).Round(time.Millisecond))
	eventually(t, 2*time.Minute, "meshsplice-cni chained into the node's conflist", func() error {
		b, err := os.ReadFile(s.chained())
		if err != nil || !bytes.Contains(b, []byte(`"meshsplice-cni"`)) {
			return fmt.Errorf("conflist: %s %v", b, err)
		}
		return nil
	})
}

// uninstall runs helm uninstall and checks that the node is as before the
// install: its CNI file byte for byte, no plugin binary, no pin, the same
// programs on the pods' cgroup.
func (s *setup) uninstall(t *testing.T) {
	t.Helper()
	n := s.n
	t2 := time.Now()
	if out, err := helmRun(s.helm, n, "uninstall", "meshsplice", "--namespace", "istio-system", "--wait", "--timeout", "3m"); err != nil {
		t.Fatalf("helm uninstall: %v\n%s\npods:\n%s", err, out, podsReport(n))
	}
	t.Logf("helm uninstall --wait: %v", time.Since(t2).Round(time.Millisecond))
	if got, _ := os.ReadFile(n.Conflist); !bytes.Equal(got, s.conflist) {
		t.Errorf("%s after helm uninstall:\n%s\nwant, byte for byte:\n%s", n.Conflist, got, s.conflist)
	}
	if s.chained() != n.Conflist {
		if _, err := os.Stat(s.chained()); !os.IsNotExist(err) {
			t.Errorf("%s (made from %s) left after helm uninstall (%v)", s.chained(), n.Conflist, err)
		}
	}
	if _, err := os.Stat(filepath.Join(n.BinDir, "meshsplice-cni")); !os.IsNotExist(err) {
		t.Errorf("meshsplice-cni still in the node's CNI bin dir (%v)", err)
	}
	if got := dirNames(t, s.bpffs); got != s.bpffsBefore {
		t.Errorf("pins left in the chart's bpffs: %s, before the install: %s", got, s.bpffsBefore)
	}
	if got := cgroupPrograms(t, s.cgroup); got != s.attachedBefore {
		t.Errorf("programs attached to %s after helm uninstall:\n%s\nbefore the install:\n%s", s.cgroup, got, s.attachedBefore)
	}
}
