package agent

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"

	securityv1beta1 "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"

	"github.com/meshsplice/meshsplice/agent/api"
	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/istio"
	"github.com/meshsplice/meshsplice/policy"
)

// driftWorld is a node of two registered pods, db and web; an ALLOW
// policy lets only web's service account reach db.
func driftWorld(tb testing.TB) driftInput {
	tb.Helper()
	allow := &securityv1.AuthorizationPolicy{}
	allow.Namespace, allow.Name = "shop", "db"
	allow.Spec.Selector = &typev1beta1.WorkloadSelector{MatchLabels: map[string]string{"app": "db"}}
	allow.Spec.Rules = []*securityv1beta1.Rule{{From: []*securityv1beta1.Rule_From{{Source: &securityv1beta1.Source{
		Principals: []string{"cluster.local/ns/shop/sa/web"}}}}}}
	reg := func(name, ip4, ip6 string, cookie uint64, ann map[string]string) *pod {
		return &pod{Cookie: cookie, Reg: api.PodRegistration{ContainerID: "c-" + name, Netns: "/run/netns/" + name,
			IPs:     []netip.Addr{netip.MustParseAddr(ip4), netip.MustParseAddr(ip6)},
			PodName: name, PodNamespace: "shop", ServiceAccount: name, Labels: map[string]string{"app": name},
			Annotations: ann}}
	}
	injected := map[string]string{istio.AnnotationStatus: "{}"}
	return driftInput{
		cfg:  istio.Config{Mesh: istio.DefaultMeshConfig(), Node: istio.NodeSwitches{Capture: true, Splice: true}, AuthorizationPolicies: []*securityv1.AuthorizationPolicy{allow}},
		node: datapath.NodeSettings{Capture: true, Splice: true},
		pods: map[string]*pod{
			"c-db":  reg("db", "10.0.0.2", "fd00::2", 2, injected),
			"c-web": reg("web", "10.0.0.3", "fd00::3", 3, map[string]string{istio.AnnotationStatus: "{}", istio.AnnotationExcludeInboundPorts: "9090"}),
		},
		ids: policy.NewAllocator(),
	}
}

// kernelFor is the kernel state an agent writes for in, as AddPod and
// SetPolicy write it (the same expectation, in the kernel's form). It
// numbers the identities in in.ids, as the agent's identities.json does.
func kernelFor(tb testing.TB, in driftInput) *datapath.KernelState {
	tb.Helper()
	in.pods = clonePods(in.pods) // in.ids numbers the identities for both

	want, _, err := expect(in)
	if err != nil {
		tb.Fatal(err)
	}
	k := &datapath.KernelState{Node: in.node, SpliceAvailable: true, IPs: map[netip.Addr]datapath.KernelIP{}, Sets: map[uint32]datapath.PolicySet{}}
	setID := map[*datapath.PolicySet]uint32{}
	for _, w := range want {
		t := w.traffic
		t.Sidecar = t.Sidecar || t.Capture
		t.DualStack = t.CaptureIPv6() // the kernel's flag is the answer
		t.PodIPs = nil
		k.Pods = append(k.Pods, datapath.Pod{Cookie: w.cookie, IPs: w.ips, Traffic: t, Identity: w.identity})
		for ip, pe := range w.policy {
			kip := datapath.KernelIP{Identity: pe.identity}
			if pe.set != nil {
				if setID[pe.set] == 0 {
					setID[pe.set] = uint32(len(setID) + 7) // the kernel numbers sets its own way
					s := *pe.set
					s.Atoms = nil
					k.Sets[setID[pe.set]] = s
				}
				kip.Set = setID[pe.set]
			}
			k.IPs[ip] = kip
		}
	}
	return k
}

func clonePods(pods map[string]*pod) map[string]*pod {
	out := map[string]*pod{}
	for id, p := range pods {
		cp := *p
		out[id] = &cp
	}
	return out
}

func podOf(k *datapath.KernelState, cookie uint64) *datapath.Pod {
	for i := range k.Pods {
		if k.Pods[i].Cookie == cookie {
			return &k.Pods[i]
		}
	}
	return nil
}

// TestDriftDiff: each change to the kernel behind the agent's back is
// reported on the pod it concerns, by the setting it changed, and nothing
// else is.
func TestDriftDiff(t *testing.T) {
	db4 := netip.MustParseAddr("10.0.0.2")
	for _, c := range []struct {
		name    string
		change  func(k *datapath.KernelState)
		want    map[string][]string // pod -> fields that differ
		node    []string
		gone    string // the registration whose netns is gone
		checked int    // pods checked, if not 2
	}{
		{name: "in step", change: func(*datapath.KernelState) {}},
		{name: "pod missing in the kernel", change: func(k *datapath.KernelState) {
			k.Pods = slices.DeleteFunc(k.Pods, func(p datapath.Pod) bool { return p.Cookie == 2 })
		}, want: map[string][]string{"shop/db": {"pod"}}},
		{name: "extra port", change: func(k *datapath.KernelState) {
			p := podOf(k, 3)
			p.Traffic.ExcludeInboundPorts = append(slices.Clone(p.Traffic.ExcludeInboundPorts), 7777)
		}, want: map[string][]string{"shop/web": {"excludeInboundPorts"}}},
		{name: "port missing", change: func(k *datapath.KernelState) {
			podOf(k, 3).Traffic.ExcludeInboundPorts = nil
		}, want: map[string][]string{"shop/web": {"excludeInboundPorts"}}},
		{name: "splice off in the kernel", change: func(k *datapath.KernelState) {
			podOf(k, 2).Traffic.Splice = false
		}, want: map[string][]string{"shop/db": {"splice"}}},
		{name: "policy set mismatch", change: func(k *datapath.KernelState) {
			s := k.Sets[k.IPs[db4].Set]
			for id := range s.IdentityMasks {
				s.IdentityMasks[id] ^= 1
			}
		}, want: map[string][]string{"shop/db": {"policy of 10.0.0.2 (set)", "policy of fd00::2 (set)"}}},
		{name: "address without its set", change: func(k *datapath.KernelState) {
			k.IPs[db4] = datapath.KernelIP{Identity: k.IPs[db4].Identity}
		}, want: map[string][]string{"shop/db": {"policy of 10.0.0.2 (set)"}}},
		{name: "address lost from the policy tables", change: func(k *datapath.KernelState) {
			delete(k.IPs, db4)
		}, want: map[string][]string{"shop/db": {"policy of 10.0.0.2"}}},
		{name: "identity of a source", change: func(k *datapath.KernelState) {
			web := netip.MustParseAddr("10.0.0.3")
			k.IPs[web] = datapath.KernelIP{Identity: k.IPs[web].Identity + 100, Set: k.IPs[web].Set}
		}, want: map[string][]string{"shop/web": {"policy of 10.0.0.3 (identity)"}}},
		{name: "kernel pod nobody registered", change: func(k *datapath.KernelState) {
			k.Pods = append(k.Pods, datapath.Pod{Cookie: 99, IPs: []netip.Addr{netip.MustParseAddr("10.0.0.9")}})
		}, want: map[string][]string{"netns cookie 99": {"pod"}}},
		{name: "node switch", change: func(k *datapath.KernelState) { k.Node.Capture = false },
			node: []string{"node capture"}},
		{name: "node app-splice switch", change: func(k *datapath.KernelState) { k.Node.AppSpliceOff = true },
			node: []string{"node app-splice"}},
		{name: "iptables mode in the kernel", change: func(k *datapath.KernelState) {
			podOf(k, 2).Traffic.IPTables = true
		}, want: map[string][]string{"shop/db": {"iptables mode (Istio's own iptables capture)"}}},
		{name: "gone pod still in the kernel", gone: "c-web", change: func(*datapath.KernelState) {},
			want: map[string][]string{"shop/web": {"pod"}}},
		{name: "gone pod gone from the kernel too", gone: "c-web", change: func(k *datapath.KernelState) {
			k.Pods = slices.DeleteFunc(k.Pods, func(p datapath.Pod) bool { return p.Cookie == 3 })
		}, checked: 1},
	} {
		t.Run(c.name, func(t *testing.T) {
			in := driftWorld(t)
			k := kernelFor(t, in)
			c.change(k)
			in.gone = func(cookie uint64, _ string) (bool, error) {
				return c.gone != "" && in.pods[c.gone].Cookie == cookie, nil
			}
			rep, err := computeDrift(in, k)
			if err != nil {
				t.Fatal(err)
			}
			got := map[string][]string{}
			for _, p := range rep.Pods {
				for _, it := range p.Items {
					got[p.Pod] = append(got[p.Pod], it.Field)
				}
			}
			if len(got) != len(c.want) {
				t.Fatalf("drift %+v, want fields %v", rep, c.want)
			}
			for pod, fields := range c.want {
				slices.Sort(got[pod])
				slices.Sort(fields)
				if !slices.Equal(got[pod], fields) {
					t.Errorf("%s: fields %v, want %v (%+v)", pod, got[pod], fields, rep.Pods)
				}
			}
			var node []string
			for _, it := range rep.Node {
				node = append(node, it.Field)
			}
			if !slices.Equal(node, c.node) {
				t.Errorf("node drift %v, want %v", rep.Node, c.node)
			}
			if rep.Drifted() != (len(c.want)+len(c.node) > 0) {
				t.Errorf("Drifted() = %v", rep.Drifted())
			}
			checked := 2 // db and web
			if _, extra := c.want["netns cookie 99"]; extra {
				checked = 3
			}
			if c.checked != 0 {
				checked = c.checked
			}
			if rep.PodsChecked != checked {
				t.Errorf("pods checked %d, want %d", rep.PodsChecked, checked)
			}
		})
	}
}

// TestDriftFromConfig: an edit of the config the kernel has not followed
// is drift, named with what the config says and what the kernel holds.
func TestDriftFromConfig(t *testing.T) {
	base := driftWorld(t)
	k := kernelFor(t, base)
	for _, c := range []struct {
		name       string
		edit       func(in *driftInput)
		pod, field string
		config     string
	}{
		{"annotation edited", func(in *driftInput) {
			in.pods["c-web"].Reg.Annotations = map[string]string{istio.AnnotationStatus: "{}", istio.AnnotationExcludeInboundPorts: "9090,9091"}
		}, "shop/web", "excludeInboundPorts", "9090,9091"},
		{"annotation invalid", func(in *driftInput) {
			in.pods["c-web"].Reg.Annotations = map[string]string{istio.AnnotationStatus: "{}", istio.AnnotationExcludeInboundPorts: "99999"}
		}, "shop/web", "capture settings", "invalid annotations"},
		{"policy edited", func(in *driftInput) {
			in.cfg.AuthorizationPolicies[0] = in.cfg.AuthorizationPolicies[0].DeepCopy()
			in.cfg.AuthorizationPolicies[0].Spec.Rules[0].From[0].Source.Principals = []string{"cluster.local/ns/shop/sa/other"}
		}, "shop/db", "policy of 10.0.0.2 (set)", "a policy set"},
		{"Kubernetes: the API server's annotations win", func(in *driftInput) {
			in.cfg.Pods = []istio.Pod{{Namespace: "shop", Name: "web", ServiceAccount: "web", Labels: map[string]string{"app": "web"},
				Annotations: map[string]string{istio.AnnotationStatus: "{}"}}}
		}, "shop/web", "excludeInboundPorts", "none"},
		{"Kubernetes: a meshed pod without registration", func(in *driftInput) {
			in.cfg.Pods = []istio.Pod{{Namespace: "shop", Name: "new", IPs: []netip.Addr{netip.MustParseAddr("10.0.0.8")},
				Mesh: istio.PodMesh{Meshed: true}}}
		}, "shop/new", "pod", "meshed by Istio"},
	} {
		t.Run(c.name, func(t *testing.T) {
			in := driftWorld(t)
			in.ids = base.ids
			c.edit(&in)
			rep, err := computeDrift(in, k)
			if err != nil {
				t.Fatal(err)
			}
			if len(rep.Pods) != 1 || rep.Pods[0].Pod != c.pod {
				t.Fatalf("drift %+v, want only %s", rep.Pods, c.pod)
			}
			var found bool
			for _, it := range rep.Pods[0].Items {
				if it.Field == c.field && strings.HasPrefix(it.Config, c.config) {
					found = true
				}
			}
			if !found {
				t.Fatalf("%s: %+v, want %s with config %q", c.pod, rep.Pods[0].Items, c.field, c.config)
			}
		})
	}
}

// BenchmarkComputeDrift: a drift check of 500 pods of 50 apps, each app
// under its own ALLOW policy (the expected state is compiled afresh, as
// the agent's check does).
func BenchmarkComputeDrift(b *testing.B) {
	in := driftWorld(b)
	in.pods = map[string]*pod{}
	in.cfg.AuthorizationPolicies = nil
	for app := range 50 {
		ap := &securityv1.AuthorizationPolicy{}
		ap.Namespace, ap.Name = "shop", fmt.Sprintf("app%d", app)
		ap.Spec.Selector = &typev1beta1.WorkloadSelector{MatchLabels: map[string]string{"app": ap.Name}}
		ap.Spec.Rules = []*securityv1beta1.Rule{{From: []*securityv1beta1.Rule_From{{Source: &securityv1beta1.Source{
			Principals: []string{fmt.Sprintf("cluster.local/ns/shop/sa/app%d", (app+1)%50)}}}}}}
		in.cfg.AuthorizationPolicies = append(in.cfg.AuthorizationPolicies, ap)
	}
	for i := range 500 {
		app := fmt.Sprintf("app%d", i%50)
		in.pods[fmt.Sprintf("c-%d", i)] = &pod{Cookie: uint64(i + 1), Reg: api.PodRegistration{ContainerID: fmt.Sprintf("c-%d", i),
			IPs:     []netip.Addr{netip.AddrFrom4([4]byte{10, 1, byte(i / 256), byte(i % 256)})},
			PodName: fmt.Sprintf("p%d", i), PodNamespace: "shop", ServiceAccount: app, Labels: map[string]string{"app": app},
			Annotations: map[string]string{istio.AnnotationStatus: "{}"}}}
	}
	k := kernelFor(b, in)
	b.ResetTimer()
	for b.Loop() {
		in.pods = clonePods(in.pods)
		rep, err := computeDrift(in, k)
		if err != nil || rep.Drifted() {
			b.Fatalf("%v %+v", err, rep.Pods)
		}
	}
}
