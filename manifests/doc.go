// Package manifests holds what installs meshsplice on Kubernetes:
// the Helm chart (chart/meshsplice), the same rendered as plain YAML
// (meshsplice.yaml, written by make manifests), and the IstioOperator
// overlays that give Istio an injection template without istio-init
// (istio-overlay.yaml; istio-overlay-all-pods.yaml makes it every pod's
// default). It has no code; its tests run helm lint and helm template,
// check what they render, have a real kube-apiserver (internal/kubetest)
// validate it with a server-side dry run, and run istioctl (manifest
// generate, kube-inject; internal/istioctl) on the overlays. make e2e-node
// installs the chart on a real single-node Kubernetes (e2e/node).
package manifests
