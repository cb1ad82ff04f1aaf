// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * teardown.c: close live connections that a policy change now forbids.
 *
 * The agent runs this iterator in each meshed pod's netns after a policy
 * change (the netns cookie in ms_iter_netns, as for ms_listener_iter). For
 * every established TCP socket it knows the direction of (sockops marks
 * sockets MS_SK_PASSIVE / MS_SK_ACTIVE at establish), it asks the same
 * verdict as connect (egress) or sk_lookup (ingress) would today, and
 * destroys the socket when it is now denied: the holder gets ECONNABORTED,
 * the peer an RST. bpf_sock_destroy() needs Linux >= 6.5; this object is
 * loaded on its own so that older kernels keep everything else (there, live
 * connections outlive a policy change; new ones are judged at once).
 *
 * It is a separate object for a second reason: it reads kernel structs
 * through minimal CO-RE views (below) rather than vmlinux.h's, so that the
 * object's BTF stays small and identical whatever directory it is built in.
 */
#include "common.h"

#define TCP_ESTABLISHED_STATE 1

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

	if (!skc || skc->skc_state != TCP_ESTABLISHED_STATE)
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
	if (!st)
		return 0;
	flags = st->flags;

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
		/* Accepted: judged as sk_lookup judges a new connection. */
		if (inbound_verdict(*netns, pod, lport, remote.ip) !=
		    MS_C_INBOUND_CAPTURED)
			return 0;
		reason = policy_denies(remote.ip, identity_of(remote.ip),
				       local.ip, lport, 0, &d);
	} else if (flags & MS_SK_ACTIVE) {
		/* Connected: judged as connect judges a new one. */
		if (addr_is_loopback(remote.ip))
			return 0;
		reason = policy_denies(local.ip, pod->identity, remote.ip,
				       rport, 1, &d);
	} else {
		return 0;
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
