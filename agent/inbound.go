package agent

import (
	"fmt"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// DefaultListenerGrace is how long a captured pod may go without its
// sidecar's inbound listener in the kernel before the agent warns.
const DefaultListenerGrace = 5 * time.Second

// Inbound capture needs the sidecar's inbound listener in the kernel's
// table, which happens only when sockops sees its listen(): only for a
// process in the cgroup the programs are attached to. A sidecar that runs
// elsewhere listens, but inbound connections to the pod are refused and
// nothing else would say why. The agent checks every captured pod and
// warns once per pod (log, /pods, metric) when the listener is missing
// after the grace period.

// inboundState is what the agent last found for a pod's inbound listener.
type inboundState struct {
	known  bool // checked since the grace period ended
	ready  bool
	reason string
	warned bool
}

// checkListeners looks at every captured pod registered for longer than
// the grace period.
func (a *Agent) checkListeners(now time.Time) {
	a.mu.Lock()
	defer a.mu.Unlock()
	nodeCapture := a.cfg.NodeCapture && a.istio.Node.Capture
	for _, p := range a.pods {
		if !p.Traffic.Capture || !nodeCapture {
			p.inbound = inboundState{}
			continue
		}
		ready, err := a.dp.ListenerReady(p.Cookie)
		if err != nil {
			continue // not in the kernel (yet): CheckPod reports that
		}
		if ready {
			if p.inbound.warned {
				a.log.Info("sidecar inbound listener registered; inbound capture works again", "pod", p.Reg.String())
			}
			p.inbound = inboundState{known: true, ready: true}
			continue
		}
		if now.Sub(p.Registered) < a.cfg.ListenerGrace {
			continue
		}
		reason := a.missingListenerReason(p)
		p.inbound.known, p.inbound.ready, p.inbound.reason = true, false, reason
		if !p.inbound.warned {
			p.inbound.warned = true
			a.log.Warn("no sidecar inbound listener in the kernel: inbound connections to the pod are refused",
				"pod", p.Reg.String(), "netns", p.Reg.Netns, "inbound_port", p.Traffic.InboundPort,
				"registered", p.Registered.Format(time.RFC3339), "reason", reason)
		}
	}
}

// missingListenerReason tells why a pod's listener is not in the kernel.
func (a *Agent) missingListenerReason(p *pod) string {
	return MissingListenerReason(p.Reg.Netns, p.Traffic.InboundPort, a.cfg.CgroupPath)
}

// MissingListenerReason tells why the inbound listener of the pod whose
// netns is at path is not in the kernel's table, from the sockets that
// listen in it; cgroup is where the programs are attached.
func MissingListenerReason(path string, port uint16, cgroup string) string {
	listening, err := SocketListening(path, port)
	switch {
	case err != nil:
		return fmt.Sprintf("the sidecar's inbound listener (port %d) is not in the kernel's table, and the pod's sockets could not be listed: %v", port, err)
	case listening:
		return fmt.Sprintf("a socket listens on port %d in the pod, but the kernel never saw its listen(): the sidecar runs outside the cgroup %s the programs are attached to (or listens with MPTCP)", port, cgroup)
	}
	return fmt.Sprintf("nothing listens on port %d in the pod: the sidecar is not up yet; when it listens, it must run inside the cgroup %s", port, cgroup)
}

// SocketListening tells whether a TCP socket listens on port in the network
// namespace at path (any address, IPv4 or IPv6).
func SocketListening(path string, port uint16) (bool, error) {
	ns, err := netns.GetFromPath(path)
	if err != nil {
		return false, fmt.Errorf("open netns %s: %w", path, err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns, unix.NETLINK_INET_DIAG)
	if err != nil {
		return false, fmt.Errorf("netlink in %s: %w", path, err)
	}
	defer h.Close()
	for _, family := range []uint8{unix.AF_INET, unix.AF_INET6} {
		socks, err := h.SocketDiagTCP(family)
		if err != nil {
			return false, fmt.Errorf("list sockets in %s: %w", path, err)
		}
		for _, s := range socks {
			if s.State == unix.BPF_TCP_LISTEN && s.ID.SourcePort == port {
				return true, nil
			}
		}
	}
	return false, nil
}

// inboundNotReady counts the captured pods whose listener is missing after
// the grace period.
func (a *Agent) inboundNotReady() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	n := 0
	for _, p := range a.pods {
		if p.inbound.known && !p.inbound.ready {
			n++
		}
	}
	return n
}

var inboundNotReadyDesc = prometheus.NewDesc("meshsplice_pods_inbound_not_ready",
	"Captured pods whose sidecar inbound listener the kernel still lacks after the grace period: inbound connections to them are refused (see the agent's log and /pods for why).",
	nil, nil)

// inboundCollector serves meshsplice_pods_inbound_not_ready.
type inboundCollector struct{ a *Agent }

func (c *inboundCollector) Describe(ch chan<- *prometheus.Desc) { ch <- inboundNotReadyDesc }

func (c *inboundCollector) Collect(ch chan<- prometheus.Metric) {
	ch <- prometheus.MustNewConstMetric(inboundNotReadyDesc, prometheus.GaugeValue, float64(c.a.inboundNotReady()))
}
