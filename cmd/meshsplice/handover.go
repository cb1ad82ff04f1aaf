package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/meshsplice/meshsplice/agent"
	"github.com/meshsplice/meshsplice/agent/api"
	"github.com/meshsplice/meshsplice/baseline"
	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/istio"
)

// handoverUsage heads `meshsplice handover -h`.
const handoverUsage = `usage: meshsplice handover --to-iptables (--pod NAMESPACE/NAME ... | --all) [flags]

Hands pods that meshsplice captures over to Istio's own iptables capture,
live, without restarting them (pods of meshsplice's injection template have
no istio-init). For each pod, in its network namespace: sets
net.netfilter.nf_conntrack_tcp_loose=0 (so conntrack does not take up live
connections as new ones), loads Istio's sidecar rules (what istio-init would
run: baseline.Rules, Istio's defaults), then re-registers the pod with the
running agent with meshsplice.io/capture: "iptables", so that meshsplice
stops capturing it but still splices its sidecar's connections (on
Kubernetes the agent reads the pod's annotations from the API server: the
command prints the kubectl annotate that does it). Without the agent, or
until then, both captures stay side by side, which passes each connection
through the sidecar once, and meshsplice can be uninstalled. A pod
whose rules are already loaded is left alone. A pod whose traffic settings
differ from Istio's defaults is refused (the embedded rules are Istio's for
the defaults only). The rules are loaded fully or removed again.

Needs on the node: nsenter, ip, sysctl, iptables-nft-restore/-save and
ip6tables-nft-restore/-save (the iptables package, nf_tables backend).

flags:
`

func runHandover(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("handover", flag.ContinueOnError)
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), handoverUsage)
		fs.PrintDefaults()
	}
	toIPTables := fs.Bool("to-iptables", false, "hand the pods over to Istio's iptables capture (the only target)")
	all := fs.Bool("all", false, "every registered pod that meshsplice captures")
	var pods podList
	fs.Var(&pods, "pod", "NAMESPACE/NAME of a registered pod to hand over (repeatable)")
	pinDir := fs.String("pin-dir", datapath.DefaultPinDir, "bpffs directory of the datapath")
	stateDir := fs.String("state-dir", agent.DefaultStateDir, "the agent's state directory (pod registrations, netns paths)")
	socket := fs.String("cni-socket", api.DefaultSocket, "the agent's registration socket; if the agent does not answer, the pods keep both captures (see README)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	switch {
	case !*toIPTables:
		return errors.New("--to-iptables is required (the only target there is)")
	case *all == (len(pods) > 0):
		return errors.New("give either --pod NAMESPACE/NAME (repeatable) or --all")
	case fs.NArg() > 0:
		return fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	st, err := datapath.Inspect(*pinDir)
	if err != nil {
		return err
	}
	reports, err := agent.ReportPods(st, *stateDir)
	if err != nil {
		return err
	}
	regs, err := agent.Registrations(*stateDir)
	if err != nil {
		return fmt.Errorf("agent state: %w", err)
	}
	client := api.NewClient(*socket, 10*time.Second)
	defer client.Close()
	h := handover{out: os.Stdout, client: client, regs: regs}
	return h.run(ctx, reports, pods, *all)
}

// podList is the repeatable --pod flag.
type podList []string

func (l *podList) String() string { return strings.Join(*l, ",") }

func (l *podList) Set(v string) error {
	if ns, name, ok := strings.Cut(v, "/"); !ok || ns == "" || name == "" {
		return fmt.Errorf("%q is not NAMESPACE/NAME", v)
	}
	*l = append(*l, v)
	return nil
}

type handover struct {
	out    io.Writer
	client *api.Client
	regs   map[uint64]api.PodRegistration
}

// run hands over the selected pods, going on after failures, and returns
// an error naming every pod it could not hand over.
func (h *handover) run(ctx context.Context, reports []agent.PodReport, want []string, all bool) error {
	wanted := map[string]bool{}
	for _, p := range want {
		wanted[p] = false
	}
	var failed []string
	for _, r := range reports {
		name := r.String()
		if _, ok := wanted[name]; !ok && !all {
			continue
		}
		wanted[name] = true
		switch {
		case r.Mode == istio.ModeIPTables:
			fmt.Fprintf(h.out, "%s: already under Istio's iptables (mode iptables): nothing to do\n", name)
			continue
		case r.Mode != istio.ModeMeshsplice || !r.InKernel:
			if !all {
				fmt.Fprintf(h.out, "%s: not captured by meshsplice (mode %q): nothing to do\n", name, r.Mode)
			}
			continue
		}
		if err := h.pod(ctx, r); err != nil {
			fmt.Fprintf(h.out, "%s: NOT handed over: %v\n", name, err)
			failed = append(failed, name)
		}
	}
	for _, p := range want {
		if !wanted[p] {
			fmt.Fprintf(h.out, "%s: no such registered pod\n", p)
			failed = append(failed, p)
		}
	}
	if len(failed) > 0 {
		return fmt.Errorf("could not hand over %d pod(s): %s", len(failed), strings.Join(failed, ", "))
	}
	return nil
}

// pod hands one captured pod over.
func (h *handover) pod(ctx context.Context, r agent.PodReport) error {
	name := r.String()
	reg, ok := h.regs[r.Cookie]
	if !ok || r.Netns == "" {
		return fmt.Errorf("not in the agent's registrations: its network namespace and annotations are unknown")
	}
	if err := defaultRules(reg.Annotations, r.Traffic); err != nil {
		return err
	}
	run := baseline.NsenterRunner{}
	opts := baseline.Options{IPv6: r.Traffic.DualStack, Runner: run} // DualStack read back: the kernel's CaptureIPv6
	fam := "IPv4"
	if opts.IPv6 {
		fam = "IPv4 and IPv6"
	}
	all, some, err := baseline.Present(r.Netns, opts)
	switch {
	case err != nil:
		return err
	case all:
		fmt.Fprintf(h.out, "%s: Istio's %s rules already in %s: left alone\n", name, fam, r.Netns)
	case some:
		return fmt.Errorf("%s holds some of Istio's chains but not all: left alone, remove them or finish by hand", r.Netns)
	default:
		const sysctl = "net.netfilter.nf_conntrack_tcp_loose"
		old, err := run.Run(r.Netns, "", "sysctl", "-n", sysctl)
		if err != nil {
			return err
		}
		old = strings.TrimSpace(old)
		if _, err := run.Run(r.Netns, "", "sysctl", "-w", sysctl+"=0"); err != nil {
			return err
		}
		if _, err := baseline.Apply(r.Netns, opts); err != nil {
			// Apply removed what it loaded; put the sysctl back too.
			if _, rerr := run.Run(r.Netns, "", "sysctl", "-w", sysctl+"="+old); rerr != nil {
				err = errors.Join(err, rerr)
			}
			return err
		}
		fmt.Fprintf(h.out, "%s: set %s=0 (was %s) and loaded Istio's %s rules in %s\n", name, sysctl, old, fam, r.Netns)
	}
	return h.switchMode(ctx, name, reg)
}

// switchMode re-registers the pod with meshsplice.io/capture: "iptables".
// The rules are in place by now, so a failure here leaves both captures side
// by side, which passes each connection through the sidecar once.
func (h *handover) switchMode(ctx context.Context, name string, reg api.PodRegistration) error {
	reg.Annotations = maps.Clone(reg.Annotations)
	if reg.Annotations == nil {
		reg.Annotations = map[string]string{}
	}
	reg.Annotations[istio.AnnotationCapture] = "iptables"
	st, err := h.client.AddPod(ctx, reg)
	if errors.Is(err, api.ErrAgentUnreachable) {
		fmt.Fprintf(h.out, "%s: the agent does not answer (%v): meshsplice still captures the pod beside Istio's rules (each connection passes the sidecar once); it can be uninstalled\n", name, err)
		return nil
	}
	if err != nil {
		return fmt.Errorf("rules loaded, but the agent refused the switch to iptables mode (both captures stay, which is safe; run again): %w", err)
	}
	if st.Capture {
		// On Kubernetes the agent takes the annotations from the pod's
		// object, not from the registration.
		fmt.Fprintf(h.out, "%s: the agent keeps the pod's own annotations (Kubernetes): meshsplice still captures it beside Istio's rules (each connection passes the sidecar once); to switch it to iptables mode: kubectl annotate pod -n %s %s %s=iptables\n",
			name, reg.PodNamespace, reg.PodName, istio.AnnotationCapture)
		return nil
	}
	if st.Mode != istio.ModeIPTables {
		return fmt.Errorf("rules loaded, but the agent registered the pod in mode %q, not iptables (Istio's rules stay, which is safe)", st.Mode)
	}
	fmt.Fprintf(h.out, "%s: switched to iptables mode: meshsplice no longer captures it, its sidecar's connections stay spliced\n", name)
	return nil
}

// defaultRules fails unless Istio's rules for the pod are the embedded ones
// (Istio's defaults): its annotations resolve to the same capture as a pod
// with none, and the kernel holds what they say.
func defaultRules(ann map[string]string, kernel istio.Traffic) error {
	withIPT := func(a map[string]string) map[string]string {
		a = maps.Clone(a)
		if a == nil {
			a = map[string]string{}
		}
		a[istio.AnnotationCapture] = "iptables"
		return a
	}
	got, _, err := istio.ParseTraffic(withIPT(ann), istio.DefaultDefaults())
	if err != nil {
		return fmt.Errorf("its annotations: %w", err)
	}
	if !got.IPTables {
		return errors.New("its settings admit no iptables mode (interceptionMode is not REDIRECT?)")
	}
	want, _, err := istio.ParseTraffic(withIPT(map[string]string{istio.AnnotationStatus: "{}"}), istio.DefaultDefaults())
	if err != nil {
		return err
	}
	if d := ruleDiff(got, want, true); len(d) > 0 {
		return fmt.Errorf("its traffic settings differ from Istio's defaults (%s), the only ones whose rules meshsplice carries: hand it over by hand with istio-iptables", strings.Join(d, ", "))
	}
	// The kernel holds no port lists or ranges in its pod entry.
	if d := ruleDiff(kernel, want, false); len(d) > 0 {
		return fmt.Errorf("the kernel captures it with settings other than Istio's defaults (%s): the agent's mesh defaults differ; hand it over by hand with istio-iptables", strings.Join(d, ", "))
	}
	return nil
}

// ruleDiff names the settings of istio-iptables' command line on which a
// and b differ: the scalar ones, and with lists the port lists and ranges.
func ruleDiff(a, b istio.Traffic, lists bool) []string {
	var d []string
	add := func(name string, differ bool, va, vb any) {
		if differ {
			d = append(d, fmt.Sprintf("%s %v, not %v", name, va, vb))
		}
	}
	scalar := func(name string, va, vb any) { add(name, va != vb, va, vb) }
	scalar("proxy uid", a.ProxyUID, b.ProxyUID)
	scalar("proxy gid", a.ProxyGID, b.ProxyGID)
	scalar("outbound port", a.OutboundPort, b.OutboundPort)
	scalar("inbound port", a.InboundPort, b.InboundPort)
	scalar("all outbound", a.IncludeAllOutbound, b.IncludeAllOutbound)
	scalar("outbound loopback", a.IncludeOutboundLoopback, b.IncludeOutboundLoopback)
	scalar("all inbound", a.IncludeAllInbound, b.IncludeAllInbound)
	if !lists {
		return d
	}
	add("included outbound ranges", !slices.Equal(a.IncludeOutboundRanges, b.IncludeOutboundRanges), a.IncludeOutboundRanges, b.IncludeOutboundRanges)
	add("excluded outbound ranges", !slices.Equal(a.ExcludeOutboundRanges, b.ExcludeOutboundRanges), a.ExcludeOutboundRanges, b.ExcludeOutboundRanges)
	add("included outbound ports", !slices.Equal(a.IncludeOutboundPorts, b.IncludeOutboundPorts), a.IncludeOutboundPorts, b.IncludeOutboundPorts)
	add("excluded outbound ports", !slices.Equal(a.ExcludeOutboundPorts, b.ExcludeOutboundPorts), a.ExcludeOutboundPorts, b.ExcludeOutboundPorts)
	add("included inbound ports", !slices.Equal(a.IncludeInboundPorts, b.IncludeInboundPorts), a.IncludeInboundPorts, b.IncludeInboundPorts)
	ea, eb := withoutGoldenExcluded(a.ExcludeInboundPorts), withoutGoldenExcluded(b.ExcludeInboundPorts)
	add("excluded inbound ports", !slices.Equal(ea, eb), ea, eb)
	return d
}

// withoutGoldenExcluded drops the inbound ports the embedded rules exclude
// anyway (15008 always, 15090,15021,15020 from the injector's -d): the
// template's excludeInboundPorts "15020" yields the same rules as none.
func withoutGoldenExcluded(ports []uint16) []uint16 {
	return slices.DeleteFunc(slices.Clone(ports), func(p uint16) bool {
		return p == 15008 || p == 15020 || p == 15021 || p == 15090
	})
}
