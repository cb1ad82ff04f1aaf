// Package manifests holds what installs meshsplice on Kubernetes (preview):
// the Helm chart (chart/meshsplice) and the same rendered as plain YAML
// (meshsplice.yaml, written by make manifests). It has no code; its tests
// run helm lint and helm template, check what they render, and have a real
// kube-apiserver (internal/kubetest) validate it with a server-side dry run.
package manifests
