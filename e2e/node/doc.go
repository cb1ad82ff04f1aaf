// Package node is make e2e-node: meshsplice installed by its Helm chart on
// a real single-node Kubernetes (internal/kubenode), two meshed pods in
// the form Istio's injector gives them (an istio-proxy container, the
// sidecar.istio.io/status annotation, no istio-init), and helm uninstall
// leaving the node as it found it (docs/e2e-node.md). Its tests build only
// with the tag e2enode (make e2e-node): a node is a machine-wide thing,
// not for make test's parallel packages.
package node
