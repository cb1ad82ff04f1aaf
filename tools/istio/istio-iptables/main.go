// Command istio-iptables is Istio's own istio-iptables tool (the program
// istio-init runs in every sidecar-injected pod), built from the
// istio.io/istio module pinned in this directory's go.mod.
//
// Istio ships it only as the "istio-iptables" subcommand of pilot-agent; this
// tiny main runs the same cobra command with the same logging flags
// (--log_output_level, --log_as_json, ... which pilot-agent attaches to its
// root command), so istio-init's exact arguments work, and links far less of
// Istio (about 9 MB instead of 46 MB). meshsplice uses it to generate the
// iptables baseline rules (hack/istio-iptables-golden.sh), never at run time.
package main

import (
	"os"

	"istio.io/istio/pkg/log"
	iptables "istio.io/istio/tools/istio-iptables/pkg/cmd"
)

func main() {
	logOpts := log.DefaultOptions()
	cmd := iptables.GetCommand(logOpts)
	logOpts.AttachCobraFlags(cmd)
	if err := cmd.Execute(); err != nil {
		// cobra already printed the error and the usage.
		os.Exit(1)
	}
}
