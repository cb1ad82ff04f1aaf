#!/usr/bin/env bash
# check-generated.sh regenerates the bpf2go output in a scratch copy of the
# tree and fails if it differs from what is committed.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
# Copy what generation reads and writes, at the same relative paths.
cp -r "$top/bpf" "$top/redirect" "$top/sockops" "$top/go.mod" "$top/go.sum" "$scratch/"
(cd "$scratch" && go generate ./redirect ./sockops)
status=0
for f in redirect/capture_bpfel.go redirect/capture_bpfel.o redirect/teardown_bpfel.go redirect/teardown_bpfel.o sockops/splice_bpfel.go sockops/splice_bpfel.o sockops/readers_bpfel.go sockops/readers_bpfel.o; do
  if ! cmp -s "$top/$f" "$scratch/$f"; then
    echo "check-generated: $f differs from a fresh 'make generate'" >&2
    status=1
  fi
done
if [ "$status" = 0 ]; then echo "check-generated: BPF objects match their sources"; fi
exit $status
