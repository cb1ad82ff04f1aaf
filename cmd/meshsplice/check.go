package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"

	"golang.org/x/sys/unix"

	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/internal/cgroups"
)

// runCheck tells whether this node can run meshsplice: the mounts it needs
// and the kernel's verdict on every program. With --drift, whether the
// kernel holds what the config says (drift.go).
func runCheck(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("check", flag.ContinueOnError)
	asJSON := fs.Bool("json", false, "print JSON")
	drift := addDriftFlags(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *drift.on {
		return runDrift(ctx, drift, *asJSON)
	}
	var uts unix.Utsname
	unix.Uname(&uts)
	results := []datapath.ProbeResult{{Name: "kernel " + unix.ByteSliceToString(uts.Release[:]), OK: true, Required: true}}
	if root, err := cgroups.Mount(); err != nil {
		results = append(results, datapath.ProbeResult{Name: "cgroup v2", Required: true, Detail: err.Error()})
	} else {
		results = append(results, datapath.ProbeResult{Name: "cgroup v2 at " + root, OK: true, Required: true})
	}
	if _, err := os.Stat("/sys/kernel/btf/vmlinux"); err != nil {
		results = append(results, datapath.ProbeResult{Name: "kernel BTF", Required: true, Detail: "no /sys/kernel/btf/vmlinux: CO-RE needs CONFIG_DEBUG_INFO_BTF"})
	} else {
		results = append(results, datapath.ProbeResult{Name: "kernel BTF", OK: true, Required: true})
	}
	results = append(results, datapath.Probe()...)
	readers, fionread := datapath.ProbeReaders(), datapath.ProbeFionread()
	results = append(results, readers, fionread, datapath.ProbeAppSpliceDefault(readers, fionread))
	if *asJSON {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(results); err != nil {
			return err
		}
	} else {
		for _, r := range results {
			mark := "ok  "
			if !r.OK {
				mark = "FAIL"
				if !r.Required {
					mark = "off "
				}
			}
			fmt.Printf("%s %s\n", mark, r.Name)
			if r.Detail != "" {
				fmt.Printf("     %s\n", r.Detail)
			}
		}
	}
	for _, r := range results {
		if r.Required && !r.OK {
			return errors.New("this node cannot run meshsplice")
		}
	}
	return nil
}
