package main

import (
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/meshsplice/meshsplice/agent"
	"github.com/meshsplice/meshsplice/istio"
)

// kubeFlags are the agent's flags for Kubernetes mode (--kubernetes).
type kubeFlags struct {
	on                          *bool
	kubeconfig, node, namespace *string
	revision, switchesNamespace *string
}

func addKubeFlags(fs *flag.FlagSet) *kubeFlags {
	return &kubeFlags{
		on:                fs.Bool("kubernetes", false, "read Istio and Kubernetes configuration from the API server (in-cluster config, or --kubeconfig)"),
		kubeconfig:        fs.String("kubeconfig", "", "kubeconfig file (default: the pod's in-cluster service account)"),
		node:              fs.String("node-name", os.Getenv("NODE_NAME"), "this node's name, for its pods (default: $NODE_NAME)"),
		namespace:         fs.String("istio-namespace", "istio-system", "istiod's namespace: the istio (istio-REV) ConfigMap with the mesh config"),
		revision:          fs.String("revision", "", "the Istio revision this node follows (default: the default revision)"),
		switchesNamespace: fs.String("switches-namespace", "", "namespace of the meshsplice ConfigMap, the node switches (default: --istio-namespace)"),
	}
}

// source is the Kubernetes config source the flags describe.
func (k *kubeFlags) source(log *slog.Logger) (istio.Source, error) {
	cfg, err := k.restConfig()
	if err != nil {
		return nil, err
	}
	return &istio.KubeSource{Config: cfg, NodeName: *k.node, IstioNamespace: *k.namespace,
		Revision: *k.revision, SwitchesNamespace: *k.switchesNamespace, Log: log}, nil
}

// restConfig is the API server's address and credentials.
func (k *kubeFlags) restConfig() (*rest.Config, error) {
	if *k.node == "" {
		return nil, errors.New("--kubernetes needs --node-name (or NODE_NAME from the downward API)")
	}
	cfg, err := istio.KubeRESTConfig(*k.kubeconfig)
	if err != nil {
		return nil, err
	}
	cfg.UserAgent = "meshsplice-agent/" + *k.node
	return cfg, nil
}

// events writes the agent's failures as Events on its pods (and node).
func (k *kubeFlags) events(log *slog.Logger) (*agent.KubeEvents, error) {
	cfg, err := k.restConfig()
	if err != nil {
		return nil, err
	}
	kc, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	return agent.NewKubeEvents(kc, *k.node, log), nil
}
