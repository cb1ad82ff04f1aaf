// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * capture.c: sidecar capture without iptables.
 *
 *  - cgroup/connect4, cgroup/connect6: a meshed pod's outbound TCP connect
 *    is sent to its sidecar's outbound listener (127.0.0.1:15001 or
 *    [::1]:15001), and the proxy's own connect to its pod (istio-iptables'
 *    ISTIO_IN_REDIRECT) to its inbound listener, the original destination
 *    kept in socket storage;
 *  - cgroup/getsockopt: answers SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST on the
 *    sidecar's accepted sockets, so an unmodified Envoy finds that
 *    destination;
 *  - sk_lookup (one link per pod netns): inbound connections to the pod's IPs
 *    are handed to the sidecar's inbound listener (15006).
 *
 * Why sk_lookup for inbound, not tc or cgroup hooks: sk_lookup picks the
 * listening socket without rewriting a single header, so the accepted socket's
 * local address IS the original destination (getsockname and SO_ORIGINAL_DST
 * agree, nothing to remember per connection), no per-packet NAT state exists
 * to go stale, and it runs only on SYN (connection lookup), not per packet. A
 * tc program would have to DNAT every packet both ways and keep a table; the
 * cgroup hooks only see the sidecar's side. sk_lookup needs kernel >= 5.9.
 */
#include "common.h"

/* bound_source reads the address the socket was bound to before
 * connect() (zero when unbound), normalized (v4-mapped). */
static __always_inline void bound_source(struct bpf_sock *sk, struct ms_addr *a)
{
	__builtin_memset(a, 0, sizeof(*a));
	if (!sk)
		return;
	if (LOAD_U32(sk, struct bpf_sock, family) == AF_INET) {
		__u32 ip4 = LOAD_U32(sk, struct bpf_sock, src_ip4);

		if (ip4)
			addr_from_ip4(a, ip4);
	} else {
		a->ip[0] = LOAD_U32(sk, struct bpf_sock, src_ip6[0]);
		a->ip[1] = LOAD_U32(sk, struct bpf_sock, src_ip6[1]);
		a->ip[2] = LOAD_U32(sk, struct bpf_sock, src_ip6[2]);
		a->ip[3] = LOAD_U32(sk, struct bpf_sock, src_ip6[3]);
	}
}

static __always_inline int addr_is_zero(const __u32 *ip)
{
	return !(ip[0] | ip[1] | ip[2] | ip[3]);
}

#define CONNECT_PASS	0 /* leave the connect alone */
#define CONNECT_CAPTURE 1 /* rewrite the destination to the sidecar */
#define CONNECT_DENY	2 /* policy forbids it: EPERM at once */

/* istio-iptables' InboundTunnelPort: never hairpinned. */
#define MS_TUNNEL_PORT 15008

/*
 * proxy_hairpin: the proxy's own connect goes to its inbound port, as
 * istio-iptables' ISTIO_OUTPUT does for the proxy's lo traffic (the pod's
 * own addresses, loopback but 127.0.0.1 / ::1), e.g. Envoy sending an
 * outbound request to an endpoint that is its own pod:
 *   -o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m owner --uid-owner 1337
 *      -j ISTIO_IN_REDIRECT
 * after the excluded ports and "-o lo -s 127.0.0.6/32 -j RETURN". The gid
 * form comes after "-o lo -m owner ! --uid-owner 1337 -j RETURN", which
 * istio-iptables leaves out only when an include range is loopback.
 */
static __always_inline int proxy_hairpin(__u64 netns, const struct ms_pod *pod,
					 const __u32 *dst, __u16 port,
					 int passthrough, int proxy_uid)
{
	if (!(pod->flags & MS_POD_CAPTURE) || !(node_flags() & MS_NODE_CAPTURE))
		return 0;
	if (ipv6_off(pod, dst) || passthrough || port == MS_TUNNEL_PORT ||
	    addr_is_host_loopback(dst) || !via_lo(netns, dst))
		return 0;
	if (port_rule(netns, port, MS_PORT_OUT_EXCLUDE))
		return 0;
	return proxy_uid || (pod->flags & MS_POD_INCLUDE_LOOPBACK);
}

/* keep_orig keeps the original destination of a captured connect in the
 * socket's storage; sockops keys it for cgroup/getsockopt at establish. */
static __always_inline int keep_orig(struct bpf_sock_addr *ctx,
				     const __u32 *dst, __u16 port)
{
	struct ms_sk *st;

	st = bpf_sk_storage_get(&ms_sk_state, ctx->sk, 0,
				BPF_SK_STORAGE_GET_F_CREATE);
	if (!st) {
		/* Without the original destination the sidecar cannot
		 * forward it, and sending it around the sidecar would skip
		 * what Istio enforces there (mTLS, egress rules): the caller
		 * fails the connect, as iptables drops a SYN whose NAT entry
		 * cannot be made. Only kernel memory exhaustion gets here. */
		count(MS_C_CONNECT_NO_STORAGE, 1);
		return 0;
	}
	__builtin_memcpy(st->orig.ip, dst, 16);
	st->orig.port = port;
	st->flags |= MS_SK_HAS_ORIG;
	return 1;
}

/* capture_connect is the shared body of connect4 and connect6. dst is the
 * normalized (v4-mapped) destination. */
static __always_inline int capture_connect(struct bpf_sock_addr *ctx,
					   const __u32 *dst, __u16 port,
					   __u16 *sidecar_port)
{
	__u64 netns = bpf_get_netns_cookie(ctx);
	struct ms_denial d = {};
	struct ms_addr bound;
	struct ms_pod *pod;
	struct ms_sk *st;
	const __u32 *src;
	__u64 ugid;
	__u32 verdict;
	int reason, passthrough, proxy_uid, proxy_gid;

	pod = bpf_map_lookup_elem(&ms_pods, &netns);
	if (!pod)
		return CONNECT_PASS; /* not a registered pod: never touched */
	count(MS_C_CONNECT_MESHED, 1);
	ugid = bpf_get_current_uid_gid();

	/* Policy, for every process of the pod, the sidecar included: a
	 * compromised sidecar still cannot reach what policy forbids. Not
	 * for the sidecar's inbound passthrough (bound to 127.0.0.6 / ::6),
	 * which delivers a connection sk_lookup judged already. The source
	 * is the socket's own address, as teardown reads it later: the bound
	 * one, else the pod's address of the destination's family (the one
	 * the kernel picks for a pod with one address per family). */
	bound_source(ctx->sk, &bound);
	passthrough = addr_is_passthrough(bound.ip);
	src = bound.ip;
	if (addr_is_zero(src) || (addr_is_v4(src) && !src[3]))
		src = addr_is_v4(dst) ? pod->ip4.ip : pod->ip6.ip;
	if (!addr_is_loopback(dst) && !passthrough) {
		reason = policy_denies(src, pod->identity, dst, port, 1, &d);
		if (reason) {
			d.uid = (__u32)ugid;
			record_denial(&d, netns, MS_DIR_EGRESS, reason);
			count(MS_C_POLICY_EGRESS_DENIED, 1);
			return CONNECT_DENY;
		}
		if (d.policy_set)
			count(MS_C_POLICY_EGRESS_ALLOWED, 1);
	}

	proxy_uid = (__u32)ugid == pod->proxy_uid;
	proxy_gid = (__u32)(ugid >> 32) == pod->proxy_gid;
	if (proxy_uid || proxy_gid) {
		/* The proxy's own connection. Mark the socket so sockops knows
		 * whose it is: a cross-pod pair splices only proxy sockets. */
		st = bpf_sk_storage_get(&ms_sk_state, ctx->sk, 0,
					BPF_SK_STORAGE_GET_F_CREATE);
		if (st)
			st->flags |= MS_SK_PROXY;
		if (proxy_hairpin(netns, pod, dst, port, passthrough,
				  proxy_uid)) {
			if (!keep_orig(ctx, dst, port))
				return CONNECT_DENY;
			*sidecar_port = pod->inbound_port;
			count(MS_C_CONNECT_HAIRPIN, 1);
			return CONNECT_CAPTURE;
		}
		count((pod->flags & MS_POD_CAPTURE) ? MS_C_SKIP_PROXY
						    : MS_C_SKIP_CAPTURE_OFF,
		      1);
		return CONNECT_PASS;
	}

	/* "-o lo -s 127.0.0.6/32 -j RETURN" */
	verdict = passthrough && via_lo(netns, dst)
		      ? MS_C_SKIP_LOOPBACK
		      : outbound_verdict(netns, pod, dst, port);
	if (verdict != MS_C_CONNECT_CAPTURED) {
		count(verdict, 1);
		return CONNECT_PASS;
	}
	if (!keep_orig(ctx, dst, port))
		return CONNECT_DENY;
	*sidecar_port = pod->outbound_port;
	count(MS_C_CONNECT_CAPTURED, 1);
	return CONNECT_CAPTURE;
}

SEC("cgroup/connect4")
int ms_connect4(struct bpf_sock_addr *ctx)
{
	struct ms_addr dst;
	__u16 sidecar_port;

	if (ctx->type != SOCK_STREAM)
		return 1;
	addr_from_ip4(&dst, ctx->user_ip4);
	switch (capture_connect(ctx, dst.ip, bpf_ntohs((__u16)ctx->user_port),
				&sidecar_port)) {
	case CONNECT_DENY: return 0; /* EPERM, no packet sent */
	case CONNECT_CAPTURE:
		ctx->user_ip4 = bpf_htonl(0x7f000001);
		ctx->user_port = bpf_htons(sidecar_port);
	}
	return 1;
}

SEC("cgroup/connect6")
int ms_connect6(struct bpf_sock_addr *ctx)
{
	struct ms_addr dst;
	__u16 sidecar_port;
	__u32 w2, w3;
	int v4;

	if (ctx->type != SOCK_STREAM)
		return 1;
	/* A dual-stack socket connecting to ::ffff:a.b.c.d runs only this
	 * program, never connect4: the mapped form is our normal form. */
	dst.ip[0] = ctx->user_ip6[0];
	dst.ip[1] = ctx->user_ip6[1];
	dst.ip[2] = ctx->user_ip6[2];
	dst.ip[3] = ctx->user_ip6[3];
	switch (capture_connect(ctx, dst.ip, bpf_ntohs((__u16)ctx->user_port),
				&sidecar_port)) {
	case CONNECT_DENY: return 0; /* EPERM, no packet sent */
	case CONNECT_PASS: return 1;
	}
	/* One store per word, outside any branch: the verifier rejects the
	 * pointer arithmetic clang makes of branch-dependent ctx stores. */
	v4 = addr_is_v4(dst.ip);
	w2 = v4 ? bpf_htonl(0x0000ffff) : 0;
	w3 = v4 ? bpf_htonl(0x7f000001) : bpf_htonl(1);
	ctx->user_ip6[0] = 0;
	ctx->user_ip6[1] = 0;
	ctx->user_ip6[2] = w2;
	ctx->user_ip6[3] = w3;
	ctx->user_port = bpf_htons(sidecar_port);
	return 1;
}

/* sock_key_from_bpf_sock builds the key of a socket as it sees itself.
 * struct bpf_sock: src_port host order, dst_port big-endian 16 bit. */
static __always_inline void
sock_key_from_bpf_sock(struct ms_sock_key *k, struct bpf_sock *sk, __u64 netns)
{
#define SK(f) LOAD_U32(sk, struct bpf_sock, f)
	k->netns = netns;
	if (SK(family) == AF_INET) {
		addr_from_ip4((struct ms_addr *)k->local_ip, SK(src_ip4));
		addr_from_ip4((struct ms_addr *)k->remote_ip, SK(dst_ip4));
	} else {
		k->local_ip[0] = SK(src_ip6[0]);
		k->local_ip[1] = SK(src_ip6[1]);
		k->local_ip[2] = SK(src_ip6[2]);
		k->local_ip[3] = SK(src_ip6[3]);
		k->remote_ip[0] = SK(dst_ip6[0]);
		k->remote_ip[1] = SK(dst_ip6[1]);
		k->remote_ip[2] = SK(dst_ip6[2]);
		k->remote_ip[3] = SK(dst_ip6[3]);
	}
	k->local_port = (__u16)SK(src_port);
	k->remote_port = bpf_ntohs((__u16)SK(dst_port));
	k->role = 0;
#undef SK
}

/* kernel_answered_self: the kernel's (conntrack's) SO_ORIGINAL_DST answer is
 * the socket's own local port, which is what conntrack says for any tracked
 * connection nobody NATed: no answer at all for a sidecar. */
static __always_inline int kernel_answered_self(struct bpf_sockopt *ctx,
						const struct ms_sock_key *key)
{
	void *optval = ctx->optval, *end = ctx->optval_end;

	if (ctx->level == SOL_IP) {
		struct sockaddr_in *sa = optval;

		if ((void *)(sa + 1) > end)
			return 1;
		return sa->sin_port == bpf_htons(key->local_port);
	}
	struct sockaddr_in6 *sa6 = optval;

	if ((void *)(sa6 + 1) > end)
		return 1;
	return sa6->sin6_port == bpf_htons(key->local_port);
}

/*
 * ms_getsockopt answers SO_ORIGINAL_DST (IP6T_SO_ORIGINAL_DST) for a meshed
 * pod's sockets, in this order:
 *  1. the destination stored at a captured connect (ms_orig_dst), even when
 *     the kernel answered: conntrack answers for every tracked connection,
 *     and for an un-NATed one (capture by connect4) it names the sidecar's
 *     own listener;
 *  2. the kernel's answer when it names something else than the socket's
 *     own port: the pod is under iptables REDIRECT (capture disabled);
 *  3. on a socket accepted by the sidecar's outbound port, or by its
 *     inbound port on loopback (the proxy's own hairpin, see capture_connect),
 *     nothing: the stored destination is gone (evicted, or never stored).
 *     Fail with ENOENT (Envoy closes the connection) rather than name the
 *     sidecar itself;
 *  4. otherwise the local address: sk_lookup handed the connection to the
 *     sidecar without rewriting it, so the local address is the original
 *     destination.
 */
SEC("cgroup/getsockopt")
int ms_getsockopt(struct bpf_sockopt *ctx)
{
	struct ms_sock_key key = {};
	struct ms_orig local, *orig;
	struct ms_pod *pod;
	struct bpf_sock *sk;
	__u64 netns;
	void *optval, *end;
	int level = ctx->level;

	if (ctx->optname != SO_ORIGINAL_DST ||
	    (level != SOL_IP && level != SOL_IPV6))
		return 1;
	sk = ctx->sk;
	if (!sk)
		return 1;
	netns = bpf_get_netns_cookie(ctx);
	pod = bpf_map_lookup_elem(&ms_pods, &netns);
	if (!pod)
		return 1;

	sock_key_from_bpf_sock(&key, sk, netns);
	orig = bpf_map_lookup_elem(&ms_orig_dst, &key);
	if (orig) {
		count(MS_C_ORIG_DST_OUTBOUND, 1);
	} else if (ctx->retval == 0 && !kernel_answered_self(ctx, &key)) {
		/* conntrack undid a NAT: the pod is still under iptables. */
		count(MS_C_ORIG_DST_KERNEL, 1);
		return 1;
	} else if (key.local_port == pod->outbound_port ||
		   (key.local_port == pod->inbound_port &&
		    addr_is_loopback(key.local_ip))) {
		count(MS_C_ORIG_DST_MISSING, 1);
		ctx->optlen = 0;
		ctx->retval = -ENOENT;
		return 1;
	} else {
		/* Not a captured connect: an inbound connection that
		 * sk_lookup handed to the sidecar keeps its destination as
		 * the local address. */
		__builtin_memcpy(local.ip, key.local_ip, 16);
		local.port = key.local_port;
		orig = &local;
		count(MS_C_ORIG_DST_INBOUND, 1);
	}

	optval = ctx->optval;
	end = ctx->optval_end;
	if (level == SOL_IP) {
		struct sockaddr_in *sa = optval;

		if (!addr_is_v4(orig->ip))
			return 1; /* an IPv6 destination has no v4 answer */
		if ((void *)(sa + 1) > end) {
			count(MS_C_ORIG_DST_SHORT_BUF, 1);
			return 1;
		}
		sa->sin_family = AF_INET;
		sa->sin_port = bpf_htons(orig->port);
		sa->sin_addr.s_addr = orig->ip[3];
		__builtin_memset(sa->__pad, 0, sizeof(sa->__pad));
		ctx->optlen = sizeof(*sa);
	} else {
		struct sockaddr_in6 *sa6 = optval;

		if ((void *)(sa6 + 1) > end) {
			count(MS_C_ORIG_DST_SHORT_BUF, 1);
			return 1;
		}
		sa6->sin6_family = AF_INET6;
		sa6->sin6_port = bpf_htons(orig->port);
		sa6->sin6_flowinfo = 0;
		sa6->sin6_addr.in6_u.u6_addr32[0] = orig->ip[0];
		sa6->sin6_addr.in6_u.u6_addr32[1] = orig->ip[1];
		sa6->sin6_addr.in6_u.u6_addr32[2] = orig->ip[2];
		sa6->sin6_addr.in6_u.u6_addr32[3] = orig->ip[3];
		sa6->sin6_scope_id = 0;
		ctx->optlen = sizeof(*sa6);
	}
	ctx->retval = 0;
	return 1;
}

static __always_inline int assign_listener(struct bpf_sk_lookup *ctx,
					   const struct ms_pod *pod,
					   __u32 family)
{
	__u32 idx = listener_index(pod, family);
	struct bpf_sock *sk;
	long err;

	sk = bpf_map_lookup_elem(&ms_listeners, &idx);
	if (!sk)
		return -1;
	/* A slot outlives nothing: the agent clears a removed pod's slots and
	 * a closing listener leaves the map. Still, never hand a connection
	 * to a socket that is not the sidecar's inbound port. */
	if (sk->src_port != pod->inbound_port) {
		bpf_sk_release(sk);
		return -1;
	}
	err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	return err ? -2 : 0;
}

SEC("sk_lookup")
int ms_sk_lookup(struct bpf_sk_lookup *ctx)
{
	struct ms_denial d = {};
	struct ms_sock_key self = {};
	struct ms_addr dst, src;
	struct ms_pod *pod;
	__u64 *netns;
	__u32 verdict;
	__u16 port;
	int err, reason, from_self;

	if (ctx->protocol != IPPROTO_TCP)
		return SK_PASS;
#define LK(f) LOAD_U32(ctx, struct bpf_sk_lookup, f)
	if (LK(family) == AF_INET) {
		addr_from_ip4(&dst, LK(local_ip4));
		addr_from_ip4(&src, LK(remote_ip4));
	} else {
		dst.ip[0] = LK(local_ip6[0]);
		dst.ip[1] = LK(local_ip6[1]);
		dst.ip[2] = LK(local_ip6[2]);
		dst.ip[3] = LK(local_ip6[3]);
		src.ip[0] = LK(remote_ip6[0]);
		src.ip[1] = LK(remote_ip6[1]);
		src.ip[2] = LK(remote_ip6[2]);
		src.ip[3] = LK(remote_ip6[3]);
	}
#undef LK
	/* Only the pod's own addresses are captured; loopback never is, as
	 * with Istio's ISTIO_INBOUND (nat PREROUTING does not see what the
	 * pod sends itself). */
	netns = bpf_map_lookup_elem(&ms_pod_ips, &dst);
	if (!netns)
		return SK_PASS;
	pod = bpf_map_lookup_elem(&ms_pods, netns);
	if (!pod)
		return SK_PASS;
	count(MS_C_INBOUND_MESHED, 1);

	port = (__u16)ctx->local_port;
	/* Did the pod make this connection itself, over lo? Only sockops
	 * can say (ms_self_syn): a source address proves nothing, since an
	 * IPv6 SYN from ::6 or from the pod's own address can arrive on
	 * eth0, and ingress_ifindex names eth0 for a pod calling its own IP
	 * too. */
	self.netns = *netns;
	__builtin_memcpy(self.local_ip, dst.ip, 16);
	__builtin_memcpy(self.remote_ip, src.ip, 16);
	self.local_port = port;
	self.remote_port = bpf_ntohs(ctx->remote_port);
	from_self = bpf_map_lookup_elem(&ms_self_syn, &self) != NULL;
	/* Policy, for any source, meshed or not, local or remote: judged by
	 * its identity (the IP's workload; 0 if none). RST at once. Only
	 * where the pod's sidecar would judge it (not its own ports, excluded
	 * ports, its passthrough to the app), whether meshsplice captures the
	 * pod or Istio's iptables do. */
	if (sidecar_judges_inbound(*netns, pod, port, src.ip, from_self)) {
		reason = policy_denies(src.ip, identity_of(src.ip), dst.ip,
				       port, 0, &d);
		if (reason) {
			record_denial(&d, *netns, MS_DIR_INGRESS, reason);
			count(MS_C_POLICY_INGRESS_DENIED, 1);
			return SK_DROP;
		}
		if (d.policy_set)
			count(MS_C_POLICY_INGRESS_ALLOWED, 1);
	}
	verdict = inbound_verdict_from(*netns, pod, port, src.ip, from_self);
	if (verdict != MS_C_INBOUND_CAPTURED) {
		count(verdict, 1);
		return SK_PASS;
	}

	err = assign_listener(ctx, pod, ctx->family);
	if (err && ctx->family == AF_INET)
		/* A dual-stack [::] listener takes IPv4 too. */
		err = assign_listener(ctx, pod, AF_INET6);
	if (err == -1) {
		/* The sidecar is not listening (yet, or it crashed). Refuse,
		 * as Istio's iptables REDIRECT to a closed 15006 does: letting
		 * the connection reach the app would bypass the sidecar. */
		count(MS_C_INBOUND_NO_LISTENER, 1);
		return SK_DROP;
	}
	if (err) {
		count(MS_C_INBOUND_ASSIGN_FAILED, 1);
		return SK_DROP;
	}
	count(MS_C_INBOUND_CAPTURED, 1);
	return SK_PASS;
}

#define TCP_LISTEN_STATE 10

/* Minimal CO-RE views of the kernel types the iterator reads. Using these
 * rather than vmlinux.h's keeps the object's BTF small; the full graph that
 * struct sock_common drags in is emitted by clang in an order that changes
 * with the build directory, which would make check-generated fail on any
 * other checkout. The ___ms suffix is dropped when relocating. */
struct sock_common___ms {
	unsigned short skc_family;
	volatile unsigned char skc_state;
	__u16 skc_num;
} __attribute__((preserve_access_index));

struct bpf_iter__tcp___ms {
	void *meta;
	struct sock_common___ms *sk_common;
} __attribute__((preserve_access_index));

/*
 * ms_listener_iter walks the TCP sockets of the netns of the thread that
 * runs it and puts the sidecar's inbound listeners of the pod into
 * ms_listeners, for sk_lookup. The agent runs it when a pod is registered
 * and when sockops reports a new listener (ms_events).
 */
SEC("iter/tcp")
int ms_listener_iter(struct bpf_iter__tcp___ms *ctx)
{
	struct sock_common___ms *skc = ctx->sk_common;
	struct tcp_sock *tp;
	struct ms_pod *pod;
	__u32 zero = 0, idx;
	__u64 *netns;

	if (!skc || skc->skc_state != TCP_LISTEN_STATE)
		return 0;
	netns = bpf_map_lookup_elem(&ms_iter_netns, &zero);
	if (!netns)
		return 0;
	pod = bpf_map_lookup_elem(&ms_pods, netns);
	if (!pod || skc->skc_num != pod->inbound_port)
		return 0;
	tp = bpf_skc_to_tcp_sock(skc);
	if (!tp)
		return 0;
	idx = listener_index(pod, skc->skc_family);
	if (bpf_map_update_elem(&ms_listeners, &idx, tp, BPF_ANY) == 0)
		count(MS_C_LISTENER_REGISTERED, 1);
	else
		/* e.g. an MPTCP listener: its TCP subflow listener has a ULP,
		 * which a sockmap refuses. */
		count(MS_C_LISTENER_REFUSED, 1);
	return 0;
}
