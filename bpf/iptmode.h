/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * iptmode.h: sidecar <-> sidecar splicing with pods that Istio's own
 * iptables capture (MS_POD_IPTABLES: injected with istio-init before
 * meshsplice was installed, or left on iptables on purpose). meshsplice
 * never captures such a pod (connect4/6 and sk_lookup skip it: capture is
 * off), but splices its sidecar's connections with the other sidecars of
 * the node, whatever captures them.
 *
 * The NAT sockops does not see. A sidecar connects to podB:8080 unchanged
 * (istio-iptables lets uid 1337 out), but podB's PREROUTING REDIRECTs the
 * SYN to 15006: the sidecar's accepted socket has local port 15006 while
 * the connecting socket has remote port 8080, so the reversed 4-tuple of
 * one end is not the key of the other (cilium/cilium#11039). No conntrack
 * lookup is open to sockops on this kernel (bpf_skb_ct_lookup and
 * bpf_xdp_ct_lookup are for tc and XDP programs only), so the pair is made
 * from what meshsplice knows:
 *  - the connecting end knows the destination pod is under iptables and
 *    has its inbound rules (istio.Traffic.CaptureInbound, the ISTIO_INBOUND
 *    chain): when they redirect this port, the peer's key carries the pod's
 *    inbound port instead. REDIRECT keeps the destination address for a pod
 *    with one address per family (it takes the first address of the
 *    incoming interface): any other answer misses and is counted below;
 *  - the accepting end cannot know the port the connection was made to.
 *    The connecting end, at ACTIVE_ESTABLISHED, which runs before the ACK
 *    that makes the server's PASSIVE_ESTABLISHED leaves, writes its own
 *    key into ms_nat_peers under the key the accepted socket will have;
 *    the accepting end takes it from there.
 * A miss on either side never misdelivers: an accepting end without an
 * entry does not join the splice map (sockops.nat_miss), so the connecting
 * end's first send misses its peer and the connection stays on TCP
 * (sk_msg.miss_first_send). Sockets under iptables splice only as sidecar
 * sockets: their app sockets talk to the sidecar through NAT too.
 */
#pragma once

#include "common.h"

/* Connections between a sidecar and an iptables pod's sidecar whose
 * connecting end is established and whose accepting end is not yet: one
 * handshake's worth. Deleted by the accepting end when it takes it, and by
 * the connecting end's close, whichever comes first. */
#define MS_MAX_NAT_PEERS 65536
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MS_MAX_NAT_PEERS);
	__type(key, struct ms_sock_key); /* accepted socket, role 0 */
	__type(value,
	       struct ms_sock_key); /* connecting socket's ms_socks key */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ms_nat_peers SEC(".maps");

enum ms_nat_answer {
	MS_NAT_NONE = 0, /* no iptables pod in the pair: roles() judges it */
	MS_NAT_SKIP = 1, /* not spliced (counted) */
	MS_NAT_PAIR = 2, /* spliced: both ends sidecars, peer key set */
};

static __always_inline int pod_iptables(const struct ms_pod *pod)
{
	return pod->flags & MS_POD_IPTABLES;
}

/* to_sidecar_out: a connect of pod's app to dst:port reaches its sidecar,
 * sent by connect4/6 or by Istio's ISTIO_OUTPUT (uid/gid aside). */
static __always_inline int to_sidecar_out(__u64 netns, const struct ms_pod *pod,
					  const __u32 *dst, __u16 port)
{
	if (pod_iptables(pod))
		return outbound_rules(netns, pod, dst, port) ==
		       MS_C_CONNECT_CAPTURED;
	return outbound_verdict(netns, pod, dst, port) == MS_C_CONNECT_CAPTURED;
}

/* to_sidecar_in: an established connection from src to pod's port went to
 * its sidecar, by sk_lookup or by Istio's ISTIO_INBOUND. */
static __always_inline int to_sidecar_in(__u64 netns, const struct ms_pod *pod,
					 __u16 port, const __u32 *src)
{
	if (pod_iptables(pod))
		return inbound_rules(netns, pod, port, src,
				     from_self_established(netns, src)) ==
		       MS_C_INBOUND_CAPTURED;
	return inbound_verdict(netns, pod, port, src) == MS_C_INBOUND_CAPTURED;
}

/*
 * iptables_pair judges a cross-pod connection with an iptables pod at one
 * end or both. peer comes in as the reversed key (in the peer's netns) and
 * goes out as the peer's ms_socks key, role included; *self is this end's
 * role.
 */
static __always_inline int iptables_pair(struct bpf_sock_ops *skops,
					 const struct ms_sock_key *k,
					 __u64 netns, const struct ms_pod *pod,
					 __u64 peer_netns,
					 const struct ms_pod *peer_pod,
					 struct ms_sock_key *peer, __u32 *self)
{
	struct ms_sock_key nk, *found;
	struct bpf_sock *sk = skops->sk;
	struct ms_sk *st;

	if (!pod_iptables(pod) && !pod_iptables(peer_pod))
		return MS_NAT_NONE;
	if (netns == peer_netns) {
		/* The pod's own address: ISTIO_OUTPUT's lo rules, not
		 * modelled here. */
		count(MS_C_SOCK_SKIP_ROLE_UNKNOWN, 1);
		return MS_NAT_SKIP;
	}
	*self = MS_ROLE_PROXY;
	peer->role = MS_ROLE_PROXY;

	if (skops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) {
		st = sk ? bpf_sk_storage_get(&ms_sk_state, sk, 0, 0) : NULL;
		if (!st || !(st->flags & MS_SK_PROXY) ||
		    !to_sidecar_in(peer_netns, peer_pod, k->remote_port,
				   k->local_ip)) {
			count(MS_C_SOCK_SKIP_APP, 1);
			return MS_NAT_SKIP;
		}
		if (pod_iptables(peer_pod)) {
			/* Where Istio's REDIRECT delivers it. */
			peer->local_port = peer_pod->inbound_port;
			count(MS_C_SOCK_NAT_PAIRED, 1);
		}
		return MS_NAT_PAIR;
	}

	if (!pod_iptables(pod)) {
		/* Accepted by meshsplice's capture from an iptables pod's
		 * sidecar: no NAT on this path. */
		if (!to_sidecar_in(netns, pod, k->local_port, k->remote_ip) ||
		    !to_sidecar_out(peer_netns, peer_pod, k->local_ip,
				    k->local_port)) {
			count(MS_C_SOCK_SKIP_APP, 1);
			return MS_NAT_SKIP;
		}
		return MS_NAT_PAIR;
	}
	/* Accepted under Istio's iptables: only the sidecar's inbound
	 * listener gets REDIRECTed connections; any other is an app's. */
	if (k->local_port != pod->inbound_port) {
		count(MS_C_SOCK_SKIP_APP, 1);
		return MS_NAT_SKIP;
	}
	nk = *k;
	nk.role = 0;
	found = bpf_map_lookup_elem(&ms_nat_peers, &nk);
	if (!found || found->netns != peer_netns) {
		count(MS_C_SOCK_NAT_MISS, 1);
		return MS_NAT_SKIP;
	}
	*peer = *found;
	bpf_map_delete_elem(&ms_nat_peers, &nk);
	count(MS_C_SOCK_NAT_MATCHED, 1);
	return MS_NAT_PAIR;
}

/* iptables_keyed: a connecting end in the splice map whose peer is under
 * iptables leaves its key for the peer's accepting end (see above). */
static __always_inline void iptables_keyed(struct bpf_sock_ops *skops,
					   struct ms_sk *st,
					   const struct ms_sock_key *self,
					   const struct ms_pod *peer_pod)
{
	struct ms_sock_key nk;

	if (skops->op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB ||
	    !pod_iptables(peer_pod))
		return;
	nk = st->peer;
	nk.role = 0;
	if (bpf_map_update_elem(&ms_nat_peers, &nk, self, BPF_ANY) != 0)
		return; /* the accepting end misses and counts it */
	st->flags |= MS_SK_NAT_KEYED;
	bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags |
					     BPF_SOCK_OPS_STATE_CB_FLAG);
}

/* iptables_closed: a connecting end closes; its entry goes if the
 * accepting end never took it. */
static __always_inline void iptables_closed(struct ms_sk *st)
{
	struct ms_sock_key nk;

	if (!(st->flags & MS_SK_NAT_KEYED))
		return;
	nk = st->peer;
	nk.role = 0;
	bpf_map_delete_elem(&ms_nat_peers, &nk);
	st->flags &= ~MS_SK_NAT_KEYED;
}
