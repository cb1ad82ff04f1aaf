package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/meshsplice/meshsplice/agent/api"
	"github.com/meshsplice/meshsplice/cni/install"
)

// cniFlags are the flags cni-install and cni-uninstall share.
func cniFlags(fs *flag.FlagSet) *install.Config {
	c := &install.Config{}
	fs.StringVar(&c.ConfDir, "conf-dir", "/etc/cni/net.d", "the node's CNI conf dir (in the install container: its host mount)")
	fs.StringVar(&c.BinDir, "bin-dir", "/opt/cni/bin", "the node's CNI bin dir (in the install container: its host mount)")
	return c
}

// runCNIInstall copies meshsplice-cni to the node and chains it into the
// node's conflist (package cni/install); with --watch it stays and repairs
// the conflist whenever the node's CNI rewrites it.
func runCNIInstall(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("cni-install", flag.ContinueOnError)
	c := cniFlags(fs)
	self, _ := os.Executable()
	fs.StringVar(&c.PluginSrc, "plugin", filepath.Join(filepath.Dir(self), install.PluginType), "the meshsplice-cni binary to copy (empty: do not copy)")
	fs.StringVar(&c.AgentSocket, "agent-socket", api.DefaultSocket, "the plugin's agentSocket")
	fs.StringVar(&c.AgentUnreachable, "agent-unreachable", "fail", "the plugin's agentUnreachable: fail (pods wait for the agent) or pass (pods start unmeshed)")
	watch := fs.Bool("watch", false, "stay, and chain the plugin again whenever the conflist is rewritten (until SIGTERM; the chain stays)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	log := slog.New(slog.NewJSONHandler(os.Stderr, nil))
	if *watch {
		return install.Watch(ctx, *c, log)
	}
	changed, err := install.Install(*c)
	if err != nil {
		return err
	}
	fmt.Printf("meshsplice-cni chained into the conflist in %s (changed: %v)\n", c.ConfDir, changed)
	return nil
}

// runCNIUninstall takes meshsplice-cni out of the node's conflists
// (restoring the original bytes when nobody rewrote them) and removes it.
func runCNIUninstall(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("cni-uninstall", flag.ContinueOnError)
	c := cniFlags(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	return install.Uninstall(*c)
}
