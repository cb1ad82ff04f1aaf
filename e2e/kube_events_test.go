package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	apisecurity "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshsplice/meshsplice/agent"
	"github.com/meshsplice/meshsplice/agent/api"
	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/internal/kubetest"
	"github.com/meshsplice/meshsplice/internal/testnet"
	"github.com/meshsplice/meshsplice/istio"
	"github.com/meshsplice/meshsplice/redirect"
)

// TestAgentKubernetesEvents: `meshsplice agent --kubernetes` against a
// real API server writes a Warning Event on the pod it cannot apply. The
// kernel's pod table holds one pod (pinned small before the agent
// started; the agent keeps the size): db is registered, web's
// registration fails on the full table, and web gets an Event with
// reason MapFull, naming the pod by its UID so that `kubectl describe
// pod` shows it. `check --drift --kubernetes` then names web (Istio meshes
// it, the kernel does not know it) and nothing else. A change to db's
// kernel entry behind the agent's back becomes a KernelDrift Event on db,
// and the agent mends it. Last, the kernel's policy set table holds one
// set: db's AuthorizationPolicy fits, but an edit of it does not (a swap
// holds the old set and the new one): the policy is rolled back, a
// PolicyNotApplied Event goes on the node, and db, whose kernel keeps the
// previous policy, gets a KernelDrift Event naming its policy.
func TestAgentKubernetesEvents(t *testing.T) {
	testnet.RequireRoot(t)
	srv := kubetest.Shared(t)
	ns, istioNS := srv.Namespace(t), srv.Namespace(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	m := &mesh{t: t, bin: mstest(t)}
	m.cg = testnet.NewCgroup(t)
	m.pin = testnet.PinDir(t, func(dir string) error { return datapath.Detach(dir, time.Second) })
	dp, err := datapath.Open(datapath.Options{PinDir: m.pin, CgroupPath: m.cg.Path,
		MaxEntries: map[string]uint32{redirect.CaptureMapMsPods: 1, redirect.CaptureMapMsPolSets: 1}})
	if err != nil {
		t.Fatal(err)
	}
	dp.Close()
	node := testnet.NewBridgeNet(t, testnet.BridgeNetOpts{})
	pods := map[string]*meshPod{}
	uids := map[string]string{}
	for _, name := range []string{"db", "web"} {
		p := m.addPod(node, name, nil)
		pods[name] = p
		if _, err := srv.Client.CoreV1().ServiceAccounts(ns).Create(ctx,
			&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		obj := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: map[string]string{"app": name},
			Annotations: injected()},
			Spec: corev1.PodSpec{NodeName: "node-a", ServiceAccountName: name, Containers: []corev1.Container{
				{Name: "app", Image: "app"}, {Name: istio.ProxyContainer, Image: "proxyv2"}}}}
		got, err := srv.Client.CoreV1().Pods(ns).Create(ctx, obj, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		uids[name] = string(got.UID)
		got.Status.Phase = corev1.PodRunning
		got.Status.PodIPs = []corev1.PodIP{{IP: p.IPv4.String()}, {IP: p.IPv6.String()}}
		got.Status.PodIP = p.IPv4.String()
		if _, err := srv.Client.CoreV1().Pods(ns).UpdateStatus(ctx, got, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
	}

	bin := testnet.BuildBinary(t, "github.com/meshsplice/meshsplice/cmd/meshsplice")
	sock := filepath.Join(t.TempDir(), "cni.sock")
	stateDir := t.TempDir()
	ag := &agentProc{t: t, bin: bin, metrics: fmt.Sprintf("127.0.0.1:%d", freePort(t))}
	ag.args = []string{bin, "agent", "--kubernetes", "--kubeconfig", srv.Kubeconfig, "--node-name", "node-a",
		"--istio-namespace", istioNS, "--cgroup", m.cg.Path, "--pin-dir", m.pin, "--cni-socket", sock,
		"--state-dir", stateDir, "--metrics-addr", ag.metrics, "--drift-interval", "500ms"}
	ag.client = api.NewClient(sock, 5*time.Second)
	t.Cleanup(ag.client.Close)
	ag.start()
	defer ag.stop()

	register := func(name string) error {
		p := pods[name]
		_, err := ag.client.AddPod(ctx, api.PodRegistration{
			ContainerID: "c-" + name, Netns: p.NS.Path(), IfName: "eth0", IPs: []netip.Addr{p.IPv4, p.IPv6},
			PodName: name, PodNamespace: ns, PodUID: uids[name], ServiceAccount: name,
			Labels: map[string]string{"app": name}, Annotations: injected(),
		})
		return err
	}
	if err := register("db"); err != nil {
		t.Fatal(err)
	}
	if err := register("web"); err == nil {
		t.Fatal("web registered although the kernel's pod table holds one pod")
	} else {
		t.Logf("web's registration failed as it should: %v", err)
	}

	// event waits for a Warning Event with reason on the pod name.
	event := func(name, reason string) corev1.Event {
		t.Helper()
		var found corev1.Event
		waitUntil(t, reason+" Event on "+name, 30*time.Second, func() bool {
			list, err := srv.Client.CoreV1().Events(ns).List(ctx, metav1.ListOptions{
				FieldSelector: "involvedObject.kind=Pod,involvedObject.name=" + name + ",involvedObject.uid=" + uids[name]})
			if err != nil {
				t.Fatal(err)
			}
			for _, e := range list.Items {
				if e.Reason == reason {
					found = e
					return true
				}
			}
			return false
		})
		if found.Type != corev1.EventTypeWarning || found.Source.Component != "meshsplice-agent" || found.Source.Host != "node-a" ||
			found.InvolvedObject.Namespace != ns || found.Message == "" {
			t.Errorf("%s Event on %s: %+v", reason, name, found)
		}
		t.Logf("Event on %s: %s: %s", name, found.Reason, found.Message)
		return found
	}
	if e := event("web", agent.ReasonMapFull); !strings.Contains(e.Message, "argument list too long") {
		t.Errorf("MapFull Event message %q does not say the table is full", e.Message)
	}

	args := []string{"--kubernetes", "--kubeconfig", srv.Kubeconfig, "--node-name", "node-a", "--istio-namespace", istioNS,
		"--pin-dir", m.pin, "--state-dir", stateDir}
	rep, drift := checkDrift(t, bin, args...)
	if !drift || len(rep.Pods) != 1 || rep.Pods[0].Pod != ns+"/web" || len(rep.Pods[0].Items) != 1 ||
		rep.Pods[0].Items[0].Field != "pod" || !strings.HasPrefix(rep.Pods[0].Items[0].Config, "meshed by Istio") {
		t.Fatalf("check --drift --kubernetes: %+v (exit 1: %v), want web alone, meshed by Istio and unknown to the kernel", rep, drift)
	}

	// Behind the agent's back: db's kernel entry changes.
	db := pods["db"]
	port := redirect.CaptureMsPortKey{Netns: db.Cookie, Kind: redirect.CaptureMsPortKindMS_PORT_IN_EXCLUDE, Port: 7777}
	if err := pinnedMapRW(t, m.pin, redirect.CaptureMapMsPorts).Update(&port, uint8(1), ebpf.UpdateAny); err != nil {
		t.Fatal(err)
	}
	if e := event("db", agent.ReasonKernelDrift); !strings.Contains(e.Message, "excludeInboundPorts: config none, kernel 7777") {
		t.Errorf("KernelDrift Event message %q does not name the change", e.Message)
	}
	eventually(t, "db mended by the agent", func() bool {
		rep, _ := checkDrift(t, bin, args...)
		return len(rep.Pods) == 1 && rep.Pods[0].Pod == ns+"/web"
	})

	// A policy that does not fit: rolled back, on the node and on db.
	ic, err := istioclient.NewForConfig(srv.Config)
	if err != nil {
		t.Fatal(err)
	}
	ap := &securityv1.AuthorizationPolicy{ObjectMeta: metav1.ObjectMeta{Name: "db", Namespace: ns},
		Spec: apisecurity.AuthorizationPolicy{Action: apisecurity.AuthorizationPolicy_ALLOW,
			Selector: &typev1beta1.WorkloadSelector{MatchLabels: map[string]string{"app": "db"}},
			Rules: []*apisecurity.Rule{{From: []*apisecurity.Rule_From{{Source: &apisecurity.Source{
				Principals: []string{"cluster.local/ns/" + ns + "/sa/web"}}}}}}}}
	if ap, err = ic.SecurityV1().AuthorizationPolicies(ns).Create(ctx, ap, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "db's policy applied, no drift on db", func() bool {
		st, err := datapath.ReadPodPolicies(m.pin)
		if err != nil || !st[db.Cookie].Enforced {
			return false
		}
		rep, _ := checkDrift(t, bin, args...)
		return len(rep.Pods) == 1 && rep.Pods[0].Pod == ns+"/web"
	})
	ap.Spec.Rules[0].From[0].Source.Principals = []string{"cluster.local/ns/" + ns + "/sa/other"}
	if _, err := ic.SecurityV1().AuthorizationPolicies(ns).Update(ctx, ap, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	var nodeEvent corev1.Event
	waitUntil(t, "PolicyNotApplied Event on the node", 30*time.Second, func() bool {
		list, err := srv.Client.CoreV1().Events(metav1.NamespaceDefault).List(ctx, metav1.ListOptions{
			FieldSelector: "involvedObject.kind=Node,involvedObject.name=node-a,reason=" + agent.ReasonPolicyNotApplied})
		if err != nil {
			t.Fatal(err)
		}
		if len(list.Items) > 0 {
			nodeEvent = list.Items[0]
		}
		return len(list.Items) > 0
	})
	t.Logf("Event on node-a: %s: %s", nodeEvent.Reason, nodeEvent.Message)
	if !strings.Contains(nodeEvent.Message, "policy map full") {
		t.Errorf("PolicyNotApplied Event message %q does not say the set table is full", nodeEvent.Message)
	}
	waitUntil(t, "KernelDrift Event on db naming its policy", 30*time.Second, func() bool {
		list, err := srv.Client.CoreV1().Events(ns).List(ctx, metav1.ListOptions{
			FieldSelector: "involvedObject.name=db,reason=" + agent.ReasonKernelDrift})
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range list.Items {
			if strings.Contains(e.Message, "policy of "+db.IPv4.String()+" (set): config identity") ||
				strings.Contains(e.Message, "policy of "+db.IPv4.String()+" (set): config a policy set") {
				return true
			}
		}
		return false
	})
}
