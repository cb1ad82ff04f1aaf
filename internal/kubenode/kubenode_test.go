//go:build e2enode

package kubenode

import (
	"context"
	"net"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// TestLifecycle: the node comes up (without controllers), runs a pod on
// its bridge, and Stop leaves the host as it was: every Snapshot field
// equal, on success as on failure (Stop runs in Cleanup).
func TestLifecycle(t *testing.T) {
	root, err := RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	img, err := BuildTestImage(root, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	var bins Binaries
	if bins.APIServer, err = Tool(root, "kube-apiserver"); err != nil {
		t.Fatal(err)
	}
	if bins.Kubelet, err = Tool(root, "kubelet"); err != nil {
		t.Fatal(err)
	}
	before, err := TakeSnapshot()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	t0 := time.Now()
	n, err := Start(ctx, bins, []string{img}, t.Logf)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("node up in %v", time.Since(t0).Round(time.Millisecond))
	t.Cleanup(func() {
		t1 := time.Now()
		if err := n.Stop(); err != nil {
			t.Errorf("Stop: %v", err)
		}
		t.Logf("node down in %v", time.Since(t1).Round(time.Millisecond))
		after, err := TakeSnapshot()
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range before.Diff(after) {
			t.Errorf("host not as before: %s", d)
		}
	})
	grace := int64(1)
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "echo", Namespace: "default"},
		Spec: corev1.PodSpec{NodeName: NodeName, TerminationGracePeriodSeconds: &grace, AutomountServiceAccountToken: new(bool),
			Containers: []corev1.Container{{Name: "echo", Image: TestImage, ImagePullPolicy: corev1.PullNever,
				Command: []string{"/mstest", "echo", "--port", "8080"}}}}}
	if _, err := n.Client.CoreV1().Pods("default").Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	var ip string
	for ip == "" {
		p, err := n.Client.CoreV1().Pods("default").Get(ctx, "echo", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if p.Status.Phase == corev1.PodRunning {
			ip = p.Status.PodIP
		}
		select {
		case <-ctx.Done():
			t.Fatalf("pod not running: %+v\nkubelet:\n%s", p.Status, n.Log("kubelet"))
		case <-time.After(200 * time.Millisecond):
		}
	}
	// The host reaches the pod over the node's bridge.
	var c net.Conn
	for c == nil {
		if c, err = net.DialTimeout("tcp", net.JoinHostPort(ip, "8080"), time.Second); err != nil {
			select {
			case <-ctx.Done():
				t.Fatalf("dial the pod at %s: %v", ip, err)
			case <-time.After(200 * time.Millisecond):
			}
		}
	}
	c.Close()
}

// TestStartFailureCleansUp: a start that fails half-way (kubelet exits at
// once) stops what it started and leaves the host as it was. Before, the
// deferred stop ran on the nil *Node that the failing return had set, and
// panicked with everything still running.
func TestStartFailureCleansUp(t *testing.T) {
	root, err := RepoRoot()
	if err != nil {
		t.Fatal(err)
	}
	var bins Binaries
	if bins.APIServer, err = Tool(root, "kube-apiserver"); err != nil {
		t.Fatal(err)
	}
	bins.Kubelet = "/bin/false"
	before, err := TakeSnapshot()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	n, err := Start(ctx, bins, nil, t.Logf)
	if err == nil {
		n.Stop()
		t.Fatal("Start with a kubelet that exits succeeded")
	}
	t.Logf("Start: %v", err)
	after, err := TakeSnapshot()
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range before.Diff(after) {
		t.Errorf("host not as before: %s", d)
	}
	l, err := net.Listen("unix", LockName)
	if err != nil {
		t.Fatalf("the node lock is still held: %v", err)
	}
	l.Close()
}
