// Package sockops is the Go side of splicing: it loads the programs of
// bpf/splice.c (sockops and sk_msg), attaches sockops to a cgroup and sk_msg
// to the SOCKHASH of spliced sockets.
package sockops

//go:generate go tool bpf2go -cc clang-19 -cflags "-O2 -g -Wall -Werror -D__TARGET_ARCH_x86" -target bpfel -go-package sockops Splice ../bpf/splice.c -- -I../bpf/include -I../bpf
