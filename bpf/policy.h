/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * policy.h: the identity policy safety net's maps and verdict, shared by the
 * enforcement points (capture.c: connect4/6 egress, sk_lookup ingress) and
 * the teardown iterator (teardown.c). The agent compiles Istio
 * AuthorizationPolicy into these tables (package policy, datapath/policy.go).
 */
#pragma once

/* Sized from the node limits in the README ("Node limits"); a policy
 * generation must fit beside the one in force (SetPolicy writes the new
 * one before it removes the old), so half of each is always enough. Keep
 * in sync with the README. */
#define MS_MAX_POL_IPS	   65536
#define MS_MAX_POL_SETS	   4096
#define MS_MAX_POL_ENTRIES 65536
/* identities x sets: the largest table (a set lists every identity whose
 * mask differs from its default). Not preallocated: only the agent writes
 * it. */
#define MS_MAX_POL_IDS 262144

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MS_MAX_POL_IPS);
	__type(key, struct ms_addr);
	__type(value, struct ms_ip_info);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ms_ip_info SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MS_MAX_POL_SETS);
	__type(key, __u32);
	__type(value, struct ms_pol_set);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ms_pol_sets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MS_MAX_POL_IDS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct ms_pol_id_key);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ms_pol_ids SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MS_MAX_POL_ENTRIES);
	__type(key, struct ms_pol_port_key);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ms_pol_ports SEC(".maps");

/* Ports a set never judges: the workload's sidecar ports and the inbound
 * ports its sidecar does not capture (the sidecar could not enforce
 * policy there, and the kernel must never deny what the sidecar allows). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MS_MAX_POL_ENTRIES);
	__type(key, struct ms_pol_port_key);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ms_pol_bypass SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, MS_MAX_POL_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct ms_pol_prefix_key);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ms_pol_prefixes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ms_denials SEC(".maps");

/* The last MS_DENIAL_LOG denials, round robin, for `meshsplice status` on
 * a node without the agent: slot 0 of ms_denial_seq counts them all. */
#define MS_DENIAL_LOG 64

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MS_DENIAL_LOG);
	__type(key, __u32);
	__type(value, struct ms_denial);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ms_denial_log SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ms_denial_seq SEC(".maps");

/* How a connection is judged: not at all, by a destination's set whose
 * capture this node does not know (a workload of another node), or by one
 * whose sidecar surely sees it (a pod of this node, on a port it captures).
 * Only the last may deny plaintext (PeerAuthentication STRICT): a port of
 * another node's pod may be excluded from its capture. */
enum ms_judged {
	MS_NOT_JUDGED = 0,
	MS_JUDGED_REMOTE = 1,
	MS_JUDGED_SIDECAR = 2,
};

/* egress_judged: a connection to dst:port is judged by dst's policy unless
 * dst is a pod of this node whose sidecar would not see it (its own ports,
 * excluded or not included inbound ports, no sidecar): that sidecar could
 * not enforce policy there, so neither does the kernel. Whether meshsplice
 * captures dst does not matter (sidecar_judges_inbound). For workloads of
 * other nodes the set's bypass ports stand for that. */
static __always_inline int egress_judged(const __u32 *src, const __u32 *dst,
					 __u16 port)
{
	struct ms_pod *dst_pod;
	__u64 *dst_netns;

	dst_netns = bpf_map_lookup_elem(&ms_pod_ips, dst);
	if (!dst_netns)
		return MS_JUDGED_REMOTE;
	dst_pod = bpf_map_lookup_elem(&ms_pods, dst_netns);
	if (!dst_pod)
		return MS_JUDGED_REMOTE;
	if (!sidecar_judges_inbound(*dst_netns, dst_pod, port, src,
				    from_self_established(*dst_netns, src)))
		return MS_NOT_JUDGED;
	return MS_JUDGED_SIDECAR;
}

/* src_plaintext: the source address is a pod known to have no sidecar. */
static __always_inline int src_plaintext(const __u32 *ip)
{
	struct ms_ip_info *info = bpf_map_lookup_elem(&ms_ip_info, ip);

	return info && (info->flags & MS_IP_PLAINTEXT);
}

/*
 * policy_denies judges a connection from (src_ip, src_identity) to
 * (dst_ip, port) with the destination workload's compiled policy set
 * (egress: a connect or connected socket of a meshed pod, judged only where
 * the destination's sidecar would judge it, see egress_judged):
 * m = identity mask & source prefix mask & port mask; a DENY atom in m
 * denies; with ALLOW policies, no ALLOW atom in m denies. The identity mask
 * of a source known to have no sidecar gains the set's plaintext (STRICT)
 * atoms, where the destination's sidecar surely sees the connection
 * (ingress callers judged that already). Fills d (for the denial record)
 * and returns its reason, 0 when allowed.
 *
 * One rule for every caller (connect, sk_lookup, teardown): the addresses
 * are the connection's own, src_ip the address it leaves from (connect:
 * the bound one, else the pod's address of the destination's family).
 */
/* Puts the types the agent reads from ms_denials into BTF (bpf2go -type);
 * nothing reads it. */
const volatile struct {
	struct ms_denial denial;
	enum ms_direction direction;
	enum ms_denial_reason reason;
} ms_btf_anchor;

static __always_inline int policy_denies(const __u32 *src_ip, __u32 src_id,
					 const __u32 *dst_ip, __u16 port,
					 int egress, struct ms_denial *d)
{
	struct ms_pol_prefix_key pk = {};
	struct ms_pol_port_key portk = {};
	struct ms_pol_id_key ik = {};
	struct ms_ip_info *dst;
	struct ms_pol_set *ps;
	int judged = MS_JUDGED_SIDECAR;
	__u64 m, *v;
	__u32 set;

	dst = bpf_map_lookup_elem(&ms_ip_info, dst_ip);
	if (!dst || !dst->policy_set)
		return 0;
	/* Only once the destination has a policy: most have none. */
	if (egress) {
		judged = egress_judged(src_ip, dst_ip, port);
		if (judged == MS_NOT_JUDGED)
			return 0;
	}
	set = dst->policy_set;
	ps = bpf_map_lookup_elem(&ms_pol_sets, &set);
	if (!ps)
		return 0;
	portk.set = set;
	portk.port = port;
	if (bpf_map_lookup_elem(&ms_pol_bypass, &portk))
		return 0;
	ik.set = set;
	ik.identity = src_id;
	v = bpf_map_lookup_elem(&ms_pol_ids, &ik);
	m = v ? *v : ps->default_id_mask;
	if (ps->plaintext_mask && judged == MS_JUDGED_SIDECAR &&
	    src_plaintext(src_ip))
		m |= ps->plaintext_mask;
	v = bpf_map_lookup_elem(&ms_pol_ports, &portk);
	m &= v ? *v : ps->default_port_mask;
	pk.prefixlen = MS_POL_PREFIX_FIXED_BITS + 128;
	pk.set = set;
	pk.family = addr_is_v4(src_ip) ? AF_INET : AF_INET6;
	__builtin_memcpy(pk.ip, src_ip, 16);
	v = bpf_map_lookup_elem(&ms_pol_prefixes, &pk);
	m &= v ? *v : 0;

	__builtin_memcpy(d->src_ip, src_ip, 16);
	__builtin_memcpy(d->dst_ip, dst_ip, 16);
	d->src_identity = src_id;
	d->policy_set = set;
	d->dst_port = port;
	if (m & ps->deny_mask) {
		d->deny_hits = m & ps->deny_mask;
		return MS_DENY_RULE;
	}
	if (ps->has_allow && !(m & ps->allow_mask))
		return MS_DENY_NO_ALLOW;
	return 0;
}

static __always_inline void record_denial(struct ms_denial *d, __u64 netns,
					  __u8 direction, __u8 reason)
{
	__u32 zero = 0, slot;
	struct ms_denial *log;
	__u64 *seq;

	d->netns = netns;
	d->direction = direction;
	d->reason = reason;
	d->time_ns = bpf_ktime_get_boot_ns();
	if (bpf_ringbuf_output(&ms_denials, d, sizeof(*d), 0))
		count(MS_C_POLICY_DENIAL_NOT_RECORDED, 1);
	seq = bpf_map_lookup_elem(&ms_denial_seq, &zero);
	if (!seq)
		return;
	slot = __sync_fetch_and_add(seq, 1) % MS_DENIAL_LOG;
	log = bpf_map_lookup_elem(&ms_denial_log, &slot);
	if (log)
		__builtin_memcpy(log, d, sizeof(*d));
}

static __always_inline __u32 identity_of(const __u32 *ip)
{
	struct ms_ip_info *info = bpf_map_lookup_elem(&ms_ip_info, ip);

	return info ? info->identity : 0;
}
