package kubetest

import (
	"context"
	"os"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
)

func TestMain(m *testing.M) { os.Exit(Main(m)) }

// TestServer: the shared server serves the core API, the status
// subresource, RBAC-authorized admin requests and Istio's CRDs.
func TestServer(t *testing.T) {
	srv := Shared(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ns := srv.Namespace(t)

	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "p", Namespace: ns},
		Spec:       corev1.PodSpec{NodeName: "n1", Containers: []corev1.Container{{Name: "app", Image: "app"}}},
	}
	got, err := srv.Client.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got.Spec.ServiceAccountName != "default" {
		t.Errorf("service account %q, want default (the ServiceAccount admission plugin)", got.Spec.ServiceAccountName)
	}
	got.Status.PodIP = "10.1.2.3"
	got.Status.PodIPs = []corev1.PodIP{{IP: "10.1.2.3"}}
	if _, err := srv.Client.CoreV1().Pods(ns).UpdateStatus(ctx, got, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	got, err = srv.Client.CoreV1().Pods(ns).Get(ctx, "p", metav1.GetOptions{})
	if err != nil || got.Status.PodIP != "10.1.2.3" {
		t.Fatalf("pod IP after UpdateStatus: %v %v", got.Status.PodIP, err)
	}

	dyn, err := dynamic.NewForConfig(srv.Config)
	if err != nil {
		t.Fatal(err)
	}
	for _, gvr := range []schema.GroupVersionResource{
		{Group: "security.istio.io", Version: "v1", Resource: "authorizationpolicies"},
		{Group: "security.istio.io", Version: "v1", Resource: "peerauthentications"},
		{Group: "networking.istio.io", Version: "v1", Resource: "workloadentries"},
	} {
		if _, err := dyn.Resource(gvr).Namespace(ns).List(ctx, metav1.ListOptions{}); err != nil {
			t.Errorf("list %s: %v", gvr, err)
		}
	}
	if _, err := os.Stat(srv.Kubeconfig); err != nil {
		t.Error(err)
	}
}
