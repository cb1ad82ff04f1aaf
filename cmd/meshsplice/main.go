// Command meshsplice is the one CLI of meshsplice: the node datapath's status,
// its removal, and the standalone demo.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

type command struct {
	name    string
	summary string
	run     func(ctx context.Context, args []string) error
}

var commands = []command{
	{"agent", "run the node agent (datapath, pod registry, Istio config, metrics)", runAgent},
	{"status", "show the registered pods and the kernel counters", runStatus},
	{"check", "tell whether this node can run meshsplice (the kernel's verdict on every program); --drift: whether the kernel holds what the config says", runCheck},
	{"handover", "hand captured pods over to Istio's own iptables capture, live (--to-iptables; needs iptables on the node)", runHandover},
	{"uninstall", "detach and unpin everything (works without the agent)", runUninstall},
	{"cni-install", "copy meshsplice-cni to the node and chain it into its CNI conflist (--watch: keep it there)", runCNIInstall},
	{"cni-uninstall", "take meshsplice-cni out of the node's CNI conflists and remove it", runCNIUninstall},
	{"demo", "run the standalone demo: a local mesh of netns pods, captured and spliced", runDemo},
	{"bench", "measure latency, req/s and CPU per request against Istio's iptables capture", runBench},
}

func usage() {
	fmt.Fprintf(os.Stderr, "usage: meshsplice <command> [flags]\n\ncommands:\n")
	for _, c := range commands {
		fmt.Fprintf(os.Stderr, "  %-13s %s\n", c.name, c.summary)
	}
	fmt.Fprintf(os.Stderr, "\nrun 'meshsplice <command> -h' for a command's flags\n")
}

func main() {
	if len(os.Args) < 2 || os.Args[1] == "-h" || os.Args[1] == "--help" || os.Args[1] == "help" {
		usage()
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	for _, c := range commands {
		if c.name == os.Args[1] {
			err := c.run(ctx, os.Args[2:])
			if errors.Is(err, flag.ErrHelp) {
				os.Exit(2)
			}
			if err != nil {
				fmt.Fprintf(os.Stderr, "meshsplice %s: %v\n", c.name, err)
				os.Exit(1)
			}
			return
		}
	}
	fmt.Fprintf(os.Stderr, "meshsplice: unknown command %q\n\n", os.Args[1])
	usage()
	os.Exit(2)
}
