package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"text/tabwriter"
	"time"

	"github.com/meshsplice/meshsplice/agent"
	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/istio"
)

// driftFlags are `meshsplice check --drift`'s flags: where the config,
// the kernel and the agent's state are, as the agent was told.
type driftFlags struct {
	on                *bool
	pinDir, stateDir  *string
	configDir         *string
	capture, splice   *bool
	appSplice         *bool
	timeout           *time.Duration
	kube              *kubeFlags
	sourceDescription string
}

func addDriftFlags(fs *flag.FlagSet) *driftFlags {
	return &driftFlags{
		on:        fs.Bool("drift", false, "compare, for each pod of this node, what Istio's config says with what the kernel maps hold; exit 1 on any difference"),
		pinDir:    fs.String("pin-dir", datapath.DefaultPinDir, "--drift: bpffs directory of the datapath"),
		stateDir:  fs.String("state-dir", agent.DefaultStateDir, "--drift: the agent's state directory (its pod registrations and identities)"),
		configDir: fs.String("istio-config", "", "--drift: the standalone agent's folder of Istio YAML"),
		capture:   fs.Bool("capture", true, "--drift: the agent's --capture node switch"),
		splice:    fs.Bool("splice", true, "--drift: the agent's --splice node switch"),
		appSplice: fs.Bool("app-splice", true, "--drift: the agent's --app-splice node switch"),
		timeout:   fs.Duration("timeout", time.Minute, "--drift: how long to wait for the config (the API server's caches)"),
		kube:      addKubeFlags(fs),
	}
}

// errDrift: the kernel does not hold what the config says.
var errDrift = errors.New("drift")

// runDrift is `meshsplice check --drift`: it reads the config as the
// agent does (the folder, or the API server), the agent's registrations
// and identities from its state directory, and the kernel maps from the
// pins, and needs no running agent.
func runDrift(ctx context.Context, f *driftFlags, asJSON bool) error {
	var src istio.Source
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	switch {
	case *f.kube.on && *f.configDir != "":
		return errors.New("--kubernetes and --istio-config exclude each other")
	case *f.kube.on:
		s, err := f.kube.source(log)
		if err != nil {
			return err
		}
		src, f.sourceDescription = s, "API server, node "+*f.kube.node
	case *f.configDir != "":
		src, f.sourceDescription = istio.NewFileSource(*f.configDir, log), "folder "+*f.configDir
	default:
		return errors.New("--drift: say where Istio's configuration is: --istio-config DIR or --kubernetes")
	}
	cfg, err := firstConfig(ctx, src, *f.timeout)
	if err != nil {
		return err
	}
	k, err := datapath.ReadKernelState(*f.pinDir)
	if err != nil {
		return err
	}
	node := datapath.NodeSettings{Capture: *f.capture && cfg.Node.Capture, Splice: *f.splice && cfg.Node.Splice,
		AppSpliceOff: !*f.appSplice || cfg.Node.AppSpliceOff}
	// The app-splice default of pods that do not say is measured on the
	// kernel, as the agent measures it at start.
	appSplice := datapath.ProbeAppSpliceDefault(datapath.ProbeReaders(), datapath.ProbeFionread()).OK
	rep, err := agent.CheckDrift(cfg, node, appSplice, *f.stateDir, k)
	if err != nil {
		return err
	}
	if asJSON {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		if err := enc.Encode(rep); err != nil {
			return err
		}
	} else if err := printDrift(os.Stdout, f, rep); err != nil {
		return err
	}
	if rep.Drifted() {
		return fmt.Errorf("%w: %d of %d pods and %d node switches differ from the config", errDrift, len(rep.Pods), rep.PodsChecked, len(rep.Node))
	}
	return nil
}

// firstConfig runs src until it delivers a Config.
func firstConfig(ctx context.Context, src istio.Source, timeout time.Duration) (istio.Config, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	updates := make(chan istio.Config, 1)
	errc := make(chan error, 1)
	go func() { errc <- src.Run(ctx, updates) }()
	select {
	case c := <-updates:
		return c, nil
	case err := <-errc:
		if err == nil {
			err = ctx.Err()
		}
		return istio.Config{}, fmt.Errorf("istio config: %w", err)
	case <-ctx.Done():
		return istio.Config{}, fmt.Errorf("istio config: none within %s: %w", timeout, ctx.Err())
	}
}

func printDrift(w io.Writer, f *driftFlags, rep agent.DriftReport) error {
	fmt.Fprintf(w, "config: %s\nkernel: %s\nagent state: %s\n", f.sourceDescription, *f.pinDir, *f.stateDir)
	for _, s := range rep.Skipped {
		fmt.Fprintf(w, "not checked: %s\n", s)
	}
	if !rep.Drifted() {
		fmt.Fprintf(w, "\nno drift: the kernel holds what the config says for all %d pods and the node switches\n", rep.PodsChecked)
		return nil
	}
	fmt.Fprintf(w, "\ndrift: %d of %d pods differ from the config\n", len(rep.Pods), rep.PodsChecked)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	if len(rep.Node) > 0 {
		fmt.Fprintf(tw, "\nnode switches\n  SETTING\tCONFIG\tKERNEL\n")
		for _, it := range rep.Node {
			fmt.Fprintf(tw, "  %s\t%s\t%s\n", it.Field, it.Config, it.Kernel)
		}
	}
	for _, p := range rep.Pods {
		fmt.Fprintf(tw, "\n%s", p.Pod)
		if p.ContainerID != "" {
			fmt.Fprintf(tw, " (container %s, netns cookie %d)", p.ContainerID, p.Cookie)
		}
		fmt.Fprintf(tw, "\n  SETTING\tCONFIG\tKERNEL\n")
		for _, it := range p.Items {
			fmt.Fprintf(tw, "  %s\t%s\t%s\n", it.Field, it.Config, it.Kernel)
		}
	}
	return tw.Flush()
}
