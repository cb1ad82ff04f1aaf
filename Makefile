# meshsplice: the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
GO ?= go
BIN := bin
# Tests create network namespaces, cgroups and BPF programs: they need root.
TEST_FLAGS ?= -count=1 -timeout 20m
# DEPS installs what a target needs and the machine lacks (Debian packages,
# tools built from the Go module proxy); silent when all is there. Its list
# is the only one: .ci/run uses it too.
DEPS := ./hack/deps.sh



.PHONY: manifests
# manifests writes manifests/meshsplice.yaml from the Helm chart (a test
# fails when the checked-in file differs).
manifests:
	./hack/render-manifests.sh > manifests/meshsplice.yaml.tmp && mv manifests/meshsplice.yaml.tmp manifests/meshsplice.yaml

.PHONY: image
# IMAGE is the image make image builds; the chart's default image
# (manifests/chart/meshsplice/values.yaml) names the same (a test checks).
IMAGE := ghcr.io/meshsplice/meshsplice:0.1.0
# image writes $(BIN)/meshsplice-image.tar, an OCI archive FROM scratch with
# /meshsplice and /meshsplice-cni (static, reproducible: same digest twice).
# Import it on a node: ctr -n k8s.io images import $(BIN)/meshsplice-image.tar
image:
	CGO_ENABLED=0 $(GO) build -trimpath -buildvcs=false -ldflags='-s -w -buildid=' -o $(BIN)/image/ ./cmd/meshsplice ./cmd/meshsplice-cni
	$(GO) run ./hack/image -o $(BIN)/meshsplice-image.tar -ref $(IMAGE) $(BIN)/image/meshsplice $(BIN)/image/meshsplice-cni

.PHONY: e2e-node
# e2e-node is the proof on a real node (docs/e2e-node.md): a single-node
# Kubernetes (etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
# containerd, runc, kubelet v1.37.2) started in a temporary dir, meshsplice
# installed with the Helm chart from make image's archive, two meshed pods
# captured, spliced and policed with no iptables rule, helm uninstall
# leaving the node as it was, and the node torn down leaving the host as it
# was (also on failure); also a node whose CNI is a single-plugin .conf.
# About 75 s once the programs are cached; the
# first run builds kubelet, the scheduler and the controller-manager.
e2e-node: image
	@if [ "$$(id -u)" != 0 ]; then echo "make e2e-node needs root (a kubelet, containerd, BPF)"; exit 1; fi
	@$(DEPS) e2e-node
	$(GO) test $(TEST_FLAGS) -p 1 -tags e2enode -v ./internal/kubenode ./e2e/node

.PHONY: all build demo-bins generate check-generated test unit lint demo bench bench-bins kube-scale clean

all: build

build:
	$(GO) build -o $(BIN)/ ./cmd/...

# The demo also needs the test sidecar/echo/client programs and the
# reference CNI plugins (built from their own module, see
# cni/testdata/refplugins/go.mod, so their dependencies stay out of ours).
demo-bins: build
	$(GO) build -o $(BIN)/mstest ./e2e/mstest
	$(GO) build -C cni/testdata/refplugins -o $(CURDIR)/$(BIN)/cni/ \
		github.com/containernetworking/plugins/plugins/main/bridge \
		github.com/containernetworking/plugins/plugins/ipam/host-local

# generate compiles the BPF C with clang (CO-RE, bpf2go). The objects are
# committed: building meshsplice needs no clang.
generate:
	@$(DEPS) generate
	$(GO) generate ./redirect ./sockops

# check-generated proves the committed BPF objects and Go bindings match
# the C sources.
check-generated:
	@$(DEPS) generate
	./hack/check-generated.sh

# test runs every test, the privileged real-kernel ones included (root).
test:
	@if [ "$$(id -u)" != 0 ]; then echo "make test needs root (network namespaces, cgroups, BPF)"; exit 1; fi
	@$(DEPS) test
	$(GO) test $(TEST_FLAGS) ./...

lint:
	@$(DEPS) lint
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "not gofmt-ed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	clang-format-19 --dry-run --Werror bpf/*.c bpf/*.h

demo: demo-bins
	@if [ "$$(id -u)" != 0 ]; then echo "make demo needs root (network namespaces, cgroups, BPF)"; exit 1; fi
	@$(DEPS) demo
	$(BIN)/meshsplice demo --bin-dir $(BIN)

# bench-bins builds what `meshsplice bench` runs in its pods: the test
# sidecar/echo/sink/load client (mstest) and fortio, Istio's load tool,
# built from its own module (tools/fortio/go.mod) so that its dependencies
# stay out of ours.
bench-bins: build
	$(GO) build -o $(BIN)/mstest ./e2e/mstest
	$(GO) build -C tools/fortio -o $(CURDIR)/$(BIN)/fortio fortio.org/fortio

# bench runs the full benchmark (15-30 minutes; BENCH_FLAGS=--quick for a
# one-minute smoke run) and prints the table; see docs/benchmarks.md.
BENCH_FLAGS ?=
bench: bench-bins
	@if [ "$$(id -u)" != 0 ]; then echo "make bench needs root (network namespaces, cgroups, BPF)"; exit 1; fi
	@$(DEPS) bench
	$(BIN)/meshsplice bench --bin-dir $(BIN) $(BENCH_FLAGS)

# kube-scale measures the Kubernetes config source and the agent with 5,000
# pod objects and 1,000 AuthorizationPolicies against the tests' real API
# server (docs/kubernetes-scale.md; minutes).
kube-scale:
	@$(DEPS) test
	$(GO) test -count=1 -run '^$$' -bench KubeScale -benchtime 1x ./istio

clean:
	rm -rf $(BIN)
