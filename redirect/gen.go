// Package redirect is the Go side of sidecar capture: it loads the programs
// of bpf/capture.c (cgroup/connect4, cgroup/connect6, cgroup/getsockopt and
// sk_lookup) and attaches them to a cgroup or to a pod's network namespace.
package redirect

//go:generate go tool bpf2go -cc clang-19 -cflags "-O2 -g -Wall -Werror -D__TARGET_ARCH_x86" -target bpfel -go-package redirect -type ms_pod_flag -type ms_node_flag -type ms_port_kind -type ms_range_kind -type ms_role -type ms_sk_flag Capture ../bpf/capture.c -- -I../bpf/include -I../bpf
