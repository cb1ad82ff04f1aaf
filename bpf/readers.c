// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * readers.c: keep splice(2) and sendfile(2) readers of spliced sockets from
 * hanging.
 *
 * A spliced socket has a psock, and sk_msg redirects its peer's sends into
 * the psock's ingress queue. Only recvmsg (tcp_bpf_recvmsg) reads that
 * queue; splice(2), sendfile(2) and io_uring's splice read a socket through
 * tcp_splice_read(), which sees only the TCP receive queue. Such a reader
 * waits for data that never comes: it hangs, or spins on EAGAIN.
 *
 * Guard (BPF LSM active). vfs_splice_read() is where every splice-style
 * read of a file starts, and it asks security_file_permission() before it
 * reads. ms_splice_enter/ms_splice_exit mark the thread while it is inside
 * vfs_splice_read() on a socket that has a psock; ms_splice_guard, on the
 * file_permission hook, refuses that read with EINVAL. EINVAL from splice(2)
 * is what callers already take for "splice not supported here": Go's
 * runtime and common proxies fall back to read(2), which goes through
 * tcp_bpf_recvmsg and reads the psock queue first, then the TCP queue: in
 * order. Every splice-style read of such a socket is refused, from its very
 * first one, so a caller never sees splice work and then fail. A read(2) of
 * the same socket passes file_permission outside vfs_splice_read(): never
 * refused.
 *
 * Detector (no guard). Many kernels do not list "bpf" among their active
 * LSMs, and some refuse every trampoline program (fentry, fexit, lsm: EPERM
 * on this project's test machine, measured), so the guard cannot run.
 * ms_splice_detect, on the raw sys_enter tracepoint, sees a splice(2) or
 * sendfile(2) whose input is a socket with a psock, before it reads: it
 * counts it, stops splicing new connections of that pod (ms_splice_readers,
 * read by sockops), remembers the socket for ms_reset_iter and tells the
 * agent (ms_reader_events), which logs the pod and the process and resets
 * that connection rather than leave it hung. It runs on every syscall entry
 * (two compares for all but these two), so it is attached only where the
 * guard is not. io_uring's splice is not seen: on such a node, such a reader
 * still hangs.
 *
 * Kernel structs are read through minimal CO-RE views, as in teardown.c.
 */
#include "common.h"
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>

#define MS_EINVAL  22
#define MS_S_IFMT  0170000
#define MS_S_IFSOC 0140000
/* include/net/sock.h: sk_user_data holds a psock when this bit is set. */
#define MS_SK_USER_DATA_PSOCK 4UL

struct inode___ms {
	unsigned short i_mode;
} __attribute__((preserve_access_index));

struct net___ms {
	__u64 net_cookie;
} __attribute__((preserve_access_index));

struct possible_net___ms {
	struct net___ms *net;
} __attribute__((preserve_access_index));

struct sock_common___ms {
	struct possible_net___ms skc_net;
	__u16 skc_dport;
	__u16 skc_num;
} __attribute__((preserve_access_index));

struct sock___ms {
	struct sock_common___ms __sk_common;
	void *sk_user_data;
} __attribute__((preserve_access_index));

struct socket___ms {
	struct sock___ms *sk;
} __attribute__((preserve_access_index));

struct file___ms {
	struct inode___ms *f_inode;
	void *private_data;
} __attribute__((preserve_access_index));

struct fdtable___ms {
	unsigned int max_fds;
	struct file___ms **fd;
} __attribute__((preserve_access_index));

struct files_struct___ms {
	struct fdtable___ms *fdt;
} __attribute__((preserve_access_index));

struct task_struct___ms {
	struct files_struct___ms *files;
} __attribute__((preserve_access_index));

struct pt_regs___ms {
	unsigned long di;
	unsigned long si;
} __attribute__((preserve_access_index));

struct bpf_iter__tcp___ms {
	void *meta;
	struct sock_common___ms *sk_common;
} __attribute__((preserve_access_index));

extern int bpf_sock_destroy(struct sock_common___ms *sk) __ksym;

/* Threads inside vfs_splice_read() on a socket with a psock: the file. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);   /* thread id */
	__type(value, __u64); /* struct file * */
} ms_splicing SEC(".maps");

/* Sockets to reset, for ms_reset_iter: the struct sock * as a number, and
 * the socket's ports, so that another socket allocated at the same address
 * later is never taken for it. */
struct ms_stuck {
	__u64 netns;
	__u32 ports; /* local (host order) << 16 | remote (network order) */
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, struct ms_stuck);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ms_stuck_socks SEC(".maps");

/* One unguarded splice(2) reader, for the agent's log. */
struct ms_reader_event {
	__u64 netns;
	__u32 pid;
	__u32 tid;
	char comm[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 64 * 1024);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ms_reader_events SEC(".maps");

/* Force the type into BTF for bpf2go -type. */
const struct ms_reader_event *unused_ms_reader_event __attribute__((unused));

/* sock_psocked returns the struct sock of a socket that has a psock, or
 * NULL. */
static __always_inline struct sock___ms *sock_psocked(struct socket___ms *sock)
{
	struct sock___ms *sk = BPF_CORE_READ(sock, sk);
	__u64 ud;

	if (!sk)
		return NULL;
	ud = (__u64)BPF_CORE_READ(sk, sk_user_data);
	if (!(ud & MS_SK_USER_DATA_PSOCK))
		return NULL;
	return sk;
}

static __always_inline int file_psocked(struct file___ms *file)
{
	unsigned short mode = BPF_CORE_READ(file, f_inode, i_mode);

	if ((mode & MS_S_IFMT) != MS_S_IFSOC)
		return 0;
	return sock_psocked(BPF_CORE_READ(file, private_data)) != NULL;
}

SEC("fentry/vfs_splice_read")
int BPF_PROG(ms_splice_enter, struct file___ms *in)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	__u64 f = (__u64)in;

	if (file_psocked(in))
		bpf_map_update_elem(&ms_splicing, &tid, &f, BPF_ANY);
	return 0;
}

SEC("fexit/vfs_splice_read")
int BPF_PROG(ms_splice_exit, struct file___ms *in)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();

	bpf_map_delete_elem(&ms_splicing, &tid);
	return 0;
}

SEC("lsm/file_permission")
int BPF_PROG(ms_splice_guard, struct file___ms *file, int mask, int ret)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	__u64 *f;

	if (ret)
		return ret;
	f = bpf_map_lookup_elem(&ms_splicing, &tid);
	if (!f || *f != (__u64)file)
		return 0;
	count(MS_C_SPLICE_REFUSED, 1);
	return -MS_EINVAL;
}

/* x86_64 syscall numbers (arch/x86/entry/syscalls/syscall_64.tbl). */
#define MS_NR_SENDFILE 40
#define MS_NR_SPLICE   275

/* fd_file returns the struct file of descriptor fd of the current task. */
static __always_inline struct file___ms *fd_file(__u64 fd)
{
	struct task_struct___ms *task = (void *)bpf_get_current_task();
	struct fdtable___ms *fdt = BPF_CORE_READ(task, files, fdt);
	struct file___ms **fds;
	struct file___ms *f = NULL;

	if (!fdt || fd >= BPF_CORE_READ(fdt, max_fds))
		return NULL;
	fds = BPF_CORE_READ(fdt, fd);
	bpf_probe_read_kernel(&f, sizeof(f), fds + fd);
	return f;
}

SEC("tp_btf/sys_enter")
int BPF_PROG(ms_splice_detect, struct pt_regs___ms *regs, long id)
{
	struct ms_reader_event *ev;
	struct socket___ms *sock;
	struct ms_stuck stuck = {};
	__u64 key, netns, one = 1, *n;
	struct file___ms *file;
	struct sock___ms *sk;
	__u64 fd;

	if (id == MS_NR_SPLICE)
		fd = BPF_CORE_READ(regs, di);
	else if (id == MS_NR_SENDFILE)
		fd = BPF_CORE_READ(regs, si);
	else
		return 0;
	file = fd_file(fd);
	if (!file ||
	    (BPF_CORE_READ(file, f_inode, i_mode) & MS_S_IFMT) != MS_S_IFSOC)
		return 0;
	sock = BPF_CORE_READ(file, private_data);
	sk = sock_psocked(sock);
	if (!sk)
		return 0;
	key = (__u64)sk;
	netns = BPF_CORE_READ(sk, __sk_common.skc_net.net, net_cookie);
	count(MS_C_SPLICE_UNGUARDED, 1);
	n = bpf_map_lookup_elem(&ms_splice_readers, &netns);
	if (n)
		__sync_fetch_and_add(n, 1);
	else
		bpf_map_update_elem(&ms_splice_readers, &netns, &one,
				    BPF_NOEXIST);
	stuck.netns = netns;
	stuck.ports = (__u32)BPF_CORE_READ(sk, __sk_common.skc_num) << 16 |
		      BPF_CORE_READ(sk, __sk_common.skc_dport);
	if (bpf_map_update_elem(&ms_stuck_socks, &key, &stuck, BPF_NOEXIST))
		return 0; /* seen before: the agent knows */
	ev = bpf_ringbuf_reserve(&ms_reader_events, sizeof(*ev), 0);
	if (!ev)
		return 0;
	ev->netns = netns;
	ev->pid = bpf_get_current_pid_tgid() >> 32;
	ev->tid = (__u32)bpf_get_current_pid_tgid();
	bpf_get_current_comm(ev->comm, sizeof(ev->comm));
	bpf_ringbuf_submit(ev, 0);
	return 0;
}

/* ms_reset_iter resets the sockets ms_splice_detect remembered, in the
 * netns the agent runs it in: the holder gets ECONNABORTED, the peer RST. */
SEC("iter/tcp")
int ms_reset_iter(struct bpf_iter__tcp___ms *ctx)
{
	struct sock_common___ms *skc = ctx->sk_common;
	struct ms_stuck *stuck;
	__u64 key;

	if (!skc)
		return 0;
	key = (__u64)skc;
	stuck = bpf_map_lookup_elem(&ms_stuck_socks, &key);
	if (!stuck)
		return 0;
	if (stuck->ports != ((__u32)skc->skc_num << 16 | skc->skc_dport))
		return 0; /* another socket at the same address */
	bpf_map_delete_elem(&ms_stuck_socks, &key);
	if (bpf_sock_destroy(skc) == 0)
		count(MS_C_SPLICE_READER_RESET, 1);
	return 0;
}
