// Package redirect is the Go side of sidecar capture: it loads the programs
// of bpf/capture.c (cgroup/connect4, cgroup/connect6, cgroup/getsockopt and
// sk_lookup) and attaches them to a cgroup or to a pod's network namespace.
package redirect

//go:generate go tool bpf2go -cc clang-19 -cflags "-O2 -g -Wall -Werror -D__TARGET_ARCH_x86" -target bpfel -go-package redirect -type ms_pod_flag -type ms_ip_flag -type ms_node_flag -type ms_port_kind -type ms_range_kind -type ms_role -type ms_sk_flag -type ms_denial -type ms_direction -type ms_denial_reason Capture ../bpf/capture.c -- -I../bpf/include -I../bpf

// The policy teardown iterator is an object of its own: it needs Linux >= 6.5
// (bpf_sock_destroy), and everything else must load without it.
//go:generate go tool bpf2go -cc clang-19 -cflags "-O2 -g -Wall -Werror -D__TARGET_ARCH_x86" -target bpfel -go-package redirect -no-global-types Teardown ../bpf/teardown.c -- -I../bpf/include -I../bpf
