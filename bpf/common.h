/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * common.h: maps, types and helpers shared by every meshsplice program.
 *
 * Every map is pinned by name (LIBBPF_PIN_BY_NAME) so that the capture
 * programs (capture.c) and the splice programs (splice.c), although loaded as
 * two collections, share one copy, and so that traffic keeps flowing while the
 * agent is gone. The Go side (datapath/) gets these types from bpf2go
 * (-type ...), so there is no hand-written twin to keep in sync.
 *
 * Addresses: every address is kept as 16 bytes in network order, IPv4 as its
 * v4-mapped IPv6 form (::ffff:a.b.c.d). An AF_INET socket and a dual-stack
 * AF_INET6 socket talking IPv4 then produce the same key, which is what pairs
 * a Go app (dual-stack) with an Envoy listener (AF_INET).
 *
 * Ports: host order everywhere in our own structs. The kernel contexts differ
 * (see KERNEL-NOTES): each reader converts at the edge, in one helper.
 */
#pragma once

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define AF_INET		     2
#define AF_INET6	     10
#define SOL_IP		     0
#define SOL_IPV6	     41
#define SO_ORIGINAL_DST	     80 /* linux/netfilter_ipv4.h */
#define IP6T_SO_ORIGINAL_DST 80 /* linux/netfilter_ipv6/ip6_tables.h */
#define SOCK_STREAM	     1
#define ENOENT		     2
#define IPPROTO_TCP	     6

#define SK_DROP 0
#define SK_PASS 1

/* Map sizes. */
#define MS_MAX_PODS	   4096
#define MS_MAX_POD_IPS	   (MS_MAX_PODS * 4)
#define MS_MAX_PORT_RULES  (MS_MAX_PODS * 16)
#define MS_MAX_RANGE_RULES (MS_MAX_PODS * 16)
#define MS_MAX_SOCKS	   131072
/* Captured connections open at once on the node: one ms_orig_dst entry each,
 * from the connect's SYN-ACK to its close. The sidecar reads it once, at
 * accept; an entry evicted before that is counted (getsockopt.orig_dst_missing)
 * and the sidecar gets ENOENT, never a wrong destination. README says so. */
#define MS_MAX_CAPTURED_CONNS MS_MAX_SOCKS
#define MS_MAX_ORIG_DST	      MS_MAX_CAPTURED_CONNS
#define MS_MAX_LISTENERS      (MS_MAX_PODS * 2)

/* ms_pod.flags: what meshsplice does for one pod (netns). */
enum ms_pod_flag {
	MS_POD_CAPTURE = 1 << 0,    /* redirect outbound, capture inbound */
	MS_POD_SPLICE = 1 << 1,	    /* sockmap splice allowed */
	MS_POD_APP_SPLICE = 1 << 2, /* the app's sockets are spliced too */
	MS_POD_INCLUDE_ALL_OUT = 1 << 3,  /* includeOutboundIPRanges "*" */
	MS_POD_INCLUDE_ALL_IN = 1 << 4,	  /* includeInboundPorts "*" */
	MS_POD_INCLUDE_LOOPBACK = 1 << 5, /* an include range is loopback */
	MS_POD_CAPTURE_IPV6 = 1 << 6,	  /* istio.Traffic.CaptureIPv6 */
	/* The pod has a sidecar that Istio captures for (injected, not
	 * inject=false, not interceptionMode NONE), whether meshsplice captures
	 * it or not: its policy is judged even with capture off. */
	MS_POD_SIDECAR = 1 << 7,
	/* Istio's own iptables capture the pod (istio-init, or
	 * meshsplice.io/capture: iptables): meshsplice never captures it, only
	 * splices its sidecar's connections (iptmode.h). Never with CAPTURE. */
	MS_POD_IPTABLES = 1 << 8,
};

/* ms_node.flags: the node-wide switches. */
enum ms_node_flag {
	MS_NODE_CAPTURE = 1 << 0,
	MS_NODE_SPLICE = 1 << 1,
	MS_NODE_DRAIN = 1 << 2, /* detaching: every send goes over TCP */
	/* Node switch app-splice: disabled. New app sockets are not spliced,
	 * whatever their pod says (the zero value allows it, so settings
	 * written by an agent that predates the switch keep their meaning). */
	MS_NODE_NO_APP_SPLICE = 1 << 3,
};

/* Kinds of per-pod port rules (ms_port_key.kind). */
enum ms_port_kind {
	MS_PORT_OUT_INCLUDE = 1,
	MS_PORT_OUT_EXCLUDE = 2,
	MS_PORT_IN_INCLUDE = 3,
	MS_PORT_IN_EXCLUDE = 4,
};

/* Kinds of per-pod address ranges (ms_range_key.kind). */
enum ms_range_kind {
	MS_RANGE_OUT_INCLUDE = 1,
	MS_RANGE_OUT_EXCLUDE = 2,
};

/* Socket roles. A redirect lands only in a socket whose key carries the role
 * the sender expects: both ends must agree or data takes TCP. */
enum ms_role {
	MS_ROLE_NONE = 0,
	MS_ROLE_APP = 1,
	MS_ROLE_PROXY = 2,
};

/* ms_sk.flags: per-socket state. */
enum ms_sk_flag {
	MS_SK_HAS_ORIG = 1 << 0, /* connect was captured; orig holds the dst */
	MS_SK_ORIG_KEYED = 1 << 1, /* ms_orig_dst entry to delete on close */
	MS_SK_PROXY = 1 << 2,	   /* connect() ran as the proxy uid/gid */
	MS_SK_TX_SPLICE = 1 << 3,  /* sends are redirected to peer */
	MS_SK_TX_DOWN = 1 << 4,	   /* a redirect missed: TCP for good */
	MS_SK_SENT = 1 << 5,	   /* sk_msg saw a send */
	MS_SK_PASSIVE = 1 << 6,	   /* accepted (for policy teardown) */
	MS_SK_ACTIVE = 1 << 7,	   /* connected (for policy teardown) */
	MS_SK_ADDR_KEYED = 1 << 8, /* ms_sk_addrs entry to delete on close */
	MS_SK_TX_BACKOFF = 1 << 9, /* peer full: TCP until it read it all */
	MS_SK_NAT_KEYED = 1 << 10, /* ms_nat_peers entry to delete on close */
};

/* Counters, one slot each in ms_counters (per CPU). Go names them from this
 * enum (bpf2go -type ms_counter). Grouped by the program that counts them. */
enum ms_counter {
	/* cgroup/connect4, cgroup/connect6 */
	MS_C_CONNECT_MESHED = 0,  /* TCP connects from a registered pod */
	MS_C_CONNECT_CAPTURED,	  /* sent to the sidecar's outbound port */
	MS_C_SKIP_CAPTURE_OFF,	  /* pod or node capture switched off */
	MS_C_SKIP_PROXY,	  /* proxy uid/gid */
	MS_C_SKIP_LOOPBACK,	  /* destination is loopback */
	MS_C_SKIP_EXCLUDED_PORT,  /* excludeOutboundPorts */
	MS_C_SKIP_EXCLUDED_RANGE, /* excludeOutboundIPRanges */
	MS_C_SKIP_NOT_INCLUDED,	  /* not in includeOutboundIPRanges */
	MS_C_SKIP_IPV6,		  /* IPv6 not captured for this pod */
	MS_C_CONNECT_HAIRPIN, /* the proxy's own lo connect: to the inbound port */
	MS_C_CONNECT_NO_STORAGE, /* could not keep the original destination */
	/* cgroup/getsockopt */
	MS_C_ORIG_DST_OUTBOUND,	 /* answered from a captured connect */
	MS_C_ORIG_DST_INBOUND,	 /* answered with the local address */
	MS_C_ORIG_DST_KERNEL,	 /* the kernel (conntrack) already answered */
	MS_C_ORIG_DST_SHORT_BUF, /* caller's buffer too small */
	MS_C_ORIG_DST_MISSING,	 /* captured, but no destination: ENOENT */
	/* sk_lookup */
	MS_C_INBOUND_MESHED,   /* TCP SYNs to a registered pod IP */
	MS_C_INBOUND_CAPTURED, /* assigned to the sidecar's inbound listener */
	MS_C_INBOUND_SKIP_OFF, /* pod or node capture switched off */
	MS_C_INBOUND_SKIP_PROXY_PORT,  /* one of the sidecar's own ports */
	MS_C_INBOUND_SKIP_PASSTHROUGH, /* from 127.0.0.6 / ::6 (Envoy) */
	MS_C_INBOUND_SKIP_LOOPBACK,    /* from a loopback address */
	MS_C_INBOUND_SKIP_SELF,	       /* the pod's own connect (over lo) */
	MS_C_INBOUND_SKIP_IPV6,	       /* IPv6 not captured for this pod */
	MS_C_INBOUND_SKIP_EXCLUDED_PORT,
	MS_C_INBOUND_SKIP_NOT_INCLUDED,
	MS_C_INBOUND_NO_LISTENER, /* sidecar not listening: refused */
	MS_C_INBOUND_ASSIGN_FAILED,
	/* sockops */
	MS_C_LISTENER_STARTED, /* sidecar inbound listener: agent told */
	/* iter/tcp */
	MS_C_LISTENER_REGISTERED, /* sidecar inbound listener in ms_listeners */
	MS_C_LISTENER_REFUSED,	  /* the sockmap refused it (MPTCP, ULP) */
	MS_C_ORIG_DST_STORED,
	MS_C_ORIG_DST_EVICTED, /* gone from ms_orig_dst before its close */
	MS_C_SOCK_INSERTED,    /* socket added to ms_socks */
	MS_C_SOCK_INSERT_FAILED,
	MS_C_SOCK_SKIP_SPLICE_OFF,   /* pod or node splice off (either end) */
	MS_C_SOCK_SKIP_PEER_UNKNOWN, /* peer not a registered pod on this node */
	MS_C_SOCK_SKIP_ROLE_UNKNOWN, /* not an app<->sidecar or sidecar pair */
	MS_C_SOCK_SKIP_APP,	     /* an app's end, without app-splice */
	MS_C_SOCK_SKIP_EARLY_DATA,   /* data moved before establish (TFO) */
	/* policy (connect4/6: egress; sk_lookup: ingress; iter/tcp: teardown) */
	MS_C_POLICY_EGRESS_ALLOWED,
	MS_C_POLICY_EGRESS_DENIED,
	MS_C_POLICY_INGRESS_ALLOWED,
	MS_C_POLICY_INGRESS_DENIED,
	MS_C_POLICY_DENIAL_NOT_RECORDED, /* denial ring buffer full */
	MS_C_POLICY_TORN_DOWN,		 /* live connection destroyed */
	MS_C_POLICY_TEARDOWN_FAILED,
	/* sk_msg */
	MS_C_MSG_REDIRECTED,
	MS_C_BYTES_REDIRECTED,
	MS_C_MSG_MISS_FIRST,   /* first send found no peer: sent over TCP */
	MS_C_MSG_MISS_LATER,   /* a later send found no peer (closing) */
	MS_C_MSG_AFTER_MISS,   /* sent over TCP because of an earlier miss */
	MS_C_BYTES_AFTER_MISS, /* bytes of the three above */
	MS_C_MSG_DRAIN,	       /* sent over TCP: datapath detaching */
	MS_C_MSG_PASS,	       /* socket sends over TCP by design */
	MS_C_BYTES_PASS,
	/* sidecar inbound listeners (issue 10, item 16) */
	MS_C_LISTENER_EVENT_LOST, /* sockops: ms_events full, event dropped */
	MS_C_LISTENER_RESYNCED,	  /* counted by the agent: a listener missing
				 * from ms_listeners found and registered */
	/* readers.c: splice(2)/sendfile(2) reads of spliced sockets */
	MS_C_SPLICE_REFUSED,	      /* refused with EINVAL (BPF LSM guard) */
	MS_C_SPLICE_UNGUARDED,	      /* seen by the detector (no guard) */
	MS_C_SPLICE_READER_RESET,     /* such a connection reset */
	MS_C_SOCK_SKIP_SPLICE_READER, /* sockops: pod had a splice reader */
	MS_C_MSG_BACKPRESSURE,	      /* sk_msg: peer full, TCP for now */
	MS_C_MSG_RESUMED, /* sk_msg: peer read it all, redirect again */
	/* sockops, pods under Istio's iptables (iptmode.h) */
	MS_C_SOCK_NAT_PAIRED,  /* connect side: peer keyed past REDIRECT */
	MS_C_SOCK_NAT_MATCHED, /* accept side: found its connect side */
	MS_C_SOCK_NAT_MISS,    /* accept side: connect side unknown, TCP */
	MS_C_MAX,
};

struct ms_addr {
	__u32 ip[4]; /* network order; IPv4 as ::ffff:a.b.c.d */
};

struct ms_pod {
	enum ms_pod_flag flags; /* a set of ms_pod_flag */
	__u32 proxy_uid;
	__u32 proxy_gid;
	__u16 outbound_port;
	__u16 inbound_port;
	__u32 listener_slot; /* ms_listeners[2*slot] IPv4, [2*slot+1] IPv6 */
	__u32 identity;	     /* the pod's workload identity (policy) */
	struct ms_addr ip4;  /* the pod's addresses, as connection sources */
	struct ms_addr ip6;
};

struct ms_node {
	enum ms_node_flag flags; /* a set of ms_node_flag */
};

struct ms_port_key {
	__u64 netns;
	enum ms_port_kind kind;
	__u16 port;
	__u16 pad;
};

/* LPM trie key: prefixlen counts bits from `kind` on, so the first 128 bits
 * (kind, netns and family) always match exactly and the rest is the address
 * prefix. The family keeps an IPv6 range (::/0, ::/80) from matching the
 * v4-mapped form of an IPv4 address, as in Istio. */
struct ms_range_key {
	__u32 prefixlen;
	enum ms_range_kind kind;
	__u64 netns;
	__u32 family; /* AF_INET or AF_INET6 */
	__u32 ip[4];  /* IPv4 as ::ffff:a.b.c.d */
	__u32 pad;
};
#define MS_RANGE_FIXED_BITS 128

/* A socket as (netns cookie, local, remote), seen from the socket itself. */
struct ms_sock_key {
	__u64 netns;
	__u32 local_ip[4];
	__u32 remote_ip[4];
	__u16 local_port;
	__u16 remote_port;
	enum ms_role role; /* 0 in ms_orig_dst */
};

struct ms_orig {
	__u32 ip[4];
	__u16 port; /* host order */
	__u16 pad;
};

/* ms_ip_info.flags */
enum ms_ip_flag {
	/* A pod known to have no sidecar (not injected, no istio-proxy): its
	 * connections are plaintext, which a STRICT port refuses. */
	MS_IP_PLAINTEXT = 1 << 0,
};

/* Policy: what the kernel knows of every workload IP (local or not). */
struct ms_ip_info {
	__u32 identity;	       /* source identity of connections from this IP */
	__u32 policy_set;      /* policy of connections to it; 0: none */
	enum ms_ip_flag flags; /* a set of ms_ip_flag */
};

/* A compiled policy set (package policy): up to 64 atoms, one bit each. */
struct ms_pol_set {
	__u64 allow_mask;
	__u64 deny_mask;
	__u64 default_id_mask;	 /* identities without an entry */
	__u64 default_port_mask; /* ports without an entry */
	__u32 has_allow;	 /* an ALLOW policy exists: default deny */
	__u32 pad;
	/* PeerAuthentication STRICT atoms: a MS_IP_PLAINTEXT source satisfies
	 * them by identity (ORed into its identity mask). */
	__u64 plaintext_mask;
};

struct ms_pol_id_key {
	__u32 set;
	__u32 identity;
};

struct ms_pol_port_key {
	__u32 set;
	__u16 port;
	__u16 pad;
};

/* LPM trie key: prefixlen counts bits from `set` on, so set and family
 * (the first 64 bits) always match exactly and the rest is the address
 * prefix. The family keeps an IPv6 ipBlock (::/0, ::ffff:0:0/96,
 * ::ffff:10.0.0.0/104) from matching an IPv4 source: Envoy never matches an
 * IPv4 address with an IPv6 CIDR. */
struct ms_pol_prefix_key {
	__u32 prefixlen;
	__u32 set;
	__u32 family; /* AF_INET or AF_INET6 */
	__u32 ip[4];  /* IPv4 as ::ffff:a.b.c.d */
};
#define MS_POL_PREFIX_FIXED_BITS 64

enum ms_denial_reason {
	MS_DENY_RULE = 1,     /* a DENY atom matched */
	MS_DENY_NO_ALLOW = 2, /* ALLOW policies exist, none matched */
};

enum ms_direction {
	MS_DIR_EGRESS = 1,
	MS_DIR_INGRESS = 2,
	MS_DIR_TEARDOWN = 3,
};

/* One denial, for the agent's record (ms_denials). */
struct ms_denial {
	__u64 netns;
	__u32 src_ip[4];
	__u32 dst_ip[4];
	__u64 deny_hits; /* DENY atoms that matched */
	__u32 src_identity;
	__u32 policy_set;
	__u16 dst_port;
	__u8 direction; /* enum ms_direction */
	__u8 reason;	/* enum ms_denial_reason */
	__u32 uid;
	__u64 time_ns; /* CLOCK_BOOTTIME */
};

/* Per-socket state, in socket-local storage: freed with the socket. */
struct ms_sk {
	struct ms_sock_key peer; /* where sends are redirected */
	struct ms_orig orig;   /* original destination of a captured connect */
	enum ms_sk_flag flags; /* a set of ms_sk_flag */
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MS_MAX_PODS);
	__type(key, __u64); /* netns cookie */
	__type(value, struct ms_pod);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ms_pods SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MS_MAX_POD_IPS);
	__type(key, struct ms_addr);
	__type(value, __u64); /* netns cookie */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ms_pod_ips SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MS_MAX_PORT_RULES);
	__type(key, struct ms_port_key);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ms_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, MS_MAX_RANGE_RULES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct ms_range_key);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ms_ranges SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ms_node);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ms_node_settings SEC(".maps");

/* ms_counters has room for counters that later versions add: its size is
 * part of the pinned layout, and an agent whose map differs from the pinned
 * one refuses to upgrade in place (datapath.ErrIncompatiblePins). */
#define MS_COUNTER_SLOTS 256
_Static_assert(MS_C_MAX <= MS_COUNTER_SLOTS,
	       "ms_counters: raise MS_COUNTER_SLOTS");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, MS_COUNTER_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ms_counters SEC(".maps");

/* Original destinations of captured connects, keyed as the sidecar's
 * accepted socket sees itself. LRU only as a backstop: sockops deletes each
 * entry when the app's socket closes and counts the ones it no longer finds
 * (sockops.orig_dst_evicted). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MS_MAX_ORIG_DST);
	__type(key, struct ms_sock_key);
	__type(value, struct ms_orig);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ms_orig_dst SEC(".maps");

/* Connects a pod made to one of its own addresses (the sidecar's inbound
 * passthrough from 127.0.0.6 / ::6, an app calling its pod IP), keyed as the
 * accepting side sees them. sockops writes the entry at TCP_CONNECT_CB,
 * before the SYN leaves; sk_lookup exempts a SYN only if it finds it, so a
 * SYN that merely claims such a source (from ::6 on eth0) is judged like any
 * other. No close hook: the LRU forgets entries long after their SYN. */
#define MS_MAX_SELF_SYN 65536
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MS_MAX_SELF_SYN);
	__type(key, struct ms_sock_key);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ms_self_syn SEC(".maps");

/* Spliced sockets. The kernel removes a socket from it when it closes. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, MS_MAX_SOCKS);
	__type(key, struct ms_sock_key);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ms_socks SEC(".maps");

/* Pods (netns cookies) where a process read a spliced socket with splice(2)
 * while no guard refused it (readers.c): sockops splices no new connection
 * to or from them. LRU: netns cookies are never reused, so a removed pod's
 * entry just ages out. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, MS_MAX_PODS);
	__type(key, __u64);   /* netns cookie */
	__type(value, __u64); /* unguarded splice reads seen */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ms_splice_readers SEC(".maps");

/* Sidecar inbound listeners (15006) for sk_lookup, two slots per pod (see
 * ms_pod.listener_slot, allocated by the agent). A SOCKMAP, not a SOCKHASH:
 * sockops may insert a listening socket (TCP_LISTEN_CB) only into a SOCKMAP
 * (net/core/sock_map.c: sock_map_op_okay vs sock_hash_op_okay). No program
 * is attached to this map, so listeners get no sk_msg program. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, MS_MAX_LISTENERS);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ms_listeners SEC(".maps");

/* Events for the agent: the netns cookie of a pod whose sidecar started
 * listening on its inbound port (see register_listener in splice.c). */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 64 * 1024);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ms_events SEC(".maps");

/* The netns cookie of the pod an iterator (ms_listener_iter, teardown.c)
 * walks: an iterator walks the netns of the thread that runs it, which the
 * agent entered; the agent writes its cookie here first, one run at a time. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ms_iter_netns SEC(".maps");

static __always_inline __u32 listener_index(const struct ms_pod *pod,
					    __u32 family)
{
	return pod->listener_slot * 2 + (family == AF_INET6);
}

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct ms_sk);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ms_sk_state SEC(".maps");

/* ms_counter_count puts enum ms_counter into BTF for bpf2go and tells Go
 * how many counters this object has. */
const volatile enum ms_counter ms_counter_count = MS_C_MAX;

/*
 * LOAD_U32 reads a u32 field of a context (or struct bpf_sock) at its fixed
 * offset. Plain C lets clang derive a pointer such as ctx+24 and load
 * relative to it when the same fields are read on several paths, which the
 * verifier rejects ("dereference of modified ctx ptr"). The asm keeps every
 * load a direct (ctx + constant) access. These structs are UAPI: their
 * offsets never move, so no CO-RE relocation is needed.
 */
#define LOAD_U32(ptr, type, field)                                    \
	({                                                            \
		__u32 __v;                                            \
		asm volatile("%0 = *(u32 *)(%1 + %2)"                 \
			     : "=r"(__v)                              \
			     : "r"(ptr),                              \
			       "i"(__builtin_offsetof(type, field))); \
		__v;                                                  \
	})

static __always_inline void count(__u32 idx, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(&ms_counters, &idx);

	if (v)
		__sync_fetch_and_add(v, n);
}

static __always_inline __u32 node_flags(void)
{
	__u32 zero = 0;
	struct ms_node *n = bpf_map_lookup_elem(&ms_node_settings, &zero);

	return n ? n->flags : 0;
}

static __always_inline void addr_from_ip4(struct ms_addr *a, __u32 ip4)
{
	a->ip[0] = 0;
	a->ip[1] = 0;
	a->ip[2] = bpf_htonl(0x0000ffff);
	a->ip[3] = ip4;
}

static __always_inline int addr_is_v4(const __u32 *ip)
{
	return ip[0] == 0 && ip[1] == 0 && ip[2] == bpf_htonl(0x0000ffff);
}

/* 127.0.0.0/8, ::1 and ::ffff:127.0.0.0/104. */
static __always_inline int addr_is_loopback(const __u32 *ip)
{
	if (addr_is_v4(ip))
		return (bpf_ntohl(ip[3]) >> 24) == 127;
	return ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && ip[3] == bpf_htonl(1);
}

/* Envoy's inbound passthrough source: 127.0.0.6 or ::6. */
static __always_inline int addr_is_passthrough(const __u32 *ip)
{
	if (addr_is_v4(ip))
		return ip[3] == bpf_htonl(0x7f000006);
	return ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && ip[3] == bpf_htonl(6);
}

/* The sidecar's own ports, never captured inbound. Keep in sync with
 * istio.ProxyPorts (istio/traffic.go). */
static __always_inline int is_proxy_port(__u16 port)
{
	switch (port) {
	case 15000:
	case 15001:
	case 15004:
	case 15006:
	case 15008:
	case 15020:
	case 15021:
	case 15053:
	case 15090: return 1;
	}
	return 0;
}

static __always_inline int port_rule(__u64 netns, __u16 port,
				     enum ms_port_kind kind)
{
	struct ms_port_key k = {.netns = netns, .port = port, .kind = kind};

	return bpf_map_lookup_elem(&ms_ports, &k) != NULL;
}

static __always_inline int range_rule(__u64 netns, const __u32 *ip,
				      enum ms_range_kind kind)
{
	struct ms_range_key k = {
	    .prefixlen = MS_RANGE_FIXED_BITS + 128,
	    .kind = kind,
	    .netns = netns,
	    .family = addr_is_v4(ip) ? AF_INET : AF_INET6,
	};

	__builtin_memcpy(k.ip, ip, 16);
	return bpf_map_lookup_elem(&ms_ranges, &k) != NULL;
}

/* addr_is_own: ip is one of the registered addresses of the pod netns. */
static __always_inline int addr_is_own(__u64 netns, const __u32 *ip)
{
	__u64 *owner = bpf_map_lookup_elem(&ms_pod_ips, ip);

	return owner && *owner == netns;
}

/* 0.0.0.0, ::, 127.0.0.1 and ::1: istio-iptables' "-d 127.0.0.1/32" (the
 * kernel sends a connect to 0.0.0.0 or :: there). */
static __always_inline int addr_is_host_loopback(const __u32 *ip)
{
	if (addr_is_v4(ip))
		return ip[3] == 0 || ip[3] == bpf_htonl(0x7f000001);
	return ip[0] == 0 && ip[1] == 0 && ip[2] == 0 &&
	       (ip[3] == 0 || ip[3] == bpf_htonl(1));
}

/* via_lo: a connect to ip leaves through lo (istio-iptables' "-o lo"):
 * loopback and the pod's own addresses. */
static __always_inline int via_lo(__u64 netns, const __u32 *ip)
{
	return addr_is_host_loopback(ip) || addr_is_loopback(ip) ||
	       addr_is_own(netns, ip);
}

/* The host loopback is never captured ("-d 127.0.0.1/32 -j RETURN"); other
 * lo destinations, the pod's own addresses included, only when an include
 * range is loopback ("-o lo -m owner ! --uid-owner 1337 -j RETURN"). */
static __always_inline int
outbound_loopback(__u64 netns, const struct ms_pod *pod, const __u32 *ip)
{
	if (addr_is_host_loopback(ip))
		return 1;
	return via_lo(netns, ip) && !(pod->flags & MS_POD_INCLUDE_LOOPBACK);
}

/* ipv6_off: ip is IPv6 (not v4-mapped) and the pod's IPv6 is not captured
 * (istio-iptables wrote no ip6tables rules). */
static __always_inline int ipv6_off(const struct ms_pod *pod, const __u32 *ip)
{
	return !addr_is_v4(ip) && !(pod->flags & MS_POD_CAPTURE_IPV6);
}

/*
 * outbound_rules mirrors istio.Traffic.CaptureOutbound (istio/decide.go),
 * the order of Istio's ISTIO_OUTPUT chain, minus the uid/gid check that only
 * connect() can make, and without the switches: returns
 * MS_C_CONNECT_CAPTURED or the skip counter.
 */
static __always_inline __u32 outbound_rules(__u64 netns,
					    const struct ms_pod *pod,
					    const __u32 *dst, __u16 port)
{
	if (ipv6_off(pod, dst))
		return MS_C_SKIP_IPV6;
	if (outbound_loopback(netns, pod, dst))
		return MS_C_SKIP_LOOPBACK;
	if (port_rule(netns, port, MS_PORT_OUT_EXCLUDE))
		return MS_C_SKIP_EXCLUDED_PORT;
	if (range_rule(netns, dst, MS_RANGE_OUT_EXCLUDE))
		return MS_C_SKIP_EXCLUDED_RANGE;
	if (port_rule(netns, port, MS_PORT_OUT_INCLUDE))
		return MS_C_CONNECT_CAPTURED;
	if ((pod->flags & MS_POD_INCLUDE_ALL_OUT) ||
	    range_rule(netns, dst, MS_RANGE_OUT_INCLUDE))
		return MS_C_CONNECT_CAPTURED;
	return MS_C_SKIP_NOT_INCLUDED;
}

/* outbound_verdict: the switches (pod and node), then Istio's rules. */
static __always_inline __u32 outbound_verdict(__u64 netns,
					      const struct ms_pod *pod,
					      const __u32 *dst, __u16 port)
{
	if (!(pod->flags & MS_POD_CAPTURE) || !(node_flags() & MS_NODE_CAPTURE))
		return MS_C_SKIP_CAPTURE_OFF;
	return outbound_rules(netns, pod, dst, port);
}

/*
 * inbound_rules mirrors istio.Traffic.CaptureInbound (istio/decide.go, the
 * ISTIO_INBOUND chain) without the switches, for a connection to one of the
 * pod's addresses: returns MS_C_INBOUND_CAPTURED or the skip counter.
 * from_self: the pod made the connection itself, over lo; istio-iptables
 * judged it in ISTIO_OUTPUT (at connect, see capture_connect) and
 * PREROUTING never sees it.
 */
static __always_inline __u32 inbound_rules(__u64 netns,
					   const struct ms_pod *pod, __u16 port,
					   const __u32 *src, int from_self)
{
	if (ipv6_off(pod, src)) /* the source's family is the destination's */
		return MS_C_INBOUND_SKIP_IPV6;
	if (from_self)
		return addr_is_passthrough(src) ? MS_C_INBOUND_SKIP_PASSTHROUGH
						: MS_C_INBOUND_SKIP_SELF;
	/* Never from outside: the kernel drops such martians. */
	if (addr_is_loopback(src))
		return MS_C_INBOUND_SKIP_LOOPBACK;
	if (is_proxy_port(port) || port == pod->inbound_port ||
	    port == pod->outbound_port)
		return MS_C_INBOUND_SKIP_PROXY_PORT;
	if (pod->flags & MS_POD_INCLUDE_ALL_IN) {
		/* Istio applies excludeInboundPorts only to "*". */
		if (port_rule(netns, port, MS_PORT_IN_EXCLUDE))
			return MS_C_INBOUND_SKIP_EXCLUDED_PORT;
		return MS_C_INBOUND_CAPTURED;
	}
	if (port_rule(netns, port, MS_PORT_IN_INCLUDE))
		return MS_C_INBOUND_CAPTURED;
	return MS_C_INBOUND_SKIP_NOT_INCLUDED;
}

/* inbound_verdict_from: the switches (pod and node), then Istio's rules. */
static __always_inline __u32 inbound_verdict_from(__u64 netns,
						  const struct ms_pod *pod,
						  __u16 port, const __u32 *src,
						  int from_self)
{
	if (!(pod->flags & MS_POD_CAPTURE) || !(node_flags() & MS_NODE_CAPTURE))
		return MS_C_INBOUND_SKIP_OFF;
	return inbound_rules(netns, pod, port, src, from_self);
}

/* from_self_established: for an established connection (sockops,
 * teardown) a handshake completed, so a source that is the pod's own
 * (passthrough or pod address) really is the pod itself. */
static __always_inline int from_self_established(__u64 netns, const __u32 *src)
{
	return addr_is_passthrough(src) || addr_is_own(netns, src);
}

/* inbound_verdict judges an established connection (sockops). */
static __always_inline __u32 inbound_verdict(__u64 netns,
					     const struct ms_pod *pod,
					     __u16 port, const __u32 *src)
{
	return inbound_verdict_from(netns, pod, port, src,
				    from_self_established(netns, src));
}

/* sidecar_judges_inbound: the pod's sidecar would see (and authorize) a
 * connection from src to port, by Istio's rules, whether meshsplice or
 * Istio's own iptables capture it: policy is judged there, and only there,
 * with capture on or off. */
static __always_inline int sidecar_judges_inbound(__u64 netns,
						  const struct ms_pod *pod,
						  __u16 port, const __u32 *src,
						  int from_self)
{
	if (!(pod->flags & (MS_POD_SIDECAR | MS_POD_CAPTURE)))
		return 0;
	return inbound_rules(netns, pod, port, src, from_self) ==
	       MS_C_INBOUND_CAPTURED;
}

char __license[] SEC("license") = "Dual BSD/GPL";

#include "policy.h"
