package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"strings"

	"github.com/meshsplice/meshsplice/agent"
	"github.com/meshsplice/meshsplice/agent/api"
	"github.com/meshsplice/meshsplice/datapath"
	"github.com/meshsplice/meshsplice/internal/cgroups"
	"github.com/meshsplice/meshsplice/istio"
)

func runAgent(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("agent", flag.ContinueOnError)
	standalone := fs.Bool("standalone", false, "run without Kubernetes: pods come from the CNI plugin, Istio config from --istio-config")
	configDir := fs.String("istio-config", "", "folder of Istio YAML (mesh config, AuthorizationPolicy, meshsplice ConfigMap); edits apply without a restart")
	cgroup := fs.String("cgroup", "", "cgroup v2 directory to attach to (default: the cgroup v2 root, from /proc/self/mountinfo)")
	pinDir := fs.String("pin-dir", datapath.DefaultPinDir, "bpffs directory for maps and links")
	socket := fs.String("cni-socket", api.DefaultSocket, "unix socket the CNI plugin registers pods on")
	cniUID := fs.Int("cni-uid", 0, "uid that may register pods on --cni-socket besides root (0: root only); the socket is given to it")
	stateDir := fs.String("state-dir", agent.DefaultStateDir, "where pod registrations are kept across agent restarts")
	metrics := fs.String("metrics-addr", agent.DefaultMetricsAddr, "address of /healthz, /readyz, /metrics and /pods (empty: off)")
	capture := fs.Bool("capture", true, "node switch: capture meshed pods' traffic (new connections)")
	splice := fs.Bool("splice", true, "node switch: splice (new connections)")
	appSplice := fs.Bool("app-splice", true, "node switch: app <-> sidecar splicing for pods that have it (meshsplice.io/app-splice, or the node's default: docs/readers.md); false keeps every app socket TCP")
	grace := fs.Duration("listener-grace", agent.DefaultListenerGrace, "warn when a captured pod's sidecar inbound listener is not in the kernel this long after registration")
	pressure := fs.Duration("pressure-interval", agent.DefaultPressureInterval, "how often to look for kernel tables at their limit (logged once per interval, /readyz 503 meanwhile)")
	drift := fs.Duration("drift-interval", agent.DefaultDriftInterval, "how often to compare the kernel with the config besides after each apply (meshsplice_drift_pods; a drift is re-applied once)")
	logLevel := fs.String("log-level", "info", "debug, info, warn or error")
	kube := addKubeFlags(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		return fmt.Errorf("--log-level: %w", err)
	}
	log := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	var source istio.Source
	var events agent.EventSink
	switch {
	case *standalone && *kube.on:
		return errors.New("--standalone and --kubernetes exclude each other")
	case *kube.on:
		src, err := kube.source(log)
		if err != nil {
			return err
		}
		source = src
		ev, err := kube.events(log)
		if err != nil {
			return err
		}
		defer ev.Shutdown()
		events = ev
	case !*standalone:
		return errors.New("say where Istio's configuration comes from: --kubernetes or --standalone")
	case *configDir == "":
		return errors.New("--standalone needs --istio-config DIR")
	default:
		source = istio.NewFileSource(*configDir, log)
	}
	if *cgroup == "" {
		root, err := cgroups.Mount()
		if err != nil {
			return err
		}
		*cgroup = root
	}
	log.Info("starting meshsplice agent", "cgroup", *cgroup, "pin_dir", *pinDir, "istio_config", *configDir,
		"args", strings.Join(args, " "))
	return agent.Run(ctx, agent.Config{
		PinDir: *pinDir, CgroupPath: *cgroup, CNISocket: *socket, CNIUID: *cniUID, StateDir: *stateDir,
		MetricsAddr: *metrics, NodeCapture: *capture, NodeSplice: *splice, NodeAppSpliceOff: !*appSplice,
		Source: source, Log: log, ListenerGrace: *grace,
		PressureInterval: *pressure, DriftInterval: *drift, Events: events,
	})
}
