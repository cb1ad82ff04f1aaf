package agent

import (
	"bytes"
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"

	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/istio"
	"github.com/meshsplice/meshsplice/policy"
)

// Drift: does the kernel hold what Istio's configuration says? For each
// pod of the node, what the config and the pod's registration imply
// (capture settings as istio.ParseTraffic resolves them, splice, the
// proxy's ids as the kernel sees them, the pod's addresses and identity,
// and the content of the policy set each address is judged by) is compared
// with what the kernel maps hold (datapath.KernelState, read from the maps
// themselves). `meshsplice check --drift` does it without the agent (the
// config folder or the API server, the agent's state directory and the
// pins); the agent does it periodically and after each apply
// (drift_agent.go).

// DriftItem is one difference: a setting, what the config says and what
// the kernel holds.
type DriftItem struct {
	Field  string `json:"field"`
	Config string `json:"config"`
	Kernel string `json:"kernel"`
}

// PodDrift is a pod whose kernel state differs from its config.
type PodDrift struct {
	Pod         string      `json:"pod"` // namespace/name, or what identifies it
	ContainerID string      `json:"container_id,omitempty"`
	Netns       string      `json:"netns,omitempty"`
	Cookie      uint64      `json:"netns_cookie,omitempty"`
	Items       []DriftItem `json:"differences"`
}

// Summary is the differences on one line (logs, Events).
func (d PodDrift) Summary() string {
	parts := make([]string, len(d.Items))
	for i, it := range d.Items {
		parts[i] = fmt.Sprintf("%s: config %s, kernel %s", it.Field, it.Config, it.Kernel)
	}
	return strings.Join(parts, "; ")
}

// DriftReport is the outcome of a drift check.
type DriftReport struct {
	// PodsChecked counts the pods compared (registered, in the kernel, or
	// meshed by Istio on this node).
	PodsChecked int `json:"pods_checked"`
	// Node lists differences in the node switches.
	Node []DriftItem `json:"node,omitempty"`
	// Pods are the pods that differ, sorted.
	Pods []PodDrift `json:"pods,omitempty"`
	// Skipped names pods that cannot be checked, and why.
	Skipped []string `json:"skipped,omitempty"`
}

// Drifted tells whether anything differs.
func (r DriftReport) Drifted() bool { return len(r.Node) > 0 || len(r.Pods) > 0 }

// driftInput is what the expected state is made of.
type driftInput struct {
	cfg istio.Config
	// node is what the node switches should be (the agent's flags and the
	// meshsplice ConfigMap).
	node datapath.NodeSettings
	// pods are the registrations by container ID; copies: expect changes
	// them on Kubernetes.
	pods map[string]*pod
	// ids numbers identities; a copy of the agent's (compiling may number
	// new ones).
	ids *policy.Allocator
	// hostIDs maps the proxy's ids through the pod's user namespace
	// (datapath.HostProxyIDs; tests replace it).
	hostIDs func(netns string, uid, gid uint32) (uint32, uint32, error)
	// appSpliceDefault is the node's app-splice default for pods that do
	// not say (datapath.AppSpliceDefault: measured on the kernel).
	appSpliceDefault bool
	// gone tells whether a pod's network namespace is gone
	// (datapath.NetnsGone; nil: never).
	gone func(cookie uint64, netns string) (bool, error)
}

// podExpect is what the kernel should hold for one pod.
type podExpect struct {
	name, containerID, netns string
	cookie                   uint64
	// unregistered: Istio meshes the pod (Kubernetes) but the agent has no
	// registration for it, so the kernel knows nothing of it.
	unregistered bool
	// gone: the pod's network namespace is gone; the agent forgets it.
	gone bool
	ips  []netip.Addr
	// traffic holds the settings as AddPod writes them (proxy ids on the
	// host); invalid says why there are none.
	traffic  istio.Traffic
	invalid  string
	identity uint32
	// policy is each address's entry in the policy tables; an address
	// missing here has none.
	policy map[netip.Addr]ipExpect
}

// ipExpect is what an address should mean to policy.
type ipExpect struct {
	identity uint32
	set      *datapath.PolicySet // nil: no policy set
}

// expect resolves every pod's expected kernel state. On Kubernetes (the
// config has the node's pods) the API server's annotations, labels and
// service account of a registered pod are the truth, and a pod Istio
// meshes that has no registration is expected too.
func expect(in driftInput) ([]podExpect, []string, error) {
	var skipped []string
	byName := map[string]istio.Pod{}
	for _, kp := range in.cfg.Pods {
		byName[kp.Namespace+"/"+kp.Name] = kp
	}
	registered := map[string]bool{}
	for id, p := range in.pods {
		cp := *p
		if p.Reg.PodName != "" {
			key := podNamespace(p.Reg) + "/" + p.Reg.PodName
			registered[key] = true
			if kp, ok := byName[key]; ok {
				cp.Reg.Annotations, cp.Reg.Labels, cp.Reg.ServiceAccount = kp.Annotations, kp.Labels, kp.ServiceAccount
			}
		}
		in.pods[id] = &cp
	}
	polIn, ipWorkload := policyInput(in.cfg, in.pods)
	res, err := policy.Compile(polIn, in.ids)
	if err != nil {
		return nil, nil, fmt.Errorf("compile authorization policies: %w", err)
	}
	kp := kernelPolicy(res, ipWorkload)
	ipPolicy := map[netip.Addr]ipExpect{}
	for ip, ipp := range kp.IPs {
		e := ipExpect{identity: ipp.Identity}
		if ipp.Set >= 0 && ipp.Set < len(kp.Sets) {
			e.set = &kp.Sets[ipp.Set]
		}
		ipPolicy[ip.Unmap()] = e
	}
	defaults := in.cfg.Defaults()
	defaults.AppSplice = in.appSpliceDefault
	var out []podExpect
	for _, p := range in.pods {
		if p.Recovered {
			skipped = append(skipped, fmt.Sprintf("netns cookie %d: rebuilt from the kernel after the agent's state was lost; its annotations are unknown until its CNI registration comes again", p.Cookie))
			continue
		}
		e := podExpect{name: p.Reg.String(), containerID: p.Reg.ContainerID, netns: p.Reg.Netns, cookie: p.Cookie,
			policy: map[netip.Addr]ipExpect{}}
		if in.gone != nil {
			if gone, err := in.gone(p.Cookie, p.Reg.Netns); err == nil && gone {
				e.gone = true
				out = append(out, e)
				continue
			}
		}
		for _, ip := range p.Reg.IPs {
			ip = ip.Unmap()
			e.ips = append(e.ips, ip)
			if pe, ok := ipPolicy[ip]; ok {
				e.policy[ip] = pe
			}
		}
		slices.SortFunc(e.ips, netip.Addr.Compare)
		e.identity = uint32(in.ids.ID(spiffeID(in.cfg.TrustDomain(), podNamespace(p.Reg), p.Reg.ServiceAccount)))
		tr, _, err := istio.ParseTraffic(p.Reg.Annotations, defaults)
		tr, _ = istio.ForRevision(tr, p.Reg.Annotations, p.Reg.Labels, in.cfg.Revision)
		switch {
		case err != nil:
			e.invalid = "invalid annotations (" + err.Error() + ")"
		default:
			tr.PodIPs = p.Reg.IPs
			if in.hostIDs != nil && p.Reg.Netns != "" {
				uid, gid, err := in.hostIDs(p.Reg.Netns, tr.ProxyUID, tr.ProxyGID)
				if err != nil {
					e.invalid = "the proxy's ids cannot be mapped to the host (" + err.Error() + ")"
				}
				tr.ProxyUID, tr.ProxyGID = uid, gid
			}
			e.traffic = tr
		}
		out = append(out, e)
	}
	for _, kp := range in.cfg.Pods {
		if !kp.Mesh.Meshed || len(kp.IPs) == 0 || registered[kp.String()] {
			continue
		}
		out = append(out, podExpect{name: kp.String(), unregistered: true, ips: kp.IPs})
	}
	return out, skipped, nil
}

// computeDrift compares the expected state with the kernel's.
func computeDrift(in driftInput, k *datapath.KernelState) (DriftReport, error) {
	want, skipped, err := expect(in)
	if err != nil {
		return DriftReport{}, err
	}
	rep := diffPods(want, k)
	rep.Skipped = skipped
	rep.Node = diffNode(in.node, k)
	return rep, nil
}

// diffNode compares the node switches. A kernel without sk_msg keeps
// splice off whatever the config says.
func diffNode(want datapath.NodeSettings, k *datapath.KernelState) []DriftItem {
	var out []DriftItem
	if want.Capture != k.Node.Capture {
		out = append(out, DriftItem{"node capture", onOff(want.Capture), onOff(k.Node.Capture)})
	}
	if s := want.Splice && k.SpliceAvailable; s != k.Node.Splice {
		out = append(out, DriftItem{"node splice", onOff(s), onOff(k.Node.Splice)})
	}
	if want.AppSpliceOff != k.Node.AppSpliceOff {
		out = append(out, DriftItem{"node app-splice", onOff(!want.AppSpliceOff), onOff(!k.Node.AppSpliceOff)})
	}
	return out
}

// diffPods compares each expected pod with the kernel's pods; kernel pods
// nobody expects are drift too.
func diffPods(want []podExpect, k *datapath.KernelState) DriftReport {
	kernel := map[uint64]datapath.Pod{}
	for _, kp := range k.Pods {
		kernel[kp.Cookie] = kp
	}
	var rep DriftReport
	seen := map[uint64]bool{}
	for _, w := range want {
		rep.PodsChecked++
		d := PodDrift{Pod: w.name, ContainerID: w.containerID, Netns: w.netns, Cookie: w.cookie}
		got, ok := kernel[w.cookie]
		switch {
		case w.gone && !ok:
			rep.PodsChecked-- // gone from everywhere: nothing to compare
		case w.gone:
			seen[w.cookie] = true
			d.Items = []DriftItem{{"pod", "gone (its network namespace is gone: the agent forgets it)", "still in the kernel tables (" + addrs(got.IPs) + ")"}}
		case w.unregistered:
			d.Items = []DriftItem{{"pod", "meshed by Istio (" + addrs(w.ips) + ")", "no registration and nothing in the kernel tables: the pod is not captured"}}
		case !ok:
			d.Items = []DriftItem{{"pod", "registered (" + addrs(w.ips) + ")", "missing from the kernel tables"}}
		default:
			seen[w.cookie] = true
			d.Items = diffPod(w, got, k)
		}
		if len(d.Items) > 0 {
			rep.Pods = append(rep.Pods, d)
		}
	}
	for _, kp := range k.Pods {
		if seen[kp.Cookie] {
			continue
		}
		rep.PodsChecked++
		rep.Pods = append(rep.Pods, PodDrift{Pod: fmt.Sprintf("netns cookie %d", kp.Cookie), Cookie: kp.Cookie,
			Items: []DriftItem{{"pod", "not registered", "in the kernel tables (" + addrs(kp.IPs) + ")"}}})
	}
	sort.Slice(rep.Pods, func(i, j int) bool {
		if rep.Pods[i].Pod != rep.Pods[j].Pod {
			return rep.Pods[i].Pod < rep.Pods[j].Pod
		}
		return rep.Pods[i].Cookie < rep.Pods[j].Cookie
	})
	return rep
}

// diffPod compares one registered pod with its kernel entry.
func diffPod(w podExpect, got datapath.Pod, k *datapath.KernelState) []DriftItem {
	var out []DriftItem
	add := func(field, config, kernel string) {
		if config != kernel {
			out = append(out, DriftItem{field, config, kernel})
		}
	}
	add("addresses", addrs(w.ips), addrs(got.IPs))
	if w.invalid != "" {
		out = append(out, DriftItem{"capture settings", w.invalid, "the last good settings, kept"})
	} else {
		out = append(out, trafficItems(w.traffic, got.Traffic)...)
	}
	add("identity", strconv.FormatUint(uint64(w.identity), 10), strconv.FormatUint(uint64(got.Identity), 10))
	for _, ip := range w.ips {
		pe, known := w.policy[ip]
		kip, inKernel := k.IPs[ip]
		field := "policy of " + ip.String()
		switch {
		case !known && !inKernel:
		case !known:
			add(field, "unknown address (no entry)", fmt.Sprintf("identity %d, %s", kip.Identity, kernelSetText(k, kip.Set)))
		case !inKernel:
			add(field, fmt.Sprintf("identity %d, %s", pe.identity, setText(pe.set)), "no entry (an unknown source, judged by no set)")
		default:
			add(field+" (identity)", strconv.FormatUint(uint64(pe.identity), 10), strconv.FormatUint(uint64(kip.Identity), 10))
			ks, has := k.Sets[kip.Set]
			switch {
			case pe.set == nil && kip.Set == 0:
			case pe.set == nil || kip.Set == 0 || !has:
				add(field+" (set)", setText(pe.set), kernelSetText(k, kip.Set))
			default:
				if diff := setDiff(*pe.set, ks); len(diff) > 0 {
					if len(diff) > 3 {
						diff = append(diff[:3], fmt.Sprintf("and %d more", len(diff)-3))
					}
					out = append(out, DriftItem{field + " (set)", setText(pe.set),
						fmt.Sprintf("%s, differs in %s", kernelSetText(k, kip.Set), strings.Join(diff, ", "))})
				}
			}
		}
	}
	return out
}

// trafficItems compares capture settings, named by the annotations that
// set them.
func trafficItems(want, got istio.Traffic) []DriftItem {
	var out []DriftItem
	add := func(field, config, kernel string) {
		if config != kernel {
			out = append(out, DriftItem{field, config, kernel})
		}
	}
	add("capture", onOff(want.Capture), onOff(got.Capture))
	add("iptables mode (Istio's own iptables capture)", onOff(want.IPTables), onOff(got.IPTables))
	add("splice", onOff(want.Splice), onOff(got.Splice))
	add("app splice", onOff(want.AppSplice), onOff(got.AppSplice))
	add("sidecar (policy without capture)", onOff(want.Sidecar || want.Capture), onOff(got.Sidecar))
	add("IPv6 capture", onOff(want.CaptureIPv6()), onOff(got.DualStack))
	add("proxy uid", strconv.FormatUint(uint64(want.ProxyUID), 10), strconv.FormatUint(uint64(got.ProxyUID), 10))
	add("proxy gid", strconv.FormatUint(uint64(want.ProxyGID), 10), strconv.FormatUint(uint64(got.ProxyGID), 10))
	add("outbound port", strconv.Itoa(int(want.OutboundPort)), strconv.Itoa(int(got.OutboundPort)))
	add("inbound port", strconv.Itoa(int(want.InboundPort)), strconv.Itoa(int(got.InboundPort)))
	add("includeOutboundIPRanges", ranges(want.IncludeAllOutbound, want.IncludeOutboundRanges), ranges(got.IncludeAllOutbound, got.IncludeOutboundRanges))
	add("includeOutboundIPRanges loopback", onOff(want.IncludeOutboundLoopback), onOff(got.IncludeOutboundLoopback))
	add("excludeOutboundIPRanges", ranges(false, want.ExcludeOutboundRanges), ranges(false, got.ExcludeOutboundRanges))
	add("includeOutboundPorts", ports(false, want.IncludeOutboundPorts), ports(false, got.IncludeOutboundPorts))
	add("excludeOutboundPorts", ports(false, want.ExcludeOutboundPorts), ports(false, got.ExcludeOutboundPorts))
	add("includeInboundPorts", ports(want.IncludeAllInbound, want.IncludeInboundPorts), ports(got.IncludeAllInbound, got.IncludeInboundPorts))
	add("excludeInboundPorts", ports(false, want.ExcludeInboundPorts), ports(false, got.ExcludeInboundPorts))
	return out
}

// setDiff names what differs between two policy sets (Atoms, names only
// the agent knows, are not compared).
func setDiff(want, got datapath.PolicySet) []string {
	var out []string
	if want.HasAllow != got.HasAllow {
		out = append(out, "has-allow")
	}
	for _, m := range []struct {
		name      string
		want, got uint64
	}{{"allow mask", want.AllowMask, got.AllowMask}, {"deny mask", want.DenyMask, got.DenyMask},
		{"plaintext (STRICT) mask", want.PlaintextMask, got.PlaintextMask},
		{"default identity mask", want.DefaultIdentityMask, got.DefaultIdentityMask},
		{"default port mask", want.DefaultPortMask, got.DefaultPortMask}} {
		if m.want != m.got {
			out = append(out, fmt.Sprintf("%s %#x (kernel %#x)", m.name, m.want, m.got))
		}
	}
	out = append(out, maskDiff("identity", want.IdentityMasks, got.IdentityMasks)...)
	out = append(out, maskDiff("port", want.PortMasks, got.PortMasks)...)
	out = append(out, maskDiff("prefix", want.PrefixMasks, got.PrefixMasks)...)
	wb, gb := slices.Sorted(slices.Values(want.BypassPorts)), slices.Sorted(slices.Values(got.BypassPorts))
	if !slices.Equal(wb, gb) {
		out = append(out, fmt.Sprintf("bypass ports %s (kernel %s)", ports(false, wb), ports(false, gb)))
	}
	return out
}

// maskDiff names the keys whose masks differ, in key order.
func maskDiff[K comparable](what string, want, got map[K]uint64) []string {
	keys := map[string]string{}
	for k, m := range want {
		if g, ok := got[k]; !ok || g != m {
			gs := "none"
			if ok {
				gs = fmt.Sprintf("%#x", g)
			}
			keys[fmt.Sprint(k)] = fmt.Sprintf("%s %v: %#x (kernel %s)", what, k, m, gs)
		}
	}
	for k, g := range got {
		if _, ok := want[k]; !ok {
			keys[fmt.Sprint(k)] = fmt.Sprintf("%s %v: none (kernel %#x)", what, k, g)
		}
	}
	out := make([]string, 0, len(keys))
	for _, k := range slices.Sorted(maps.Keys(keys)) {
		out = append(out, keys[k])
	}
	return out
}

func setText(s *datapath.PolicySet) string {
	if s == nil {
		return "no policy set"
	}
	kind := "DENY only"
	if s.HasAllow {
		kind = "ALLOW"
	}
	return fmt.Sprintf("a policy set (%s, allow %#x, deny %#x, %d identities, %d ports, %d prefixes)",
		kind, s.AllowMask, s.DenyMask, len(s.IdentityMasks), len(s.PortMasks), len(s.PrefixMasks))
}

func kernelSetText(k *datapath.KernelState, id uint32) string {
	if id == 0 {
		return "no policy set"
	}
	s, ok := k.Sets[id]
	if !ok {
		return fmt.Sprintf("set %d, which the sets table lacks", id)
	}
	return fmt.Sprintf("set %d: %s", id, setText(&s))
}

func onOff(b bool) string {
	if b {
		return "on"
	}
	return "off"
}

func addrs(ips []netip.Addr) string {
	if len(ips) == 0 {
		return "none"
	}
	s := make([]string, len(ips))
	for i, ip := range ips {
		s[i] = ip.String()
	}
	return strings.Join(s, ",")
}

func ports(all bool, list []uint16) string { return joinList(all, list) }

func ranges(all bool, list []netip.Prefix) string { return joinList(all, list) }

// joinList is a list as the annotations write it: "*" for all, "none"
// for an empty one.
func joinList[T any](all bool, list []T) string {
	if all {
		return "*"
	}
	if len(list) == 0 {
		return "none"
	}
	s := make([]string, len(list))
	for i, v := range list {
		s[i] = fmt.Sprint(v)
	}
	return strings.Join(s, ",")
}

// cloneAllocator copies ids, so that a drift check numbering new
// identities leaves the agent's alone.
func cloneAllocator(ids *policy.Allocator) (*policy.Allocator, error) {
	var buf bytes.Buffer
	if err := ids.Save(&buf); err != nil {
		return nil, err
	}
	c := policy.NewAllocator()
	if err := c.Load(&buf); err != nil {
		return nil, err
	}
	return c, nil
}

// CheckDrift compares, without the agent, the kernel state k with cfg and
// the registrations and identities in the agent's state directory. node
// is what the node switches should be, appSplice the node's app-splice
// default (datapath.ProbeAppSpliceDefault).
func CheckDrift(cfg istio.Config, node datapath.NodeSettings, appSplice bool, stateDir string, k *datapath.KernelState) (DriftReport, error) {
	if stateDir == "" {
		stateDir = DefaultStateDir
	}
	list, err := readPods(filepath.Join(stateDir, "pods.json"))
	if err != nil {
		return DriftReport{}, fmt.Errorf("agent state: %w", err)
	}
	pods := map[string]*pod{}
	for _, p := range list {
		pods[p.Reg.ContainerID] = p
	}
	ids := policy.NewAllocator()
	b, err := os.ReadFile(filepath.Join(stateDir, "identities.json"))
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		return DriftReport{}, fmt.Errorf("agent state: %w", err)
	default:
		if err := ids.Load(bytes.NewReader(b)); err != nil {
			return DriftReport{}, fmt.Errorf("agent state: identities: %w", err)
		}
	}
	return computeDrift(driftInput{cfg: cfg, node: node, pods: pods, ids: ids, hostIDs: datapath.HostProxyIDs,
		gone: datapath.NetnsGone, appSpliceDefault: appSplice}, k)
}
