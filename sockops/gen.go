// Package sockops is the Go side of splicing: it loads the programs of
// bpf/splice.c (sockops and sk_msg), attaches sockops to a cgroup and sk_msg
// to the SOCKHASH of spliced sockets, and the programs of bpf/readers.c that
// keep splice(2) readers of spliced sockets from hanging.
package sockops

//go:generate go tool bpf2go -cc clang-19 -cflags "-O2 -g -Wall -Werror -D__TARGET_ARCH_x86" -target bpfel -go-package sockops Splice ../bpf/splice.c -- -I../bpf/include -I../bpf
//go:generate go tool bpf2go -cc clang-19 -cflags "-O2 -g -Wall -Werror -D__TARGET_ARCH_x86" -target bpfel -go-package sockops -type ms_reader_event Readers ../bpf/readers.c -- -I../bpf/include -I../bpf
