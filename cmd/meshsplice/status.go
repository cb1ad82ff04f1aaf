package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/internal/cgroups"
)

func runStatus(_ context.Context, args []string) error {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	pinDir := fs.String("pin-dir", datapath.DefaultPinDir, "bpffs directory of the datapath")
	asJSON := fs.Bool("json", false, "print JSON")
	if err := fs.Parse(args); err != nil {
		return err
	}
	st, err := datapath.Inspect(*pinDir)
	if err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(st)
	}
	w := tabwriter.NewWriter(os.Stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintf(w, "datapath\t%s\n", st.PinDir)
	fmt.Fprintf(w, "node capture\t%v\nnode splice\t%v\nspliced sockets now\t%d\n\n", st.Node.Capture, st.Node.Splice, st.SplicedSockets)
	fmt.Fprintf(w, "POD NETNS\tIPS\tCAPTURE\tSPLICE\tAPP-SPLICE\n")
	for _, p := range st.Pods {
		ips := make([]string, len(p.IPs))
		for i, ip := range p.IPs {
			ips[i] = ip.String()
		}
		fmt.Fprintf(w, "%d\t%s\t%v\t%v\t%v\n", p.Cookie, strings.Join(ips, ","), p.Traffic.Capture, p.Traffic.Splice, p.Traffic.AppSplice)
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
		fmt.Fprintf(w, "%s\t%s (prog %d, link %d)\t%s\t%s\n", l.Name, l.Program, l.ProgramID, l.LinkID, attached, l.Target)
	}
	if len(st.RecentDenials) > 0 {
		fmt.Fprintf(w, "\nRECENT DENIALS\tDIRECTION\tSOURCE (IDENTITY)\tDESTINATION\tREASON\tPOLICY SET\n")
		for _, d := range st.RecentDenials {
			fmt.Fprintf(w, "%s\t%s\t%s (%d)\t%s\t%s\t%d\n", d.Time.Format(time.TimeOnly), d.Direction, d.Src, d.SrcIdentity,
				netip.AddrPortFrom(d.Dst, d.Port), d.Reason, d.PolicySet)
		}
	}
	fmt.Fprintf(w, "\nCOUNTER\tVALUE\n")
	names := make([]string, 0, len(st.Counters))
	for n := range st.Counters {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		fmt.Fprintf(w, "%s\t%d\n", n, st.Counters[n])
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
