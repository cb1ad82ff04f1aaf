# meshsplice: the two commands a newcomer needs are `make demo` and `make test`.
SHELL := /bin/bash
GO ?= go
BIN := bin
# Tests create network namespaces, cgroups and BPF programs: they need root.
TEST_FLAGS ?= -count=1 -timeout 20m

.PHONY: all build generate check-generated test unit lint demo bench clean

all: build

build:
	$(GO) build -o $(BIN)/ ./cmd/...

# generate compiles the BPF C with clang (CO-RE, bpf2go). The objects are
# committed: building meshsplice needs no clang.
generate:
	$(GO) generate ./redirect ./sockops

# check-generated proves the committed BPF objects and Go bindings match
# the C sources.
check-generated:
	./hack/check-generated.sh

# test runs every test, the privileged real-kernel ones included (root).
test:
	@if [ "$$(id -u)" != 0 ]; then echo "make test needs root (network namespaces, cgroups, BPF)"; exit 1; fi
	$(GO) test $(TEST_FLAGS) ./...

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "not gofmt-ed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	clang-format-19 --dry-run --Werror bpf/*.c bpf/common.h

demo: build
	$(BIN)/meshsplice demo

bench: build
	$(BIN)/meshsplice bench

clean:
	rm -rf $(BIN)
