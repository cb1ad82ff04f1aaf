package agent

import "github.com/meshsplice/meshsplice/istio"

// podDefaults are the defaults a pod's annotations are resolved against:
// the mesh config's, and this node's default for app <-> sidecar splicing
// (datapath.AppSpliceDefault: only where the kernel keeps every reader of
// an app socket whole, splice(2) and FIONREAD included).
func (a *Agent) podDefaults() istio.Defaults {
	d := a.istio.Defaults()
	d.AppSplice, _ = a.dp.AppSpliceDefault()
	return d
}
