package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"os"
	"sort"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/meshsplice/meshsplice/agent"
	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/internal/cgroups"
)

// statusOutput is `meshsplice status --json`: the kernel's status with
// every pod explained (Pods replaces datapath.Status's kernel-only list).
type statusOutput struct {
	*datapath.Status
	StateDir string            `json:"state_dir"`
	Pods     []agent.PodReport `json:"pods"`
	Counters datapath.Counters `json:"counters"`
	// HiddenZeroCounters is how many zero counters Counters leaves out
	// (--all shows them).
	HiddenZeroCounters int `json:"hidden_zero_counters,omitempty"`
}

func runStatus(_ context.Context, args []string) error {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	pinDir := fs.String("pin-dir", datapath.DefaultPinDir, "bpffs directory of the datapath")
	stateDir := fs.String("state-dir", agent.DefaultStateDir, "the agent's state directory (pod names, namespaces, netns paths)")
	asJSON := fs.Bool("json", false, "print JSON")
	all := fs.Bool("all", false, "show zero counters too")
	fs.BoolVar(all, "v", false, "same as --all")
	if err := fs.Parse(args); err != nil {
		return err
	}
	st, err := datapath.Inspect(*pinDir)
	if err != nil {
		return err
	}
	out := statusOutput{Status: st, StateDir: *stateDir, Counters: datapath.Counters{}}
	out.Pods, err = agent.ReportPods(st, *stateDir)
	if err != nil {
		st.Problems = append(st.Problems, err.Error())
	}
	for name, v := range st.Counters {
		if v != 0 || *all {
			out.Counters[name] = v
		} else {
			out.HiddenZeroCounters++
		}
	}
	if *asJSON {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(out)
	}
	return printStatus(os.Stdout, &out)
}

func onOff(b bool) string {
	if b {
		return "on"
	}
	return "off"
}

func printStatus(wr io.Writer, out *statusOutput) error {
	st := out.Status
	w := tabwriter.NewWriter(wr, 0, 4, 2, ' ', 0)
	fmt.Fprintf(w, "datapath\t%s\n", st.PinDir)
	fmt.Fprintf(w, "attached to cgroup\t%s\n", st.Cgroup())
	fmt.Fprintf(w, "agent state\t%s\n", out.StateDir)
	fmt.Fprintf(w, "node capture\t%s\nnode splice\t%s\nnode app-splice\t%s\n", onOff(st.Node.Capture), onOff(st.Node.Splice), onOff(!st.Node.AppSpliceOff))
	fmt.Fprintf(w, "splice(2) readers\t%s (docs/readers.md)\n", st.Readers())
	fmt.Fprintf(w, "spliced sockets now\t%d\ncaptured connections now\t%d\n", st.SplicedSockets, st.OrigDstEntries)
	for _, p := range st.Pressure {
		fmt.Fprintf(w, "kernel table pressure\t%s\n", p)
	}

	fmt.Fprintf(w, "\nPOD\tNETNS\tIPS\tMODE\tCAPTURED\tSPLICED\tINBOUND READY\tPOLICY\n")
	for _, p := range out.Pods {
		ips := make([]string, len(p.IPs))
		for i, ip := range p.IPs {
			ips[i] = ip.String()
		}
		netns := p.Netns
		if netns == "" {
			netns = "?"
		}
		mode := p.Mode
		if mode == "" {
			mode = "?"
		}
		fmt.Fprintf(w, "%s\t%s (cookie %d)\t%s\t%s\t%s\t%s\t%s\t%s\n", p, netns, p.Cookie, strings.Join(ips, ","),
			mode, p.Captured.State, p.Spliced.State, p.InboundReady.State, p.PolicyEnforced.State)
	}
	if err := w.Flush(); err != nil {
		return err
	}
	for _, p := range out.Pods {
		fmt.Fprintf(wr, "\n%s:\n", p)
		for _, v := range []struct {
			name string
			v    agent.Verdict
		}{{"captured", p.Captured}, {"spliced", p.Spliced}, {"inbound ready", p.InboundReady}, {"policy", p.PolicyEnforced}} {
			fmt.Fprintf(wr, "  %-14s %-3s %s\n", v.name, v.v.State, v.v.Reason)
		}
	}

	podOf := map[string]string{}
	for _, p := range out.Pods {
		podOf["netns/"+strconv.FormatUint(p.Cookie, 10)] = " (pod " + p.String() + ")"
	}
	fmt.Fprintf(w, "\nLINK\tPROGRAM\tATTACHED\tTO\n")
	for _, l := range st.Links {
		attached := "no"
		switch {
		case l.Error != "":
			attached = "unknown: " + l.Error
		case l.Attached:
			attached = "yes"
		}
		fmt.Fprintf(w, "%s\t%s (prog %d, link %d)\t%s\t%s%s\n", l.Name, l.Program, l.ProgramID, l.LinkID, attached, l.Target, podOf[l.Name])
	}
	if len(st.RecentDenials) > 0 {
		fmt.Fprintf(w, "\nRECENT DENIALS\tDIRECTION\tSOURCE (IDENTITY)\tDESTINATION\tREASON\tPOLICY SET\n")
		for _, d := range st.RecentDenials {
			fmt.Fprintf(w, "%s\t%s\t%s (%d)\t%s\t%s\t%d\n", d.Time.Format(time.TimeOnly), d.Direction, d.Src, d.SrcIdentity,
				netip.AddrPortFrom(d.Dst, d.Port), d.Reason, d.PolicySet)
		}
	}
	fmt.Fprintf(w, "\nCOUNTER\tVALUE\n")
	names := make([]string, 0, len(out.Counters))
	for n := range out.Counters {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(w, "%s\t%d\n", n, out.Counters[n])
	}
	if out.HiddenZeroCounters > 0 {
		fmt.Fprintf(w, "(%d counters at zero not shown: --all shows them)\n", out.HiddenZeroCounters)
	}
	if len(st.Problems) > 0 {
		fmt.Fprintf(w, "\nCANNOT READ (the fields they concern are unknown)\n")
		for _, p := range st.Problems {
			fmt.Fprintf(w, "%s\n", p)
		}
	}
	return w.Flush()
}

func runUninstall(_ context.Context, args []string) error {
	fs := flag.NewFlagSet("uninstall", flag.ContinueOnError)
	pinDir := fs.String("pin-dir", datapath.DefaultPinDir, "bpffs directory of the datapath")
	cgroup := fs.String("cgroup", "", "cgroup v2 directory the agent attached to (default: the cgroup v2 root); checked for meshsplice programs left attached")
	drain := fs.Duration("drain", 2*time.Second, "how long spliced connections get to read queued data before their sockets leave the splice map")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *cgroup == "" {
		root, err := cgroups.Mount()
		if err != nil {
			return err
		}
		*cgroup = root
	}
	rep, err := datapath.Uninstall(*pinDir, *cgroup, *drain)
	for _, l := range rep.Removed {
		fmt.Printf("meshsplice: removed %s: %s (program %d) on %s\n", l.Name, l.Program, l.ProgramID, l.Target)
	}
	if err != nil {
		return err
	}
	if rep.Pinned {
		fmt.Printf("meshsplice: detached and unpinned %s; no meshsplice program is attached to %s\n", *pinDir, *cgroup)
	} else {
		fmt.Printf("meshsplice: nothing to remove: nothing pinned at %s and no meshsplice program attached to %s\n", *pinDir, *cgroup)
	}
	return nil
}
