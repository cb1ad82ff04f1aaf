package e2e

import (
	"context"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	apisecurity "istio.io/api/security/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshsplice/meshsplice/agent/api"
	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/internal/kubetest"
	"github.com/meshsplice/meshsplice/internal/testnet"
	"github.com/meshsplice/meshsplice/istio"
)

// The API server starts once for the package, on the first test that
// needs it.
func TestMain(m *testing.M) { os.Exit(kubetest.Main(m)) }

// TestAgentKubernetes: `meshsplice agent --kubernetes` against a real API
// server. Pods of node B exist only as API objects (the test plays their
// kubelet: pod object, status.podIP, a network namespace on node B); the
// agent on node A judges their connections to a local pod by the identity
// the API server gives them: an injected pod with the allowed service
// account gets in, one with another service account is refused by the
// kernel, one without a sidecar is an unknown source (it has no identity
// to show db's sidecar either), left to the sidecar. An
// AuthorizationPolicy edit through the API server reaches the kernel.
func TestAgentKubernetes(t *testing.T) {
	testnet.RequireRoot(t)
	srv := kubetest.Shared(t)
	ns, istioNS := srv.Namespace(t), srv.Namespace(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	m := &mesh{t: t, bin: mstest(t)}
	m.cg = testnet.NewCgroup(t)
	m.pin = testnet.PinDir(t, func(dir string) error { return datapath.Detach(dir, time.Second) })
	nodeA := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	nodeB := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	testnet.ConnectNodes(t, nodeA, nodeB)
	db := m.addPod(nodeA, "db", nil)
	backend := m.addPod(nodeB, "backend", nil)   // injected, service account backend
	intruder := m.addPod(nodeB, "intruder", nil) // injected, service account intruder
	plain := m.addPod(nodeB, "plain", nil)       // no sidecar, service account backend

	// The node-B pods as the API server knows them.
	for _, p := range []struct {
		pod      *meshPod
		sa       string
		injected bool
	}{{backend, "backend", true}, {intruder, "intruder", true}, {plain, "backend", false}} {
		if _, err := srv.Client.CoreV1().ServiceAccounts(ns).Create(ctx,
			&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: p.sa}}, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
			t.Fatal(err)
		}
		obj := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: p.pod.Name, Namespace: ns},
			Spec: corev1.PodSpec{NodeName: "node-b", ServiceAccountName: p.sa, Containers: []corev1.Container{{Name: "app", Image: "app"}}}}
		if p.injected {
			obj.Annotations = injected()
			obj.Spec.Containers = append(obj.Spec.Containers, corev1.Container{Name: istio.ProxyContainer, Image: "proxyv2"})
		}
		got, err := srv.Client.CoreV1().Pods(ns).Create(ctx, obj, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		got.Status.Phase = corev1.PodRunning
		got.Status.PodIPs = []corev1.PodIP{{IP: p.pod.IPv4.String()}, {IP: p.pod.IPv6.String()}}
		got.Status.PodIP = p.pod.IPv4.String()
		if _, err := srv.Client.CoreV1().Pods(ns).UpdateStatus(ctx, got, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	ic, err := istioclient.NewForConfig(srv.Config)
	if err != nil {
		t.Fatal(err)
	}
	policy := func(principal string) *securityv1.AuthorizationPolicy {
		return &securityv1.AuthorizationPolicy{ObjectMeta: metav1.ObjectMeta{Name: "db", Namespace: ns},
			Spec: apisecurity.AuthorizationPolicy{Action: apisecurity.AuthorizationPolicy_ALLOW,
				Rules: []*apisecurity.Rule{{From: []*apisecurity.Rule_From{{Source: &apisecurity.Source{
					Principals: []string{principal}}}}}}}}
	}
	if _, err := ic.SecurityV1().AuthorizationPolicies(ns).Create(ctx,
		policy("cluster.local/ns/"+ns+"/sa/backend"), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	ag := startKubeAgent(t, srv, m, istioNS)
	defer ag.stop()

	if _, err := ag.client.AddPod(context.Background(), api.PodRegistration{
		ContainerID: "c-db", Netns: db.NS.Path(), IfName: "eth0", IPs: []netip.Addr{db.IPv4, db.IPv6},
		PodName: "db", PodNamespace: ns, ServiceAccount: "db", Labels: map[string]string{"app": "db"}, Annotations: injected(),
	}); err != nil {
		t.Fatal(err)
	}
	db.Sidecar = m.start(db, "db-sidecar", 1337, "sidecar")
	if _, err := db.Sidecar.WaitEvent(waitFor, "ready"); err != nil {
		t.Fatal(err)
	}
	eventually(t, "db's sidecar listener", func() bool {
		c, _ := datapath.ReadPinnedCounters(m.pin)
		return c["listener_iter.listener_registered"] >= 1
	})
	to := netip.AddrPortFrom(db.IPv4, appPort)
	verdict := func(from *meshPod) string {
		if got := m.tryConnect(from, appUID, to); got != "" {
			return "denied: " + got
		}
		return "allowed"
	}
	// The agent learns the API server's objects asynchronously: wait for
	// the verdict that needs the cluster-wide identities (an unknown
	// source could present the allowed certificate: the kernel lets it
	// through and leaves it to the sidecar).
	eventually(t, "intruder (node B, API identity intruder) refused by db's kernel policy", func() bool {
		return verdict(intruder) != "allowed"
	})
	for _, c := range []struct {
		from *meshPod
		want string
	}{
		{backend, "allowed"},
		// No sidecar: the kernel must not give it the identity its
		// sidecar could not show; unknown, left to db's sidecar.
		{plain, "allowed"},
	} {
		if got := verdict(c.from); !strings.HasPrefix(got, c.want) {
			t.Errorf("%s -> db: %s, want %s", c.from.Name, got, c.want)
		}
	}

	// A policy edit through the API server: now only intruder may.
	cur, err := ic.SecurityV1().AuthorizationPolicies(ns).Get(ctx, "db", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cur.Spec.Rules[0].From[0].Source.Principals = []string{"cluster.local/ns/" + ns + "/sa/intruder"}
	if _, err := ic.SecurityV1().AuthorizationPolicies(ns).Update(ctx, cur, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the edited policy: backend refused", func() bool { return verdict(backend) != "allowed" })
	if got := verdict(intruder); got != "allowed" {
		t.Errorf("intruder -> db after the edit: %s, want allowed", got)
	}
}
