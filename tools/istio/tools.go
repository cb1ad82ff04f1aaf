//go:build tools

// Package istio only names the Istio programs this module builds besides
// istio-iptables: istioctl, which the tests of manifests/istio-overlay.yaml
// run (manifest generate, kube-inject; built and cached by hack/deps.sh).
package istio

import _ "istio.io/istio/istioctl/cmd/istioctl"
