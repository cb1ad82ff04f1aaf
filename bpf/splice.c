// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * splice.c: socket-to-socket data path between an app and its sidecar, and
 * between two sidecars on the same node.
 *
 * sockops sees every TCP socket of the cgroup. At establish it decides the
 * socket's role (app or proxy) and its peer's, from the 4-tuple and the pod
 * settings alone, the same way on both ends, and adds the socket to ms_socks
 * under (netns, 4-tuple, role). sk_msg then redirects each send into the
 * peer's ingress queue.
 *
 * Ordering. Data reaches a receiver either through its TCP receive queue or
 * through its psock ingress queue, and tcp_bpf_recvmsg() drains the psock
 * queue first. Interleaving the two paths in one direction would therefore
 * reorder the stream. A redirect can miss its peer: the peer is not in the
 * map yet (the client's first send races the server's PASSIVE_ESTABLISHED on
 * the other CPU, which is the "few misses per 45k sends" a probe saw, at the
 * start of a connection) or not any more (closing). On a miss the sender
 * falls back to TCP FOR THE REST OF THE CONNECTION (MS_SK_TX_DOWN). A
 * direction's bytes are then "redirected* then TCP*", and since the psock
 * queue is drained first the receiver reads them in order. The bad order,
 * "TCP then redirected", cannot happen: a socket starts redirecting at its
 * first send or never, and after backpressure (below) it redirects again
 * only once the receiving application has read every TCP byte.
 *
 * The application traps. A socket in a sockmap gets a psock, and that changes
 * what its reader sees: splice(2) reads only the TCP receive queue, so it
 * never sees redirected data (readers.c refuses or detects such reads, and
 * a pod where one was detected is not spliced any more: ms_splice_readers);
 * and ioctl(FIONREAD) on a psock'd socket counts
 * only the psock queue (tcp_bpf_ioctl), so data that arrives over TCP reads
 * as 0 bytes (measured on 6.18 by e2e TestSpliceAndFionreadReaders; older
 * kernels also got redirected data wrong). Envoy does neither; applications
 * may (Go's io.Copy between two TCP connections splices; Java's available()
 * is FIONREAD). So by default a socket joins the splice map only when BOTH
 * ends are sidecar sockets: sidecar <-> sidecar is spliced and an app's
 * socket never gets a psock. A pod may opt in with meshsplice.io/app-splice
 * (MS_POD_APP_SPLICE) when its app is known to do neither: then app <->
 * sidecar is spliced both ways too.
 *
 * Pods under Istio's own iptables (MS_POD_IPTABLES): their sidecars are
 * paired through the server's REDIRECT, which sockops does not see
 * (iptmode.h).
 *
 * Both ends must agree. A socket joins only if its own end and its peer's
 * end may be spliced, under a key carrying its own role; a sender looks its
 * peer up under the role it computed for it. Where the two ends would judge
 * differently (a pod's settings changed during the handshake) the lookup
 * misses and the stream falls back to TCP instead of landing in a socket
 * that did not agree.
 */
#include "common.h"
#include "iptmode.h"
#include <bpf/bpf_core_read.h>

/*
 * Backpressure. bpf_tcp_ingress charges redirected bytes to the protocol's
 * memory, not to the receiver's buffer: a receiver that stops reading would
 * let its peer queue without limit (measured: a 64 MiB push all sat in the
 * kernel), where TCP stops a writer at the receiver's window. So a sender
 * looks at what its peer holds unread (psock->msg_tot_len) and, when this
 * send would take it past MS_MAX_UNREAD, goes on over TCP
 * (MS_SK_TX_BACKOFF): TCP's window then holds the writer back, and the
 * bytes stay in order (see Ordering). An empty queue takes one message
 * whatever its size (the sender's buffer bounds it), so a big write is
 * never pushed to TCP for its size alone. The bound is fixed, not the
 * receiver's sk_rcvbuf: the psock queue is not charged to sk_rcvbuf, so
 * after a fallback the receiver's TCP window opens in full beside it, and
 * autotuning grows sk_rcvbuf up to tcp_rmem's maximum (32 MiB here) as soon
 * as TCP bytes flow and are read: a bound that followed it held 8 MiB in a
 * paused reader with SO_RCVBUF 4 MiB and, intermittently, 34 MiB in a
 * relaying sidecar (e2e TestNonReadingReceiverIsBounded). A spliced hop
 * thus holds at most what TCP would, plus MS_MAX_UNREAD and a message.
 * It goes back to redirecting only when the TCP bytes are all gone: every
 * one it sent acknowledged (snd_una == write_seq, checked under its own
 * lock, so none is in flight) and read by the receiving application
 * (copied_seq == rcv_nxt). Nothing can then overtake them. Kernel structs
 * are read through minimal CO-RE views (see teardown.c for why not
 * vmlinux.h's).
 */
#define MS_MAX_UNREAD (2 << 20)
/* include/net/sock.h SK_USER_DATA_PTRMASK: sk_user_data's low bits are
 * flags. */
#define MS_SK_USER_DATA_PTRMASK (~7UL)

struct sock___bp {
	void *sk_user_data;
} __attribute__((preserve_access_index));

struct sk_psock___bp {
	__u32 msg_tot_len;
} __attribute__((preserve_access_index));

struct tcp_sock___bp {
	__u32 rcv_nxt;
	__u32 copied_seq;
	__u32 snd_una;
	__u32 write_seq;
} __attribute__((preserve_access_index));

/* Where each spliced socket's struct sock is, by its ms_socks key, for its
 * peer's sender (a sockhash lookup from sk_msg takes a reference that
 * sk_msg may not release). Deleted on close (STATE_CB); an address read
 * after its socket is gone can only make a sender fall back to TCP, which
 * a redirect to a closed peer does anyway. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MS_MAX_SOCKS);
	__type(key, struct ms_sock_key);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ms_sk_addrs SEC(".maps");

static __always_inline void
key_from_skops(struct ms_sock_key *k, struct bpf_sock_ops *skops, __u64 netns)
{
#define SKOPS(f) LOAD_U32(skops, struct bpf_sock_ops, f)
	k->netns = netns;
	if (SKOPS(family) == AF_INET) {
		addr_from_ip4((struct ms_addr *)k->local_ip, SKOPS(local_ip4));
		addr_from_ip4((struct ms_addr *)k->remote_ip,
			      SKOPS(remote_ip4));
	} else {
		/* AF_INET6, v4-mapped included: the ip6 fields hold the
		 * mapped form, our normal form. */
		k->local_ip[0] = SKOPS(local_ip6[0]);
		k->local_ip[1] = SKOPS(local_ip6[1]);
		k->local_ip[2] = SKOPS(local_ip6[2]);
		k->local_ip[3] = SKOPS(local_ip6[3]);
		k->remote_ip[0] = SKOPS(remote_ip6[0]);
		k->remote_ip[1] = SKOPS(remote_ip6[1]);
		k->remote_ip[2] = SKOPS(remote_ip6[2]);
		k->remote_ip[3] = SKOPS(remote_ip6[3]);
	}
	/* local_port is host order; remote_port big-endian in a u32. */
	k->local_port = (__u16)SKOPS(local_port);
	k->remote_port = (__u16)bpf_ntohl(SKOPS(remote_port));
	k->role = 0;
#undef SKOPS
}

static __always_inline void
reverse_key(struct ms_sock_key *dst, const struct ms_sock_key *src, __u64 netns)
{
	dst->netns = netns;
	__builtin_memcpy(dst->local_ip, src->remote_ip, 16);
	__builtin_memcpy(dst->remote_ip, src->local_ip, 16);
	dst->local_port = src->remote_port;
	dst->remote_port = src->local_port;
	dst->role = 0;
}

/*
 * A sidecar started listening on its inbound port. sk_lookup needs that
 * socket in ms_listeners, but sockops cannot insert a listening socket into
 * a sockmap on this kernel (bpf_sock_map_update at TCP_LISTEN_CB returns
 * -EOPNOTSUPP on 6.18, measured). So tell the agent, which inserts it with
 * the ms_listener_iter iterator (capture.c) run inside the pod's netns.
 */
static __always_inline void listener_started(struct bpf_sock_ops *skops)
{
	__u64 netns = bpf_get_netns_cookie(skops);
	struct ms_pod *pod;

	pod = bpf_map_lookup_elem(&ms_pods, &netns);
	if (!pod || skops->local_port != pod->inbound_port)
		return;
	/* A lost event is counted; the agent's periodic listener pass finds
	 * the listener anyway (datapath ResyncListeners). */
	if (bpf_ringbuf_output(&ms_events, &netns, sizeof(netns), 0))
		count(MS_C_LISTENER_EVENT_LOST, 1);
	else
		count(MS_C_LISTENER_STARTED, 1);
}

/*
 * roles works out this socket's role and its peer's. Both ends run it and
 * reach the same answer for the same connection:
 *  - inside a pod (remote is loopback): app -> sidecar outbound listener,
 *    and the sidecar's inbound passthrough from 127.0.0.6 / ::6 to the app;
 *  - across pods (remote is a pod IP on this node, the own pod's included):
 *    the accepting side is the sidecar when the destination's inbound
 *    capture says so; the connecting side is the sidecar when connect() ran
 *    as the proxy uid (known on its own socket), and is seen as the sidecar
 *    by its peer when that pod's outbound capture would have caught an app's
 *    connect to this destination, so only the proxy could have made it.
 * Returns 0 when the pair is not one meshsplice splices.
 */
static __always_inline int roles(struct bpf_sock_ops *skops,
				 const struct ms_sock_key *k, __u64 netns,
				 const struct ms_pod *pod, __u64 peer_netns,
				 const struct ms_pod *peer_pod, int loopback,
				 __u32 *self, __u32 *peer)
{
	int active = skops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB;
	struct ms_sk *st;

	if (loopback) {
		if (active && k->remote_port == pod->outbound_port) {
			*self = MS_ROLE_APP, *peer = MS_ROLE_PROXY;
			return 1;
		}
		if (!active && k->local_port == pod->outbound_port) {
			*self = MS_ROLE_PROXY, *peer = MS_ROLE_APP;
			return 1;
		}
		if (active && addr_is_passthrough(k->local_ip)) {
			*self = MS_ROLE_PROXY, *peer = MS_ROLE_APP;
			return 1;
		}
		if (!active && addr_is_passthrough(k->remote_ip)) {
			*self = MS_ROLE_APP, *peer = MS_ROLE_PROXY;
			return 1;
		}
		return 0;
	}

	if (active) {
		struct bpf_sock *sk = skops->sk;

		st = sk ? bpf_sk_storage_get(&ms_sk_state, sk, 0, 0) : NULL;
		*self = (st && (st->flags & MS_SK_PROXY)) ? MS_ROLE_PROXY
							  : MS_ROLE_APP;
		*peer = inbound_verdict(peer_netns, peer_pod, k->remote_port,
					k->local_ip) == MS_C_INBOUND_CAPTURED
			    ? MS_ROLE_PROXY
			    : MS_ROLE_APP;
	} else {
		*self = inbound_verdict(netns, pod, k->local_port,
					k->remote_ip) == MS_C_INBOUND_CAPTURED
			    ? MS_ROLE_PROXY
			    : MS_ROLE_APP;
		*peer = outbound_verdict(peer_netns, peer_pod, k->local_ip,
					 k->local_port) == MS_C_CONNECT_CAPTURED
			    ? MS_ROLE_PROXY
			    : MS_ROLE_APP;
	}
	return 1;
}

/* spliceable says whether a socket of this role in this pod may join the
 * splice map: sidecar sockets always, app sockets only with app-splice and
 * unless the node switch turned it off. */
static __always_inline int spliceable(__u32 role, const struct ms_pod *pod)
{
	return role == MS_ROLE_PROXY ||
	       (role == MS_ROLE_APP && (pod->flags & MS_POD_APP_SPLICE) &&
		!(node_flags() & MS_NODE_NO_APP_SPLICE));
}

static __always_inline void established(struct bpf_sock_ops *skops)
{
	__u64 netns = bpf_get_netns_cookie(skops);
	struct ms_pod *pod, *peer_pod;
	struct ms_sock_key k = {}, peer;
	__u32 self_role, peer_role;
	__u64 peer_netns, *pn, skaddr;
	struct ms_sk *st;
	int loopback, nat;

	struct bpf_sock *sk = skops->sk;

	pod = bpf_map_lookup_elem(&ms_pods, &netns);
	if (!pod || !sk)
		return; /* not a registered pod: never touched */
	key_from_skops(&k, skops, netns);

	/* Remember the direction: a policy change judges live connections
	 * as connect (active) or sk_lookup (passive) would (teardown.c). */
	st = bpf_sk_storage_get(&ms_sk_state, sk, 0,
				BPF_SK_STORAGE_GET_F_CREATE);
	if (st)
		st->flags |= skops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB
				 ? MS_SK_ACTIVE
				 : MS_SK_PASSIVE;
	if (st && (st->flags & MS_SK_HAS_ORIG) &&
	    skops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) {
		/* A captured connect: key its original destination by the
		 * tuple the sidecar's accepted socket will see, for
		 * cgroup/getsockopt. Established happens on the SYN-ACK,
		 * before the sidecar can accept, so the entry is there in
		 * time. Deleted on close (STATE_CB). */
		struct ms_sock_key ok;

		reverse_key(&ok, &k, netns);
		if (bpf_map_update_elem(&ms_orig_dst, &ok, &st->orig,
					BPF_ANY) == 0) {
			st->flags |= MS_SK_ORIG_KEYED;
			bpf_sock_ops_cb_flags_set(
			    skops, skops->bpf_sock_ops_cb_flags |
				       BPF_SOCK_OPS_STATE_CB_FLAG);
			count(MS_C_ORIG_DST_STORED, 1);
		}
	}

	if (!(pod->flags & MS_POD_SPLICE) || !(node_flags() & MS_NODE_SPLICE)) {
		count(MS_C_SOCK_SKIP_SPLICE_OFF, 1);
		return;
	}

	/* The app's end of the sidecar's inbound passthrough sees ::6 (not a
	 * loopback address) or 127.0.0.6 as its peer: same netns too. */
	loopback =
	    addr_is_loopback(k.remote_ip) || addr_is_passthrough(k.remote_ip);
	if (loopback) {
		peer_netns = netns;
		peer_pod = pod;
	} else {
		pn = bpf_map_lookup_elem(&ms_pod_ips, k.remote_ip);
		if (!pn) {
			count(MS_C_SOCK_SKIP_PEER_UNKNOWN, 1);
			return;
		}
		peer_netns = *pn;
		peer_pod = bpf_map_lookup_elem(&ms_pods, &peer_netns);
		if (!peer_pod) {
			count(MS_C_SOCK_SKIP_PEER_UNKNOWN, 1);
			return;
		}
		if (!(peer_pod->flags & MS_POD_SPLICE)) {
			count(MS_C_SOCK_SKIP_SPLICE_OFF, 1);
			return;
		}
	}

	/* A pod where a process read a spliced socket with splice(2), and no
	 * guard refused it (readers.c): its new connections stay TCP. */
	if (bpf_map_lookup_elem(&ms_splice_readers, &netns) ||
	    bpf_map_lookup_elem(&ms_splice_readers, &peer_netns)) {
		count(MS_C_SOCK_SKIP_SPLICE_READER, 1);
		return;
	}

	/* A pod under Istio's iptables at either end (iptmode.h). */
	reverse_key(&peer, &k, peer_netns);
	nat = loopback ? MS_NAT_NONE
		       : iptables_pair(skops, &k, netns, pod, peer_netns,
				       peer_pod, &peer, &self_role);
	if (nat == MS_NAT_SKIP)
		return;
	if (nat == MS_NAT_NONE) {
		if (!roles(skops, &k, netns, pod, peer_netns, peer_pod,
			   loopback, &self_role, &peer_role)) {
			count(MS_C_SOCK_SKIP_ROLE_UNKNOWN, 1);
			return;
		}
		peer.role = peer_role;
	}
	/* TCP Fast Open moves data before establish; that data sits in the
	 * TCP queue and later redirected data would overtake it. */
	if (skops->bytes_received > 0 || skops->data_segs_out > 0) {
		count(MS_C_SOCK_SKIP_EARLY_DATA, 1);
		return;
	}

	if (!spliceable(self_role, pod) || !spliceable(peer.role, peer_pod)) {
		count(MS_C_SOCK_SKIP_APP, 1);
		return;
	}

	st = bpf_sk_storage_get(&ms_sk_state, sk, 0,
				BPF_SK_STORAGE_GET_F_CREATE);
	if (!st) {
		count(MS_C_SOCK_INSERT_FAILED, 1);
		return;
	}
	st->peer = peer;
	st->flags |= MS_SK_TX_SPLICE;

	k.role = self_role;
	if (bpf_sock_hash_update(skops, &ms_socks, &k, BPF_NOEXIST) != 0) {
		st->flags &= ~MS_SK_TX_SPLICE;
		count(MS_C_SOCK_INSERT_FAILED, 1);
		return;
	}
	count(MS_C_SOCK_INSERTED, 1);
	iptables_keyed(skops, st, &k, peer_pod);
	skaddr = (__u64)sk;
	if (bpf_map_update_elem(&ms_sk_addrs, &k, &skaddr, BPF_ANY) == 0) {
		st->flags |= MS_SK_ADDR_KEYED;
		bpf_sock_ops_cb_flags_set(skops,
					  skops->bpf_sock_ops_cb_flags |
					      BPF_SOCK_OPS_STATE_CB_FLAG);
	}
}

static __always_inline void closed(struct bpf_sock_ops *skops)
{
	__u64 netns = bpf_get_netns_cookie(skops);
	struct ms_sock_key k = {}, ok;
	struct ms_sk *st;

	struct bpf_sock *sk = skops->sk;

	if (!sk)
		return;
	st = bpf_sk_storage_get(&ms_sk_state, sk, 0, 0);
	if (!st || !(st->flags &
		     (MS_SK_ORIG_KEYED | MS_SK_ADDR_KEYED | MS_SK_NAT_KEYED)))
		return;
	iptables_closed(st);
	key_from_skops(&k, skops, netns);
	if (st->flags & MS_SK_ADDR_KEYED) {
		/* Its role is not kept: no other live socket has this key
		 * under the other role. */
		k.role = MS_ROLE_APP;
		bpf_map_delete_elem(&ms_sk_addrs, &k);
		k.role = MS_ROLE_PROXY;
		bpf_map_delete_elem(&ms_sk_addrs, &k);
		k.role = 0;
		st->flags &= ~MS_SK_ADDR_KEYED;
	}
	if (!(st->flags & MS_SK_ORIG_KEYED))
		return;
	reverse_key(&ok, &k, netns);
	if (bpf_map_delete_elem(&ms_orig_dst, &ok) != 0)
		count(MS_C_ORIG_DST_EVICTED, 1); /* LRU pressure */
	st->flags &= ~MS_SK_ORIG_KEYED;
}

/* A connect to one of the pod's own addresses: tell sk_lookup, before the
 * SYN leaves, that the pod itself makes it (ms_self_syn, capture.c). */
static __always_inline void self_connect(struct bpf_sock_ops *skops)
{
	__u64 netns = bpf_get_netns_cookie(skops);
	struct ms_sock_key k = {}, in;
	__u8 one = 1;

	if (!bpf_map_lookup_elem(&ms_pods, &netns))
		return;
	key_from_skops(&k, skops, netns);
	if (!addr_is_own(netns, k.remote_ip))
		return;
	reverse_key(&in, &k, netns);
	bpf_map_update_elem(&ms_self_syn, &in, &one, BPF_ANY);
}

SEC("sockops")
int ms_sockops(struct bpf_sock_ops *skops)
{
	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB: self_connect(skops); break;
	case BPF_SOCK_OPS_TCP_LISTEN_CB: listener_started(skops); break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB: established(skops); break;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] == BPF_TCP_CLOSE)
			closed(skops);
		break;
	}
	return 1;
}

/* peer_full says whether size more bytes would take the peer past what it
 * may hold unread (Backpressure, above). A peer not found is not full: the
 * redirect then misses and falls back on its own. */
static __always_inline int peer_full(struct ms_sk *st, __u32 size)
{
	__u64 *addr = bpf_map_lookup_elem(&ms_sk_addrs, &st->peer);
	struct sock___bp *sk;
	__u32 unread;
	__u64 ud;

	if (!addr)
		return 0;
	sk = (void *)*addr;
	ud = (__u64)BPF_CORE_READ(sk, sk_user_data) & MS_SK_USER_DATA_PTRMASK;
	if (!ud)
		return 0;
	unread = BPF_CORE_READ((struct sk_psock___bp *)ud, msg_tot_len);
	return unread && (__u64)unread + size > MS_MAX_UNREAD;
}

/* tcp_drained says whether every byte this socket sent over TCP has been
 * read by the peer's application (Backpressure, above). */
static __always_inline int tcp_drained(struct bpf_sock *sk,
				       const struct ms_sk *st)
{
	struct tcp_sock___bp *me, *peer;
	struct tcp_sock *tp;
	__u64 *addr;

	tp = bpf_skc_to_tcp_sock(sk);
	if (!tp)
		return 0;
	me = (void *)tp;
	if (me->snd_una != me->write_seq)
		return 0;
	addr = bpf_map_lookup_elem(&ms_sk_addrs, &st->peer);
	if (!addr)
		return 0;
	peer = (void *)*addr;
	return BPF_CORE_READ(peer, copied_seq) == BPF_CORE_READ(peer, rcv_nxt);
}

SEC("sk_msg")
int ms_sk_msg(struct sk_msg_md *msg)
{
	struct bpf_sock *sk = msg->sk;
	__u32 size = msg->size;
	struct ms_sk *st;
	__u32 first;

	st = sk ? bpf_sk_storage_get(&ms_sk_state, sk, 0, 0) : NULL;
	if (!st || !(st->flags & MS_SK_TX_SPLICE)) {
		count(MS_C_MSG_PASS, 1);
		count(MS_C_BYTES_PASS, size);
		return SK_PASS;
	}
	/* sk_msg runs under the sending socket's lock: no other writer. */
	first = !(st->flags & MS_SK_SENT);
	st->flags |= MS_SK_SENT;
	if (!(st->flags & MS_SK_TX_DOWN) && (node_flags() & MS_NODE_DRAIN)) {
		/* Detaching: the rest of every stream goes over TCP, after
		 * what was redirected (same order argument as a miss). */
		st->flags |= MS_SK_TX_DOWN;
		count(MS_C_MSG_DRAIN, 1);
	}
	if (st->flags & MS_SK_TX_DOWN) {
		count(MS_C_MSG_AFTER_MISS, 1);
		count(MS_C_BYTES_AFTER_MISS, size);
		return SK_PASS;
	}
	if ((st->flags & MS_SK_TX_BACKOFF) && tcp_drained(sk, st)) {
		st->flags &= ~MS_SK_TX_BACKOFF;
		count(MS_C_MSG_RESUMED, 1);
	}
	if (!(st->flags & MS_SK_TX_BACKOFF) && peer_full(st, size)) {
		st->flags |= MS_SK_TX_BACKOFF;
		count(MS_C_MSG_BACKPRESSURE, 1);
	}
	if (st->flags & MS_SK_TX_BACKOFF) {
		count(MS_C_MSG_AFTER_MISS, 1);
		count(MS_C_BYTES_AFTER_MISS, size);
		return SK_PASS;
	}
	if (bpf_msg_redirect_hash(msg, &ms_socks, &st->peer, BPF_F_INGRESS) !=
	    SK_PASS) {
		/* SK_DROP here only means "peer not found"; returning it
		 * would lose the message. Send it over TCP, and all that
		 * follows (see Ordering above). */
		st->flags |= MS_SK_TX_DOWN;
		count(first ? MS_C_MSG_MISS_FIRST : MS_C_MSG_MISS_LATER, 1);
		count(MS_C_BYTES_AFTER_MISS, size);
		return SK_PASS;
	}
	count(MS_C_MSG_REDIRECTED, 1);
	count(MS_C_BYTES_REDIRECTED, size);
	return SK_PASS;
}
