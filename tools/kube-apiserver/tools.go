//go:build tools

// Package kubeapiserver only names the programs this module builds.
package kubeapiserver

import _ "k8s.io/kubernetes/cmd/kube-apiserver"
