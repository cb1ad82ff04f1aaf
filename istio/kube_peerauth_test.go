package istio_test

import (
	"fmt"
	"net/netip"
	"testing"

	apisecurity "istio.io/api/security/v1beta1"
	apitype "istio.io/api/type/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshsplice/meshsplice/istio"
	"github.com/meshsplice/meshsplice/policy"
)

// TestKubeSourcePeerAuthentication: PeerAuthentication creations, edits
// (mode and portLevelMtls) and deletions reach the Config, and compile to
// the STRICT ports istiod would give; the cluster's pods say which have no
// sidecar: not a pod Istio injected, nor one running istio-proxy without
// injection (a gateway), nor one being deleted.
func TestKubeSourcePeerAuthentication(t *testing.T) {
	e := newKubeEnv(t)
	ctx := ctxT(t)
	e.run(t, "")
	ip := map[string]netip.Addr{}
	for _, n := range []string{"web", "plain", "gateway", "going"} {
		ip[n] = nextIP()
	}
	e.createPod(t, podSpec{name: "web", node: e.node, sa: "web", sidecar: "sidecar", labels: map[string]string{"app": "web"},
		annotations: map[string]string{istio.AnnotationStatus: injectedStatus("default", "istio-validation")}, ip: ip["web"]})
	e.createPod(t, podSpec{name: "plain", node: "other-" + e.node, ip: ip["plain"]})
	e.createPod(t, podSpec{name: "gateway", node: "other-" + e.node, sidecar: "sidecar", ip: ip["gateway"]})
	e.createPod(t, podSpec{name: "going", node: "other-" + e.node, ip: ip["going"]})

	pas := e.ic.SecurityV1().PeerAuthentications(e.ns)
	pa := &securityv1.PeerAuthentication{ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec: apisecurity.PeerAuthentication{
			Selector: &apitype.WorkloadSelector{MatchLabels: map[string]string{"app": "web"}},
			Mtls:     &apisecurity.PeerAuthentication_MutualTLS{Mode: apisecurity.PeerAuthentication_MutualTLS_STRICT},
			PortLevelMtls: map[uint32]*apisecurity.PeerAuthentication_MutualTLS{
				8080: {Mode: apisecurity.PeerAuthentication_MutualTLS_PERMISSIVE}},
		}}
	if _, err := pas.Create(ctx, pa, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	// strictPorts compiles the delivered Config for the web pod as the
	// agent does and says which ports refuse plaintext.
	strictPorts := func(c istio.Config) string {
		w := policy.Workload{Namespace: e.ns, Name: "web", ServiceAccount: "web", Labels: map[string]string{"app": "web"},
			IPs: []netip.Addr{ip["web"]}}
		var mine []*securityv1.PeerAuthentication
		for _, p := range c.PeerAuthentications {
			if p.Namespace == e.ns {
				mine = append(mine, p)
			}
		}
		res, err := policy.Compile(policy.Input{Workloads: []policy.Workload{w}, PeerAuthentications: mine}, policy.NewAllocator())
		if err != nil {
			return err.Error()
		}
		if i := res.WorkloadSet[w.Key()]; i >= 0 {
			for _, a := range res.Sets[i].Atoms {
				if a.Plaintext {
					return a.PortDesc
				}
			}
		}
		return "none"
	}
	e.waitFor(t, "a STRICT PeerAuthentication with a PERMISSIVE port", func(c istio.Config) string {
		if got := strictPorts(c); got != "any but 8080" {
			return "STRICT ports " + got
		}
		return ""
	})
	c := e.waitFor(t, "the cluster's pods", func(c istio.Config) string {
		if len(c.PodIPs) < 4 {
			return fmt.Sprintf("%d pod IPs", len(c.PodIPs))
		}
		return ""
	})
	for name, want := range map[string]bool{"web": false, "plain": true, "gateway": false, "going": true} {
		if got := c.PodIPs[ip[name]].Plaintext(); got != want {
			t.Errorf("pod %s (%+v): plaintext %v, want %v", name, c.PodIPs[ip[name]], got, want)
		}
	}

	// An edit: the workload PERMISSIVE, one port STRICT.
	cur, err := pas.Get(ctx, "web", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cur.Spec.Mtls.Mode = apisecurity.PeerAuthentication_MutualTLS_PERMISSIVE
	cur.Spec.PortLevelMtls = map[uint32]*apisecurity.PeerAuthentication_MutualTLS{
		9090: {Mode: apisecurity.PeerAuthentication_MutualTLS_STRICT}}
	if _, err := pas.Update(ctx, cur, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	e.waitFor(t, "the PeerAuthentication edit", func(c istio.Config) string {
		if got := strictPorts(c); got != "9090" {
			return "STRICT ports " + got
		}
		return ""
	})

	// A pod being deleted (kubelet has not confirmed) is no longer taken
	// for plaintext: its IP may already be another pod's.
	grace := int64(30)
	if err := e.srv.Client.CoreV1().Pods(e.ns).Delete(ctx, "going", metav1.DeleteOptions{GracePeriodSeconds: &grace}); err != nil {
		t.Fatal(err)
	}
	e.waitFor(t, "a terminating pod", func(c istio.Config) string {
		if id, ok := c.PodIPs[ip["going"]]; ok && id.Plaintext() {
			return fmt.Sprintf("going: %+v", id)
		}
		return ""
	})

	if err := pas.Delete(ctx, "web", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	e.waitFor(t, "the PeerAuthentication deletion", func(c istio.Config) string {
		if got := strictPorts(c); got != "none" {
			return "STRICT ports " + got
		}
		return ""
	})
}
