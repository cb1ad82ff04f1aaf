package agent

import (
	"github.com/meshsplice/meshsplice/datapath"
)

// What the agent failed to apply (node switches, a pod's settings, the
// policy) goes back on its work queue and is applied again after a
// back-off that doubles from retryFirst to retryMax while the failures go
// on, and is reset by a success (controller.go). A new config or
// registration in between is applied at once (and a success there ends the
// back-off as well).

// nodeSettings are the node switches: on only if the agent's flag AND the
// mesh-wide meshsplice ConfigMap say so. Called with a.mu held.
func (a *Agent) nodeSettings() datapath.NodeSettings {
	return datapath.NodeSettings{Capture: a.cfg.NodeCapture && a.istio.Node.Capture, Splice: a.cfg.NodeSplice && a.istio.Node.Splice,
		AppSpliceOff: a.cfg.NodeAppSpliceOff || a.istio.Node.AppSpliceOff}
}
