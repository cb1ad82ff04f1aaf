// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * teardown.c: close live connections that a policy change now forbids.
 *
 * The agent runs this iterator in each meshed pod's netns after a policy
 * change, a change of the addresses' identities included (the netns cookie
 * in ms_iter_netns, as for ms_listener_iter). For every TCP socket that
 * still carries data (established, half-closed either way, connecting) it
 * asks the verdict connect (egress) or sk_lookup (ingress) would give
 * today, with the socket's own addresses, and destroys the socket when it
 * is now denied: the holder gets ECONNABORTED, the peer an RST. The
 * direction comes from sockops (MS_SK_PASSIVE / MS_SK_ACTIVE at
 * establish); a socket without it (no storage: established before
 * meshsplice, or storage was refused) is destroyed only when both
 * directions' verdicts deny, so that whichever it is, the sidecar that
 * judges it would have denied it too. bpf_sock_destroy() needs Linux >= 6.5; this object is
 * loaded on its own so that older kernels keep everything else (there, live
 * connections outlive a policy change; new ones are judged at once).
 *
 * It is a separate object for a second reason: it reads kernel structs
 * through minimal CO-RE views (below) rather than vmlinux.h's, so that the
 * object's BTF stays small and identical whatever directory it is built in.
 */
#include "common.h"

/* The states in which a connection still carries data one way or the
 * other (include/net/tcp_states.h): ESTABLISHED, SYN_SENT, FIN_WAIT1,
 * FIN_WAIT2 (the peer may still send) and CLOSE_WAIT (we may). */
#define TCP_ESTABLISHED_STATE 1
#define TCP_SYN_SENT_STATE    2
#define TCP_FIN_WAIT1_STATE   4
#define TCP_FIN_WAIT2_STATE   5
#define TCP_CLOSE_WAIT_STATE  8

static __always_inline int carries_data(unsigned char state)
{
	return state == TCP_ESTABLISHED_STATE || state == TCP_SYN_SENT_STATE ||
	       state == TCP_FIN_WAIT1_STATE || state == TCP_FIN_WAIT2_STATE ||
	       state == TCP_CLOSE_WAIT_STATE;
}

struct in6_addr___ms {
	union {
		__u32 u6_addr32[4];
	} in6_u;
} __attribute__((preserve_access_index));

struct sock_common___ms {
	__u32 skc_daddr;
	__u32 skc_rcv_saddr;
	__u16 skc_dport;
	__u16 skc_num;
	unsigned short skc_family;
	volatile unsigned char skc_state;
	struct in6_addr___ms skc_v6_daddr;
	struct in6_addr___ms skc_v6_rcv_saddr;
} __attribute__((preserve_access_index));

struct bpf_iter__tcp___ms {
	void *meta;
	struct sock_common___ms *sk_common;
} __attribute__((preserve_access_index));

extern int bpf_sock_destroy(struct sock_common___ms *sk) __ksym;

/* ingress_denies: an accepted socket, judged as sk_lookup judges a new
 * connection. */
static __always_inline int ingress_denies(__u64 netns, struct ms_pod *pod,
					  struct ms_addr *local, __u16 lport,
					  struct ms_addr *remote,
					  struct ms_denial *d)
{
	if (!sidecar_judges_inbound(netns, pod, lport, remote->ip,
				    from_self_established(netns, remote->ip)))
		return 0;
	return policy_denies(remote->ip, identity_of(remote->ip), local->ip,
			     lport, 0, d);
}

/* egress_denies: a connected socket, judged as connect judges a new one. */
static __always_inline int egress_denies(struct ms_pod *pod,
					 struct ms_addr *local,
					 struct ms_addr *remote, __u16 rport,
					 struct ms_denial *d)
{
	if (addr_is_loopback(remote->ip) || addr_is_passthrough(local->ip))
		return 0;
	return policy_denies(local->ip, pod->identity, remote->ip, rport, 1, d);
}

SEC("iter/tcp")
int ms_policy_teardown(struct bpf_iter__tcp___ms *ctx)
{
	struct sock_common___ms *skc = ctx->sk_common;
	struct ms_addr local, remote;
	struct ms_denial d = {};
	__u32 zero = 0, flags;
	struct ms_pod *pod;
	struct tcp_sock *tp;
	struct ms_sk *st;
	__u16 lport, rport;
	__u64 *netns;
	int reason;

	if (!skc || !carries_data(skc->skc_state))
		return 0;
	netns = bpf_map_lookup_elem(&ms_iter_netns, &zero);
	if (!netns)
		return 0;
	pod = bpf_map_lookup_elem(&ms_pods, netns);
	if (!pod)
		return 0;
	tp = bpf_skc_to_tcp_sock(skc);
	if (!tp)
		return 0;
	st = bpf_sk_storage_get(&ms_sk_state, tp, 0, 0);
	flags = st ? st->flags : 0;

	if (skc->skc_family == AF_INET) {
		addr_from_ip4(&local, skc->skc_rcv_saddr);
		addr_from_ip4(&remote, skc->skc_daddr);
	} else {
		local.ip[0] = skc->skc_v6_rcv_saddr.in6_u.u6_addr32[0];
		local.ip[1] = skc->skc_v6_rcv_saddr.in6_u.u6_addr32[1];
		local.ip[2] = skc->skc_v6_rcv_saddr.in6_u.u6_addr32[2];
		local.ip[3] = skc->skc_v6_rcv_saddr.in6_u.u6_addr32[3];
		remote.ip[0] = skc->skc_v6_daddr.in6_u.u6_addr32[0];
		remote.ip[1] = skc->skc_v6_daddr.in6_u.u6_addr32[1];
		remote.ip[2] = skc->skc_v6_daddr.in6_u.u6_addr32[2];
		remote.ip[3] = skc->skc_v6_daddr.in6_u.u6_addr32[3];
	}
	lport = skc->skc_num;
	rport = bpf_ntohs(skc->skc_dport);

	if (flags & MS_SK_PASSIVE) {
		reason =
		    ingress_denies(*netns, pod, &local, lport, &remote, &d);
	} else if (flags & MS_SK_ACTIVE) {
		reason = egress_denies(pod, &local, &remote, rport, &d);
	} else {
		/* Direction unknown: only when both verdicts deny. */
		reason =
		    ingress_denies(*netns, pod, &local, lport, &remote, &d);
		if (reason && !egress_denies(pod, &local, &remote, rport, &d))
			reason = 0;
	}
	if (!reason)
		return 0;
	if (bpf_sock_destroy(skc) == 0) {
		count(MS_C_POLICY_TORN_DOWN, 1);
		record_denial(&d, *netns, MS_DIR_TEARDOWN, reason);
	} else {
		count(MS_C_POLICY_TEARDOWN_FAILED, 1);
	}
	return 0;
}
