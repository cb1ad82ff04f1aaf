// Package manifests holds what installs meshsplice on Kubernetes (preview):
// the Helm chart (chart/meshsplice) and the same rendered as plain YAML
// (meshsplice.yaml, written by make manifests). It has no code; its tests
// run helm lint and helm template and check what they render.
package manifests
