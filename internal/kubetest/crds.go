package kubetest

import "k8s.io/client-go/rest"

// ApplyIstioCRDs creates Istio's CRDs (testdata/istio-crds.yaml) on the
// API server cfg reaches and waits until each is established: for
// clusters other than Start's (make e2e-node's node).
func ApplyIstioCRDs(cfg *rest.Config) error {
	return (&Server{Config: cfg}).applyCRDs()
}
