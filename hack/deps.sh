#!/usr/bin/env bash
# deps.sh: the one list of what meshsplice needs from the machine, and the
# installer of whatever is missing. make test, make demo, make bench, make
# lint/generate/check-generated and .ci/run all call it, so they cannot
# disagree about what a machine needs.
#
#   hack/deps.sh [--dry-run] TARGET...   install what TARGETs need and lack
#   hack/deps.sh --path NAME             print the path of a built tool
#                                        (building it first if missing)
#
# TARGET is a make target: test, demo, bench, lint, generate, e2e-node. When all is
# present it prints nothing and takes a few milliseconds (one dpkg-query).
# Otherwise it says once what it installs and why, then installs: Debian
# packages with apt-get (needs root), programs built from the Go module
# proxy with go install into .cache/bin/NAME-VERSION (git-ignored, keyed by
# version, so a version bump rebuilds). --dry-run says what it would do and
# changes nothing. Exit status: 0 done (or nothing to do), 1 something is
# missing and cannot be installed here (not root, no apt-get, apt failed).
# internal/repo's TestDeps* run it with fake dpkg-query/apt-get.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)

# What is needed, one line each: TARGETS KIND NAME WHY
#   TARGETS  comma-separated make targets that need it
#   KIND     apt: a Debian package
#            go:  NAME=MODULE/PKG@VERSION, built with go install (no root)
#            mod: NAME=DIR:PKG@VERSION, built with go build in DIR, a module
#                 of this repository that pins PKG's dependencies (for
#                 programs go install cannot build: replace directives);
#                 DIR/ldflags, if present, holds the -ldflags; VERSION is
#                 the cache key and must be the one DIR/go.mod pins
# A new tool (helm, a kube-apiserver, ...) is one more line here.
needs() {
	cat <<'EOF'
test,demo,bench  apt iproute2        ip: network namespaces, links and routes
test,demo,bench  apt util-linux      nsenter, taskset, setpriv: run programs in a pod's netns, pinned, as a uid
test,demo,bench  apt iptables        iptables-nft-restore/-save: Istio's own sidecar rules, the baseline
test             apt nftables        nft: the baseline tests check that no nat hook is left
test             apt git             the repository tests read git ls-files
test             apt curl            the cni/README.md curl examples, run by cni/readme_test.go
test             go  cnitool=github.com/containernetworking/cni/cnitool@v1.3.1  the cni/README.md cnitool example, run by cni/readme_test.go
test,e2e-node    go  helm=helm.sh/helm/v3/cmd/helm@v3.22.0  make manifests, make test: helm lint/template of manifests/chart/meshsplice; make e2e-node: helm install/uninstall
test,e2e-node    apt etcd-server     etcd: the store of the kube-apiserver the Kubernetes tests run (internal/kubetest) and of make e2e-node's node
test,e2e-node    mod kube-apiserver=tools/kube-apiserver:k8s.io/kubernetes/cmd/kube-apiserver@v1.37.2  a real API server for the Kubernetes config source's tests (internal/kubetest; about 10 minutes of CPU to build, once)
test             mod istioctl=tools/istio:istio.io/istio/istioctl/cmd/istioctl@v0.0.0-20260827124520-eed52ebb66ad  the tests of manifests/istio-overlay.yaml: istioctl manifest generate and kube-inject (about 7 minutes of CPU to build, once; 28 minutes on a busy 2-core machine)
test             mod istio-iptables=tools/istio:./istio-iptables@v0.0.0-20260827124520-eed52ebb66ad  Istio's istio-iptables: e2e runs the istio-validation check of an injected pod with it (hack/istio-iptables-golden.sh caches the same file)
e2e-node         mod kubelet=tools/kube-apiserver:k8s.io/kubernetes/cmd/kubelet@v1.37.2  the node agent of make e2e-node's single-node cluster (same module as kube-apiserver: shares its build cache)
e2e-node         mod kube-scheduler=tools/kube-apiserver:k8s.io/kubernetes/cmd/kube-scheduler@v1.37.2  make e2e-node: places the chart's DaemonSet pod on the node
e2e-node         mod kube-controller-manager=tools/kube-apiserver:k8s.io/kubernetes/cmd/kube-controller-manager@v1.37.2  make e2e-node: the DaemonSet controller and the default ServiceAccounts
e2e-node         apt containernetworking-plugins  make e2e-node: bridge, host-local and loopback, the node's own CNI conflist that meshsplice-cni chains into
e2e-node         apt containerd      make e2e-node: the container runtime the kubelet drives (CRI)
e2e-node         apt runc            make e2e-node: the OCI runtime containerd starts the pods with
lint             apt clang-format-19 make lint checks the BPF C's format
generate         apt clang-19        make generate, check-generated: compile the BPF C (bpf2go)
generate         apt llvm-19         llvm-strip for bpf2go
generate         apt libbpf-dev      system headers for the BPF C
generate         apt bpftool         bpf/update-headers.sh: vmlinux.h from the kernel's BTF
EOF
}

say() { printf 'deps: %s\n' "$*" >&2; }
die() {
	say "$*"
	exit 1
}

cachebin="$top/.cache/bin"

# go_path NAME=MODULE/PKG@VERSION prints the cache path of the tool.
go_path() {
	local name=${1%%=*} version=${1##*@}
	printf '%s/%s-%s\n' "$cachebin" "$name" "$version"
}

# go_build NAME=MODULE/PKG@VERSION (go) or NAME=DIR:PKG@VERSION (mod)
# builds the tool into the cache.
go_build() {
	local spec=$1 name=${1%%=*} pkg=${1#*=} out tmp
	case $pkg in
	*:*) mod_build "$spec"
		return ;;
	esac
	out=$(go_path "$spec")
	command -v go >/dev/null || die "no go command: install Go (https://go.dev/dl) to build $name"
	mkdir -p "$cachebin"
	tmp=$(mktemp -d "$cachebin/.build-XXXXXX")
	if ! GOBIN=$tmp GOFLAGS=-buildvcs=false go install "$pkg" >&2; then
		rm -rf "$tmp"
		die "go install $pkg failed (is the Go module proxy reachable? GOPROXY=$(go env GOPROXY))"
	fi
	# go install names the program after the package's last element.
	mv "$tmp/$(basename "${pkg%@*}")" "$out" || die "go install $pkg made no $(basename "${pkg%@*}")"
	rm -rf "$tmp"
}

mod_build() {
	local spec=$1 name=${1%%=*} rest=${1#*=} dir pkg out tmp ldflags=""
	dir=$top/${rest%%:*} pkg=${rest#*:}
	pkg=${pkg%@*}
	out=$(go_path "$spec")
	command -v go >/dev/null || die "no go command: install Go (https://go.dev/dl) to build $name"
	[ -f "$dir/go.mod" ] || die "no module in $dir to build $name from"
	[ -f "$dir/ldflags" ] && ldflags=$(grep -v '^#' "$dir/ldflags" | tr '\n' ' ')
	mkdir -p "$cachebin"
	tmp=$(mktemp -d "$cachebin/.build-XXXXXX")
	if ! GOFLAGS=-buildvcs=false go build -C "$dir" -trimpath -ldflags "$ldflags" -o "$tmp/$name" "$pkg" >&2; then
		rm -rf "$tmp"
		die "go build $pkg in $dir failed (is the Go module proxy reachable? GOPROXY=$(go env GOPROXY))"
	fi
	mv "$tmp/$name" "$out"
	rm -rf "$tmp"
}

dry=0
targets=()
while [ $# -gt 0 ]; do
	case $1 in
	--dry-run) dry=1 ;;
	--path)
		[ $# -ge 2 ] || die "--path needs a tool name"
		spec=$(needs | awk -v n="$2" '($2 == "go" || $2 == "mod") && index($3, n "=") == 1 { print $3 }')
		[ -n "$spec" ] || die "no go tool named $2 in hack/deps.sh"
		[ -x "$(go_path "$spec")" ] || go_build "$spec"
		go_path "$spec"
		exit 0
		;;
	-h | --help)
		sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'
		exit 0
		;;
	-*) die "unknown option $1 (see hack/deps.sh --help)" ;;
	*) targets+=("$1") ;;
	esac
	shift
done
[ ${#targets[@]} -gt 0 ] || die "usage: hack/deps.sh [--dry-run] TARGET... (test, demo, bench, lint, generate, e2e-node)"
known=$(needs | awk '{ n = split($1, t, ","); for (i = 1; i <= n; i++) print t[i] }' | sort -u)
for t in "${targets[@]}"; do
	grep -qx -- "$t" <<<"$known" || die "unknown target $t (known: $(echo $known))"
done

# The lines the targets need, once each.
wanted=$(needs | awk -v want="$(
	IFS=,
	echo "${targets[*]}"
)" '
	BEGIN { split(want, w, ","); for (i in w) ok[w[i]] = 1 }
	{ n = split($1, t, ","); for (i = 1; i <= n; i++) if (t[i] in ok) { print; next } }')

apt_pkgs=$(awk '$2 == "apt" { print $3 }' <<<"$wanted")
go_specs=$(awk '$2 == "go" || $2 == "mod" { print $3 }' <<<"$wanted")

# One dpkg-query for every package: "NAME STATUS" for those it knows.
installed=""
if [ -n "$apt_pkgs" ] && command -v dpkg-query >/dev/null; then
	# shellcheck disable=SC2086 # one word per package
	installed=$(dpkg-query -W -f='${Package} ${Status}\n' $apt_pkgs 2>/dev/null | awk '$NF == "installed" && $(NF-1) == "ok" { print $1 }' || true)
fi
missing_apt=()
for p in $apt_pkgs; do
	grep -qx -- "$p" <<<"$installed" || missing_apt+=("$p")
done
missing_go=()
for s in $go_specs; do
	[ -x "$(go_path "$s")" ] || missing_go+=("$s")
done
[ ${#missing_apt[@]} -eq 0 ] && [ ${#missing_go[@]} -eq 0 ] && exit 0

say "make ${targets[*]} needs what this machine lacks:"
while read -r _ kind name why; do
	case $kind in
	apt) printf '%s\n' "${missing_apt[@]}" | grep -qx -- "$name" || continue
		say "  $name (Debian package): $why" ;;
	go) printf '%s\n' "${missing_go[@]}" | grep -qx -- "$name" || continue
		say "  ${name%%=*} ${name##*@} (go install ${name#*=}, into .cache/bin): $why" ;;
	mod) printf '%s\n' "${missing_go[@]}" | grep -qx -- "$name" || continue
		n=${name#*=}
		say "  ${name%%=*} ${name##*@} (go build ${n#*:} in ${n%%:*}, into .cache/bin): $why" ;;
	esac
done <<<"$wanted"

if [ $dry = 1 ]; then
	[ ${#missing_apt[@]} -eq 0 ] || say "would run: apt-get update && apt-get install -y --no-install-recommends ${missing_apt[*]}"
	for s in "${missing_go[@]}"; do say "would run: go build/install ${s#*=} (into $(go_path "$s"))"; done
	exit 0
fi

if [ ${#missing_apt[@]} -gt 0 ]; then
	if [ "$(id -u)" != 0 ]; then
		die "installing Debian packages needs root: run this as root, or: sudo apt-get install -y ${missing_apt[*]}"
	fi
	command -v apt-get >/dev/null ||
		die "no apt-get on this machine: install ${missing_apt[*]} (or your distribution's equivalents) by hand"
	say "installing with apt-get: ${missing_apt[*]}"
	export DEBIAN_FRONTEND=noninteractive
	if ! apt-get update -qq >&2; then
		die "apt-get update failed: check the network and /etc/apt/sources.list, then run make again"
	fi
	if ! apt-get install -y -qq --no-install-recommends "${missing_apt[@]}" >&2; then
		die "apt-get install ${missing_apt[*]} failed (see above): install them by hand, then run make again"
	fi
fi
for s in "${missing_go[@]}"; do
	say "building ${s%%=*}: ${s#*=}"
	go_build "$s"
done
say "done"
