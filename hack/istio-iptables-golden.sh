#!/usr/bin/env bash
# istio-iptables-golden.sh writes the iptables baseline golden files,
# baseline/testdata/istio-sidecar-v{4,6}.golden, from Istio's own
# istio-iptables tool, built from the istio.io/istio version pinned in
# tools/istio/go.mod.
#
#   hack/istio-iptables-golden.sh          build the tool if missing, write the files
#   hack/istio-iptables-golden.sh --check  rebuild the tool, regenerate into a
#                                          scratch dir and fail on any difference
#
# The tool runs with --dry-run and exactly the arguments istio-init gets in a
# sidecar-injected pod; what it logs as the iptables-restore (and
# ip6tables-restore) input is what it would load. istio-iptables decides
# whether to emit IPv6 rules from the addresses of the namespace it runs in
# (ENABLE_INBOUND_IPV6 is derived, not a flag): without --dual-stack, from the
# first non-loopback address only; with --dual-stack (ISTIO_DUAL_STACK=true in
# a dual-stack mesh), from any IPv6 address. So each run happens in a
# throwaway network namespace holding a veth pair with known addresses and
# with an empty environment, never in the host's:
#   IPv4:      10.99.0.2/24 only,              no --dual-stack
#   IPv4+IPv6: 10.99.0.2/24 and fd00:99::2/64, --dual-stack
# The IPv4 rules of the second run must equal the first run's; the script
# checks that.
#
# Needs root, or unprivileged user namespaces. The first build takes a while
# (Istio is a large module); the binary is cached in .cache/bin (git-ignored),
# keyed by the Istio version.
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
check=false
case "${1:-}" in
  "") ;;
  --check) check=true ;;
  *) echo "usage: $0 [--check]" >&2; exit 2 ;;
esac

version=$(cd "$top/tools/istio" && go list -m -f '{{.Version}}' istio.io/istio)
bin="$top/.cache/bin/istio-iptables-$version"
if $check || [ ! -x "$bin" ]; then
  echo "istio-iptables-golden: building istio-iptables from istio.io/istio@$version" >&2
  mkdir -p "$top/.cache/bin"
  start=$SECONDS
  (cd "$top/tools/istio" && go build -trimpath -o "$bin.tmp" ./istio-iptables)
  mv "$bin.tmp" "$bin"
  echo "istio-iptables-golden: built $bin in $((SECONDS - start))s" >&2
fi

# The arguments of istio-init in Istio's sidecar injection template
# (manifests/charts/istio-control/istio-discovery/files/injection-template.yaml)
# with the default values, plus --dry-run.
args=(-p 15001 -z 15006 -u 1337 -m REDIRECT -i '*' -x '' -b '*' -d 15090,15021,15020 --dry-run)

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

if [ "$(id -u)" = 0 ]; then
  unshare=(unshare --net)
else
  unshare=(unshare --user --map-root-user --net)
fi

# run_dry LOG ADDR... [-- EXTRA-ARGS...] runs the tool in a fresh network
# namespace holding the given addresses on a veth, and saves its log.
run_dry() {
  local log=$1
  shift
  local addrs=()
  while [ $# -gt 0 ] && [ "$1" != -- ]; do addrs+=("$1"); shift; done
  if [ $# -gt 0 ]; then shift; fi
  # shellcheck disable=SC2016 # expanded by the inner shell
  env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin "${unshare[@]}" sh -eu -c '
    ip link add veth0 type veth peer name veth1
    ip link set veth0 up
    ip link set veth1 up
    while [ "$1" != -- ]; do
      case "$1" in
        *:*) ip addr add "$1" dev veth0 nodad ;;
        *) ip addr add "$1" dev veth0 ;;
      esac
      shift
    done
    shift
    exec "$@"
  ' sh "${addrs[@]}" -- "$bin" "${args[@]}" "$@" >"$log"
}

# restore_input LOG CMD prints the input of the restore command CMD
# (iptables-restore or ip6tables-restore) that the tool logged: the lines
# after "Running iptables restore with: CMD and the following input:" up to
# the next timestamped log line.
restore_input() {
  awk -v cmd="$2" '
    /^[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]T[0-9:.]+Z\t/ { on = 0 }
    on { print; n++ }
    index($0, "Running iptables restore with: " cmd " and the following input:") { on = 1; found++ }
    END { if (found != 1 || n == 0) { print "no unique " cmd " input in the log" > "/dev/stderr"; exit 1 } }
  ' "$1"
}

# quote prints its arguments as a shell command line.
quote() {
  local out="" a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./,:=@%+-]+$ ]]; then out+=" $a"; else out+=" '${a//\'/\'\\\'\'}'"; fi
  done
  printf '%s' "${out# }"
}

run_dry "$scratch/v4.log" 10.99.0.2/24
run_dry "$scratch/v6.log" 10.99.0.2/24 fd00:99::2/64 -- --dual-stack

if grep -q 'ip6tables-restore' "$scratch/v4.log"; then
  echo "istio-iptables-golden: the IPv4-only run emitted ip6tables rules" >&2
  exit 1
fi
restore_input "$scratch/v4.log" iptables-restore >"$scratch/v4.rules"
restore_input "$scratch/v6.log" iptables-restore >"$scratch/v4-dual.rules"
restore_input "$scratch/v6.log" ip6tables-restore >"$scratch/v6.rules"
if ! cmp -s "$scratch/v4.rules" "$scratch/v4-dual.rules"; then
  echo "istio-iptables-golden: IPv4 rules differ between the IPv4-only and the dual-stack run:" >&2
  diff -u "$scratch/v4.rules" "$scratch/v4-dual.rules" >&2 || true
  exit 1
fi

mkdir -p "$scratch/out"
{
  printf '# istio.io/istio@%s iptables-restore input of: %s\n' "$version" "$(quote istio-iptables "${args[@]}")"
  cat "$scratch/v4.rules"
} >"$scratch/out/istio-sidecar-v4.golden"
{
  printf '# istio.io/istio@%s ip6tables-restore input of: %s\n' "$version" "$(quote istio-iptables "${args[@]}" --dual-stack)"
  cat "$scratch/v6.rules"
} >"$scratch/out/istio-sidecar-v6.golden"

dest="$top/baseline/testdata"
status=0
for f in istio-sidecar-v4.golden istio-sidecar-v6.golden; do
  if $check; then
    if ! diff -u "$dest/$f" "$scratch/out/$f" >&2; then
      echo "istio-iptables-golden: baseline/testdata/$f differs from istio.io/istio@$version's output (run hack/istio-iptables-golden.sh)" >&2
      status=1
    fi
  else
    mkdir -p "$dest"
    cp "$scratch/out/$f" "$dest/$f"
    echo "istio-iptables-golden: wrote baseline/testdata/$f ($(grep -c '^-A ' "$dest/$f") rules)" >&2
  fi
done
if $check && [ "$status" = 0 ]; then
  echo "istio-iptables-golden: golden files match istio.io/istio@$version" >&2
fi
exit $status
