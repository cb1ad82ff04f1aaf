package cni

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/meshsplice/meshsplice/agent/api"
)

// SupportedVersions are the CNI spec versions the plugin speaks. STATUS
// exists from 1.1.0 on, CHECK from 0.4.0 on (skel enforces both).
var SupportedVersions = version.PluginSupports("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")

// About is what the plugin prints to stderr when run without CNI_COMMAND.
const About = "meshsplice-cni: chained CNI plugin that registers pods with the meshsplice node agent"

// msgNotChained is the ADD and CHECK error without a previous result.
const msgNotChained = "meshsplice-cni must be chained after an interface plugin (no prevResult)"

// Main runs the plugin: the whole main function of cmd/meshsplice-cni.
func Main() {
	p := &Plugin{Stdout: os.Stdout, Stderr: os.Stderr}
	skel.PluginMainFuncs(p.Funcs(), SupportedVersions, About)
}

// Plugin implements the CNI commands. Results go to Stdout, nothing else
// does; logs go to the config's logFile, or to Stderr without one.
type Plugin struct {
	Stdout io.Writer
	Stderr io.Writer
}

// Funcs returns the plugin's commands for skel. GC is left out: the plugin
// keeps no state of its own, and the agent forgets pods whose network
// namespace is gone.
func (p *Plugin) Funcs() skel.CNIFuncs {
	return skel.CNIFuncs{Add: p.Add, Check: p.Check, Del: p.Del, Status: p.Status}
}

// Add registers the pod with the agent and passes the previous result on.
func (p *Plugin) Add(args *skel.CmdArgs) error {
	conf, err := ParseConfig(args.StdinData)
	if err != nil {
		return err
	}
	log, closeLog := p.logger(conf, "ADD", args)
	defer closeLog()
	if conf.PrevResult == nil {
		return types.NewError(types.ErrInvalidNetworkConfig, msgNotChained, "")
	}
	reg, err := registration(conf, args)
	if err != nil {
		return err
	}
	client := api.NewClient(conf.Socket, conf.Timeout)
	defer client.Close()
	st, err := client.AddPod(context.Background(), reg)
	switch {
	case err == nil:
		log.Info("pod registered", "pod", reg.String(), "ips", reg.IPs, "capture", st.Capture, "splice", st.Splice)
		for _, w := range st.Warnings {
			log.Warn("pod settings", "pod", reg.String(), "warning", w)
		}
	case agentDown(err) && conf.Unreachable == Pass:
		log.Warn("meshsplice agent unavailable; the pod starts unmeshed (agentUnreachable: pass)",
			"pod", reg.String(), "socket", conf.Socket, "error", err.Error())
	case agentDown(err):
		return types.NewError(types.ErrTryAgainLater, downMessage(conf, err), "")
	case errors.Is(err, context.DeadlineExceeded):
		return types.NewError(types.ErrTryAgainLater, fmt.Sprintf(
			"meshsplice-cni: register %s: %v (timeout %s: is the agent stuck? raise \"timeout\" in the network config if it is just slow)",
			reg, err, conf.Timeout), "")
	default:
		return types.NewError(types.ErrInternal, fmt.Sprintf("meshsplice-cni: register %s with the meshsplice agent: %v", reg, err), "")
	}
	return p.printResult(conf)
}

// Check verifies that the agent has the pod, with the same namespace and
// addresses as the runtime.
func (p *Plugin) Check(args *skel.CmdArgs) error {
	conf, err := ParseConfig(args.StdinData)
	if err != nil {
		return err
	}
	log, closeLog := p.logger(conf, "CHECK", args)
	defer closeLog()
	if conf.PrevResult == nil {
		return types.NewError(types.ErrInvalidNetworkConfig, msgNotChained, "")
	}
	want, err := registration(conf, args)
	if err != nil {
		return err
	}
	client := api.NewClient(conf.Socket, conf.Timeout)
	defer client.Close()
	st, err := client.CheckPod(context.Background(), args.ContainerID)
	switch {
	case err == nil:
	case agentDown(err) && conf.Unreachable == Pass:
		log.Warn("meshsplice agent unavailable; not checking the pod (agentUnreachable: pass)",
			"pod", want.String(), "socket", conf.Socket, "error", err.Error())
		return nil
	case agentDown(err):
		return types.NewError(types.ErrTryAgainLater, downMessage(conf, err), "")
	case errors.Is(err, api.ErrPodNotFound) && conf.Unreachable == Pass:
		log.Warn("pod is not registered with the meshsplice agent and runs unmeshed (agentUnreachable: pass)", "pod", want.String())
		return nil
	case errors.Is(err, api.ErrPodNotFound):
		return types.NewError(types.ErrUnknownContainer, fmt.Sprintf(
			"meshsplice-cni: the meshsplice agent has no registration for %s, so the pod is not meshed: recreate the pod (or run ADD again)", want), "")
	default:
		return types.NewError(types.ErrInternal, fmt.Sprintf("meshsplice-cni: check %s with the meshsplice agent: %v", want, err), "")
	}
	got := st.Pod
	if filepath.Clean(got.Netns) != filepath.Clean(want.Netns) || !sameAddrs(got.IPs, want.IPs) {
		return types.NewError(types.ErrInternal, fmt.Sprintf(
			"meshsplice-cni: the meshsplice agent has %s with netns %s and IPs %v, the runtime has netns %s and IPs %v: recreate the pod (or run ADD again)",
			want, got.Netns, got.IPs, want.Netns, want.IPs), "")
	}
	log.Info("pod checked", "pod", want.String(), "capture", st.Capture, "splice", st.Splice)
	return nil
}

// Del unregisters the pod. It succeeds when the agent does not know the
// pod, when the namespace is gone (the plugin never enters it) and when
// the agent is down: a pod's teardown must not wait for meshsplice, and the
// agent forgets pods whose namespace has gone when it comes back.
func (p *Plugin) Del(args *skel.CmdArgs) error {
	conf, err := ParseConfig(args.StdinData)
	if err != nil {
		return err
	}
	log, closeLog := p.logger(conf, "DEL", args)
	defer closeLog()
	client := api.NewClient(conf.Socket, conf.Timeout)
	defer client.Close()
	err = client.RemovePod(context.Background(), args.ContainerID)
	switch {
	case err == nil:
		log.Info("pod unregistered")
	case agentDown(err):
		log.Warn("meshsplice agent unavailable; leaving the registration for the agent to drop when it sees the namespace gone",
			"socket", conf.Socket, "error", err.Error())
	default:
		return types.NewError(types.ErrInternal, fmt.Sprintf("meshsplice-cni: unregister container %s from the meshsplice agent: %v", args.ContainerID, err), "")
	}
	return nil
}

// Status reports whether ADD can mesh pods: the agent must answer its
// health probe. With agentUnreachable "pass" pods start anyway, so the
// plugin is available even when the agent is not.
func (p *Plugin) Status(args *skel.CmdArgs) error {
	conf, err := ParseConfig(args.StdinData)
	if err != nil {
		return err
	}
	log, closeLog := p.logger(conf, "STATUS", args)
	defer closeLog()
	client := api.NewClient(conf.Socket, conf.Timeout)
	defer client.Close()
	err = client.Health(context.Background())
	switch {
	case err == nil:
		return nil
	case agentDown(err) && conf.Unreachable == Pass:
		log.Warn("meshsplice agent unavailable; pods start unmeshed (agentUnreachable: pass)", "socket", conf.Socket, "error", err.Error())
		return nil
	case agentDown(err):
		return types.NewError(types.ErrPluginNotAvailable, downMessage(conf, err), "")
	default:
		return types.NewError(types.ErrPluginNotAvailable, fmt.Sprintf("meshsplice-cni: meshsplice agent at %s is not healthy: %v", conf.Socket, err), "")
	}
}

// registration builds the agent request for the pod of args.
func registration(conf *Config, args *skel.CmdArgs) (api.PodRegistration, error) {
	res, err := conf.currentResult()
	if err != nil {
		return api.PodRegistration{}, err
	}
	pa, err := parseArgs(args.Args)
	if err != nil {
		return api.PodRegistration{}, err
	}
	reg := api.PodRegistration{
		ContainerID:    args.ContainerID,
		Netns:          args.Netns,
		IfName:         args.IfName,
		IPs:            podIPs(res, args.Netns),
		PodName:        pa.name,
		PodNamespace:   pa.namespace,
		PodUID:         pa.uid,
		ServiceAccount: pa.serviceAccount,
		Annotations:    conf.Annotations,
		Labels:         conf.Labels,
		Network:        conf.Network,
	}
	if err := reg.Validate(); err != nil {
		msg := fmt.Sprintf("meshsplice-cni: cannot register %s: %v", reg, err)
		if len(reg.IPs) == 0 {
			msg += " (the plugins before meshsplice-cni in the chain assigned none)"
		}
		return api.PodRegistration{}, types.NewError(types.ErrInvalidNetworkConfig, msg, "")
	}
	return reg, nil
}

// agentDown reports whether err means that the agent cannot register pods
// at all: nothing listens on its socket, or it says it is not ready. Only
// then may agentUnreachable "pass" let a pod start unmeshed.
func agentDown(err error) bool {
	return errors.Is(err, api.ErrAgentUnreachable) || errors.Is(err, api.ErrNotReady)
}

// downMessage explains an agentDown error and what to do about it.
func downMessage(conf *Config, err error) string {
	const hint = `set "agentUnreachable": "pass" in the meshsplice-cni network config to let pods start unmeshed`
	if errors.Is(err, api.ErrNotReady) {
		return fmt.Sprintf("meshsplice agent at %s is not ready: %v: retry later, or %s", conf.Socket, err, hint)
	}
	return fmt.Sprintf("%v: is the meshsplice agent running? %s", err, hint)
}

// printResult writes the previous result, in the config's version, as the
// plugin's result.
func (p *Plugin) printResult(conf *Config) error {
	res, err := conf.PrevResult.GetAsVersion(conf.CNIVersion)
	if err != nil {
		return types.NewError(types.ErrIncompatibleCNIVersion, fmt.Sprintf("meshsplice-cni: convert prevResult to %s: %v", conf.CNIVersion, err), "")
	}
	if err := res.PrintTo(p.Stdout); err != nil {
		return types.NewError(types.ErrIOFailure, fmt.Sprintf("meshsplice-cni: write result: %v", err), "")
	}
	return nil
}

// logger returns the logger for one command and a function that closes
// its file. Without a logFile, or when it cannot be opened, warnings and
// errors go to Stderr, which runtimes keep in their own logs.
func (p *Plugin) logger(conf *Config, cmd string, args *skel.CmdArgs) (*slog.Logger, func()) {
	stderr := p.Stderr
	if stderr == nil {
		stderr = io.Discard
	}
	var (
		h       slog.Handler
		closeFn = func() {}
		openErr error
	)
	if conf.LogFile != "" {
		f, err := openLog(conf.LogFile)
		if err == nil {
			h = slog.NewJSONHandler(f, &slog.HandlerOptions{Level: slog.LevelInfo})
			closeFn = func() { f.Close() }
		} else {
			openErr = err
		}
	}
	if h == nil {
		h = slog.NewJSONHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn})
	}
	log := slog.New(h).With("plugin", "meshsplice-cni", "command", cmd, "network", conf.Network)
	if args.ContainerID != "" {
		log = log.With("containerID", args.ContainerID)
	}
	if args.Netns != "" {
		log = log.With("netns", args.Netns)
	}
	if openErr != nil {
		log.Warn("cannot open the log file; logging to stderr", "logFile", conf.LogFile, "error", openErr.Error())
	}
	return log, closeFn
}

func openLog(path string) (*os.File, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("create log directory: %w", err)
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o640)
	if err != nil {
		return nil, fmt.Errorf("open log file: %w", err)
	}
	return f, nil
}
