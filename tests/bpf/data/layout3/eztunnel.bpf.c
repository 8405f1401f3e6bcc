// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/*
 * eztunnel: pair local TCP sockets and move bytes socket-to-socket.
 *
 * sockops registers connect() sockets when they become established and pairs
 * accept() sockets with them (docs/dataplane.md, "Pairing"): a candidate found by
 * one of three rules is taken only when its handshake is ours (both ends of one
 * connection hold the same two sequence numbers; NAT never rewrites them). sk_msg
 * redirects each message of a paired socket into its peer's receive queue. A
 * socket is redirected from its first byte or never (states change only by
 * compare-and-swap, see enum ez_sock_state), so bytes never reorder.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_core_read.h>
#include "eztunnel.h"

#define AF_INET 2
#define AF_INET6 10
#define SK_PASS 1

char LICENSE[] SEC("license") = "Dual BSD/GPL";

/* A test builds an object with a tiny sockhash to fill it; production never sets this. */
#ifndef EZ_SOCKHASH_ENTRIES
#define EZ_SOCKHASH_ENTRIES EZ_MAX_SOCKETS
#endif

/* Pair counters per rule sit right after EZ_CNT_PAIRS, in rule order. */
_Static_assert(EZ_CNT_PAIRS + EZ_RULE_NETNS_MIRROR == EZ_CNT_PAIRS_NETNS_MIRROR, "rule order");
_Static_assert(EZ_CNT_PAIRS + EZ_RULE_CAPTURE == EZ_CNT_PAIRS_CAPTURE, "rule order");
_Static_assert(EZ_CNT_PAIRS + EZ_RULE_CROSS_MIRROR == EZ_CNT_PAIRS_CROSS_MIRROR, "rule order");
/* index_claims holds one bit per index kind. */
_Static_assert(EZ_IDX_CROSS_MIRROR < 8, "index kinds fit index_claims");

/* ---- maps ------------------------------------------------------------ */

/* Paired sockets, keyed by their own socket cookie. */
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, EZ_SOCKHASH_ENTRIES);
	__type(key, __u64);
	__type(value, __u64);
} ez_socks SEC(".maps");

/* Pairing state per socket cookie (a hash: the peer's sockops flips it). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, EZ_MAX_SOCKETS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, __u64);
	__type(value, struct ez_sock_info);
} ez_sockinfo SEC(".maps");

/* Each socket's own cookie, for sk_msg (which may not ask for it). */
struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u64);
} ez_skcookie SEC(".maps");

/* Published by active sockets, looked up by passive ones. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, EZ_MAX_INDEX);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct ez_index_key);
	__type(value, struct ez_index_value);
} ez_index SEC(".maps");

/* Enrolled endpoints (in-mesh pods on this node), filled by user space. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, EZ_MAX_ENDPOINTS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct ez_addr);
	__type(value, struct ez_endpoint);
} ez_endpoints SEC(".maps");

/* netns cookie -> an enrolled address seen as a local address there. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, EZ_MAX_NETNS);
	__type(key, __u64);
	__type(value, struct ez_addr);
} ez_netns SEC(".maps");

/* Capture ports (host order) whose passive sockets may pair by handshake alone. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, EZ_MAX_CAPTURE_PORTS);
	__type(key, __u32);
	__type(value, __u32);
} ez_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct ez_config);
} ez_config SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, EZ_CNT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} ez_counters SEC(".maps");

/* Keeps the shared enums in the object's BTF, where tests compare them. */
struct ez_btf_anchor {
	enum ez_layout layout;
	enum ez_limits limits;
	enum ez_sock_state state;
	enum ez_rule rule;
	enum ez_index_kind kind;
	enum ez_counter counter;
	enum ez_endpoint_flags flags;
};
const volatile struct ez_btf_anchor ez_anchor = {};

/* ---- helpers ----------------------------------------------------------- */

static __always_inline void count(__u32 idx, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(&ez_counters, &idx);

	if (v)
		*v += n;
}

static __always_inline struct ez_config *get_config(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&ez_config, &zero);
}

static __always_inline bool enabled(void)
{
	struct ez_config *cfg = get_config();

	return cfg && cfg->enabled;
}

static __always_inline bool enrolled(struct ez_addr *a)
{
	struct ez_endpoint *ep = bpf_map_lookup_elem(&ez_endpoints, a);

	return ep && (ep->flags & EZ_EP_ENROLLED);
}

static __always_inline bool loopback(const struct ez_addr *a)
{
	/* ::1 */
	if (!a->a[0] && !a->a[1] && !a->a[2] && a->a[3] == bpf_htonl(1))
		return true;
	/* ::ffff:127.0.0.0/104 */
	return !a->a[0] && !a->a[1] && a->a[2] == bpf_htonl(0xffff) &&
	       (a->a[3] & bpf_htonl(0xff000000)) == bpf_htonl(0x7f000000);
}

/* A socket of ours as user space and sk_msg see it: tuple and netns, and its
 * handshake (the sequence numbers both ends of one connection share). */
struct ez_tuple {
	struct ez_addr local;
	struct ez_addr remote;
	__u16 local_port;
	__u16 remote_port;
	__u64 netns;
	__u32 snd_nxt; /* at ESTABLISHED: own ISN + 1 */
	__u32 rcv_nxt; /* at ESTABLISHED: the other end's ISN + 1 */
};

static __always_inline bool read_tuple(struct bpf_sock_ops *ops, struct ez_tuple *t)
{
	/* Read every context field unconditionally: the verifier refuses the
	 * variable-offset context access clang makes of branch-local reads. */
	__u32 family = ops->family;
	__u32 l4 = ops->local_ip4, r4 = ops->remote_ip4;
	__u32 l0 = ops->local_ip6[0], l1 = ops->local_ip6[1];
	__u32 l2 = ops->local_ip6[2], l3 = ops->local_ip6[3];
	__u32 r0 = ops->remote_ip6[0], r1 = ops->remote_ip6[1];
	__u32 r2 = ops->remote_ip6[2], r3 = ops->remote_ip6[3];

	/* At the ESTABLISHED callbacks no data has moved yet (TFO aside, which never
	 * matches): the connecting side holds ISN_c+1 / ISN_s+1, its peer the reverse. */
	t->snd_nxt = ops->snd_nxt;
	t->rcv_nxt = ops->rcv_nxt;
	if (family == AF_INET) {
		t->local.a[2] = bpf_htonl(0xffff);
		t->local.a[3] = l4;
		t->remote.a[2] = bpf_htonl(0xffff);
		t->remote.a[3] = r4;
	} else if (family == AF_INET6) {
		t->local = (struct ez_addr){ { l0, l1, l2, l3 } };
		t->remote = (struct ez_addr){ { r0, r1, r2, r3 } };
	} else {
		return false;
	}
	/* local_port is host order; remote_port is network order in the high half. */
	t->local_port = ops->local_port;
	t->remote_port = bpf_ntohl(ops->remote_port);
	t->netns = bpf_get_netns_cookie(ops);
	return true;
}

/* Remember which netns an enrolled (non-loopback) address lives in, so that
 * loopback flows inside that pod are in scope too. */
static __always_inline void learn_netns(struct ez_tuple *t, bool local_enrolled)
{
	if (local_enrolled && !loopback(&t->local))
		bpf_map_update_elem(&ez_netns, &t->netns, &t->local, BPF_ANY);
}

/*
 * In scope: either end is an enrolled endpoint, or it is a loopback flow in a
 * netns where an enrolled address lives (loopback inside an enrolled pod).
 */
static __always_inline bool in_scope(struct ez_tuple *t, bool local_enrolled)
{
	if (local_enrolled || enrolled(&t->remote))
		return true;
	if (!loopback(&t->local) || !loopback(&t->remote))
		return false;
	struct ez_addr *owner = bpf_map_lookup_elem(&ez_netns, &t->netns);

	return owner && enrolled(owner);
}

/* The index key of kind `kind` for an active socket with tuple `t` (a passive
 * socket looks up its mirrored tuple, whose snd/rcv are swapped likewise). */
static __always_inline void index_key(struct ez_index_key *k, struct ez_tuple *t, __u32 kind)
{
	__builtin_memset(k, 0, sizeof(*k));
	k->kind = kind;
	k->local = t->local;
	if (kind == EZ_IDX_HANDSHAKE) {
		/* No ports: NAT may remap them; the sequence numbers it never rewrites. */
		k->netns = t->netns;
		k->hs_client_nxt = t->snd_nxt;
		k->hs_server_nxt = t->rcv_nxt;
		return;
	}
	k->local_port = t->local_port;
	k->remote = t->remote;
	k->remote_port = t->remote_port;
	if (kind == EZ_IDX_NETNS_MIRROR)
		k->netns = t->netns;
}

/*
 * Publish one index key, or join it as a further claimant, which marks it
 * ambiguous. The entry lives until its last claimant closed, so no socket can
 * publish a clean entry for a key that another live socket tried to publish.
 * Returns the claim bit the socket now holds (0: none).
 */
static __always_inline __u8 publish(struct ez_tuple *t, __u32 kind, __u64 cookie)
{
	struct ez_index_value v = { .cookie = cookie, .claims = 1 };
	struct ez_index_key k;
	struct ez_index_value *old;
	__u32 n;

	index_key(&k, t, kind);
	for (int i = 0; i < 3; i++) {
		if (!bpf_map_update_elem(&ez_index, &k, &v, BPF_NOEXIST))
			return 1 << kind;
		old = bpf_map_lookup_elem(&ez_index, &k);
		if (!old)
			continue; /* its last claimant deleted it meanwhile: publish afresh */
		old->ambiguous = 1;
		/* A count of 0 means its last claimant is deleting it: never revive it. */
		n = old->claims;
		if (n && __sync_val_compare_and_swap(&old->claims, n, n + 1) == n)
			return 1 << kind;
	}
	/* Map full, or a dying entry we could not replace: this socket is not
	 * findable through this key; the handshake check covers the rest. */
	return 0;
}

/* Drop this socket's claims; the last claimant of a key deletes its entry. */
static __always_inline void unpublish(struct ez_sock_info *info)
{
	struct ez_tuple t = {
		.local = info->local,
		.remote = info->remote,
		.local_port = info->local_port,
		.remote_port = info->remote_port,
		.netns = info->netns,
		.snd_nxt = info->hs_snd_nxt,
		.rcv_nxt = info->hs_rcv_nxt,
	};
	struct ez_index_key k;
	struct ez_index_value *v;

	for (__u32 kind = EZ_IDX_NETNS_MIRROR; kind <= EZ_IDX_CROSS_MIRROR; kind++) {
		if (!(info->index_claims & (1 << kind)))
			continue;
		index_key(&k, &t, kind);
		v = bpf_map_lookup_elem(&ez_index, &k);
		/* Our claim kept the entry alive, so it is the one we claimed. */
		if (v && __sync_fetch_and_add(&v->claims, -1) == 1)
			bpf_map_delete_elem(&ez_index, &k);
	}
}

static __always_inline struct ez_sock_info *new_info(struct ez_tuple *t, __u64 cookie,
						     __u8 active)
{
	struct ez_sock_info info = {
		.state = EZ_UNPAIRED,
		.netns = t->netns,
		.local = t->local,
		.remote = t->remote,
		.local_port = t->local_port,
		.remote_port = t->remote_port,
		.active = active,
		.hs_snd_nxt = t->snd_nxt,
		.hs_rcv_nxt = t->rcv_nxt,
	};

	if (bpf_map_update_elem(&ez_sockinfo, &cookie, &info, BPF_NOEXIST))
		return NULL;
	return bpf_map_lookup_elem(&ez_sockinfo, &cookie);
}

static __always_inline bool remember_cookie(struct bpf_sock_ops *ops, __u64 cookie)
{
	struct bpf_sock *sk = ops->sk;
	__u64 *slot;

	if (!sk)
		return false;
	slot = bpf_sk_storage_get(&ez_skcookie, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!slot)
		return false;
	*slot = cookie;
	return true;
}

/* From `from` to TCP for good; the time lets the peer know when it may leave. */
static __always_inline bool taint_from(struct ez_sock_info *info, __u32 from)
{
	if (__sync_val_compare_and_swap(&info->state, from, EZ_TAINTED) != from)
		return false;
	info->tainted_ns = bpf_ktime_get_ns();
	return true;
}

/* From whatever state to TCP for good: every state may go there. A pairing that
 * completed since the caller looked is simply ended (redirect -> TCP keeps order). */
static __always_inline void taint_now(struct ez_sock_info *info)
{
	__u32 old = __sync_lock_test_and_set(&info->state, EZ_TAINTED);

	if (old == EZ_TAINTED)
		return;
	info->tainted_ns = bpf_ktime_get_ns();
	if (old == EZ_PAIRED)
		count(EZ_CNT_TAINTED, 1);
}

static __always_inline void taint(struct ez_sock_info *info)
{
	if (taint_from(info, EZ_PAIRED))
		count(EZ_CNT_TAINTED, 1);
}

/* sk_user_data carries flag bits below the psock pointer (SK_USER_DATA_PTRMASK). */
#define EZ_USER_DATA_PTRMASK (~7UL)

/* Redirected bytes queued unread on a socket; -1 when unknown. Probe reads only. */
static __always_inline long queued_on(__u64 sk_addr, __u32 *rcvbuf)
{
	struct sock *sk = (struct sock *)(unsigned long)sk_addr;
	struct sk_psock *psock;

	if (!sk || !bpf_core_field_exists(struct sk_psock, msg_tot_len))
		return -1;
	psock = (struct sk_psock *)((unsigned long)BPF_CORE_READ(sk, sk_user_data) &
				    EZ_USER_DATA_PTRMASK);
	if (!psock)
		return -1;
	if (rcvbuf)
		*rcvbuf = BPF_CORE_READ(sk, sk_rcvbuf);
	return BPF_CORE_READ(psock, msg_tot_len);
}

/* Callbacks of registered sockets: close cleans up, ACKs let a tainted one leave. */
#define EZ_CB_FLAGS (BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_RTT_CB_FLAG)

/* ---- sockops --------------------------------------------------------- */

/* connect() side: register and publish so the accept() side can find us. */
static __always_inline void on_active(struct bpf_sock_ops *ops, struct ez_tuple *t)
{
	__u64 cookie = bpf_get_socket_cookie(ops);
	struct ez_sock_info *info;

	info = new_info(t, cookie, 1);
	if (!info || !remember_cookie(ops, cookie)) {
		count(EZ_NP_MAP_FULL, 1);
		if (info)
			bpf_map_delete_elem(&ez_sockinfo, &cookie);
		return;
	}
	info->sk_addr = (__u64)(unsigned long)ops->sk;
	if (bpf_sock_hash_update(ops, &ez_socks, &cookie, BPF_NOEXIST)) {
		/* Not in the sockhash: sk_msg never sees it, so it must never pair. It
		 * needs the close callback only: RTT callbacks would run on every ACK
		 * of its whole life, and could never let it leave a map it is not in. */
		taint_from(info, EZ_UNPAIRED);
		bpf_sock_ops_cb_flags_set(ops, BPF_SOCK_OPS_STATE_CB_FLAG);
		count(EZ_NP_MAP_FULL, 1);
		return;
	}
	/* Close callbacks clean the side tables (the kernel only cleans the sockhash). */
	bpf_sock_ops_cb_flags_set(ops, EZ_CB_FLAGS);
	info->index_claims |= publish(t, EZ_IDX_NETNS_MIRROR, cookie);
	info->index_claims |= publish(t, EZ_IDX_HANDSHAKE, cookie);
	if (enrolled(&t->local) && enrolled(&t->remote))
		info->index_claims |= publish(t, EZ_IDX_CROSS_MIRROR, cookie);
	count(EZ_CNT_ACTIVE_REGISTERED, 1);
}

/* Find the active socket this accept() socket should be paired with: the first
 * rule whose key exists decides. The caller still checks the handshake. */
static __always_inline __u64 find_peer(struct ez_tuple *t, __u32 *rule, __u32 *reason)
{
	struct ez_tuple mirror = {
		.local = t->remote,
		.remote = t->local,
		.local_port = t->remote_port,
		.remote_port = t->local_port,
		.netns = t->netns,
		.snd_nxt = t->rcv_nxt,
		.rcv_nxt = t->snd_nxt,
	};
	struct ez_index_key k;
	struct ez_index_value *v;
	__u32 port = t->local_port;

	/* 1. Same netns, exact mirror. */
	index_key(&k, &mirror, EZ_IDX_NETNS_MIRROR);
	v = bpf_map_lookup_elem(&ez_index, &k);
	if (v) {
		*rule = EZ_RULE_NETNS_MIRROR;
		goto found;
	}
	/* 2. Same netns, capture port: REDIRECT rewrote the destination (and maybe
	 * the client's port), so look the handshake up from the client's address. */
	if (bpf_map_lookup_elem(&ez_ports, &port)) {
		index_key(&k, &mirror, EZ_IDX_HANDSHAKE);
		v = bpf_map_lookup_elem(&ez_index, &k);
		if (v) {
			*rule = EZ_RULE_CAPTURE;
			goto found;
		}
	}
	/* 3. Different netns, exact mirror, both ends enrolled. */
	index_key(&k, &mirror, EZ_IDX_CROSS_MIRROR);
	v = bpf_map_lookup_elem(&ez_index, &k);
	if (!v) {
		*reason = EZ_NP_NO_PEER;
		return 0;
	}
	if (!enrolled(&t->local) || !enrolled(&t->remote)) {
		*reason = EZ_NP_PEER_NOT_ENROLLED;
		return 0;
	}
	*rule = EZ_RULE_CROSS_MIRROR;
found:
	if (v->ambiguous) {
		*reason = EZ_NP_AMBIGUOUS;
		return 0;
	}
	return v->cookie;
}

/* Why a candidate in state `state` can no longer be ours. */
static __always_inline __u32 busy_reason(__u32 state)
{
	return state == EZ_TAINTED ? EZ_NP_TAINTED : EZ_NP_PEER_TAKEN;
}

/* accept() side: pair with the registered active socket, or leave untouched. */
static __always_inline void on_passive(struct bpf_sock_ops *ops, struct ez_tuple *t)
{
	__u32 rule = EZ_RULE_NONE, reason = EZ_NP_NO_PEER, state;
	struct ez_sock_info *mine, *peer;
	__u64 cookie, peer_cookie;

	/* Bytes already arrived over TCP (Fast Open): redirecting would reorder. */
	if (ops->bytes_received) {
		count(EZ_NP_DATA_BEFORE_PAIRING, 1);
		return;
	}
	peer_cookie = find_peer(t, &rule, &reason);
	if (!peer_cookie) {
		count(reason, 1);
		return;
	}
	peer = bpf_map_lookup_elem(&ez_sockinfo, &peer_cookie);
	if (!peer) {
		count(EZ_NP_PEER_MISSING, 1);
		return;
	}
	/* The proof: the two ends of one connection hold its two sequence numbers,
	 * crosswise, and no NAT rewrites them. Nothing else is ever paired. */
	if (peer->hs_snd_nxt != t->rcv_nxt || peer->hs_rcv_nxt != t->snd_nxt) {
		count(EZ_NP_HANDSHAKE_MISMATCH, 1);
		return;
	}
	state = peer->state;
	if (state != EZ_UNPAIRED) {
		count(busy_reason(state), 1);
		return;
	}
	cookie = bpf_get_socket_cookie(ops);
	mine = new_info(t, cookie, 0);
	if (!mine || !remember_cookie(ops, cookie)) {
		count(EZ_NP_MAP_FULL, 1);
		if (mine)
			bpf_map_delete_elem(&ez_sockinfo, &cookie);
		return;
	}
	mine->sk_addr = (__u64)(unsigned long)ops->sk;
	if (bpf_sock_hash_update(ops, &ez_socks, &cookie, BPF_NOEXIST)) {
		taint_from(mine, EZ_UNPAIRED);
		bpf_sock_ops_cb_flags_set(ops, BPF_SOCK_OPS_STATE_CB_FLAG);
		count(EZ_NP_MAP_FULL, 1);
		return;
	}
	bpf_sock_ops_cb_flags_set(ops, EZ_CB_FLAGS);
	/* One winner per active socket: only the passive socket that moves it
	 * UNPAIRED -> CLAIMED ever writes its peer fields. */
	state = __sync_val_compare_and_swap(&peer->state, EZ_UNPAIRED, EZ_CLAIMED);
	if (state != EZ_UNPAIRED) {
		taint_from(mine, EZ_UNPAIRED);
		count(busy_reason(state), 1);
		return;
	}
	/* The peer's sk_msg reads these only once it sees PAIRED. */
	peer->peer_cookie = cookie;
	peer->peer_sk_addr = mine->sk_addr;
	peer->rule = rule;
	if (__sync_val_compare_and_swap(&peer->state, EZ_CLAIMED, EZ_PAIRED) != EZ_CLAIMED) {
		/* Its first byte went through TCP meanwhile (CLAIMED -> TAINTED): nothing
		 * was redirected either way, so neither side waits for the other. */
		peer->peer_cookie = 0;
		peer->peer_sk_addr = 0;
		peer->rule = EZ_RULE_NONE;
		taint_from(mine, EZ_UNPAIRED);
		count(EZ_NP_TAINTED, 1);
		return;
	}
	/* Our own sk_msg cannot run before this callback returns (socket lock). */
	mine->peer_cookie = peer_cookie;
	mine->peer_sk_addr = peer->sk_addr;
	mine->rule = rule;
	__sync_val_compare_and_swap(&mine->state, EZ_UNPAIRED, EZ_PAIRED);
	count(EZ_CNT_PAIRS, 1);
	count(EZ_CNT_PAIRS + rule, 1);
}

/*
 * TCP_REPAIR (CAP_NET_ADMIN in the socket's netns) "connects" without a
 * handshake, with sequence numbers of the caller's choosing, and still fires
 * ACTIVE_ESTABLISHED: such a socket proves nothing and is never registered.
 * Unknown counts as repair.
 */
static __always_inline bool repair_mode(struct bpf_sock_ops *ops)
{
	struct bpf_sock *sk = ops->sk;
	struct tcp_sock *tp;

	if (!sk)
		return true;
	tp = bpf_skc_to_tcp_sock(sk);
	if (!tp)
		return true;
	return BPF_CORE_READ_BITFIELD(tp, repair);
}

/*
 * A socket on TCP for good still pays for the sk_msg path while it sits in the
 * sockhash (about half of plain TCP's throughput here). It leaves once nothing can
 * arrive on its redirect queue any more: the queue is empty and its peer (if any)
 * stopped redirecting long enough ago. Leaving drops the queue, hence the checks.
 */
static __always_inline void on_ack(struct bpf_sock_ops *ops)
{
	__u64 cookie = bpf_get_socket_cookie(ops);
	struct ez_sock_info *info = bpf_map_lookup_elem(&ez_sockinfo, &cookie);
	struct ez_sock_info *peer;
	__u64 peer_cookie;

	if (!info || info->state != EZ_TAINTED)
		return;
	peer_cookie = info->peer_cookie;
	peer = peer_cookie ? bpf_map_lookup_elem(&ez_sockinfo, &peer_cookie) : NULL;
	if (peer && peer->peer_cookie == cookie &&
	    (peer->state != EZ_TAINTED ||
	     bpf_ktime_get_ns() - peer->tainted_ns < EZ_UNSPLICE_GRACE_NS))
		return;
	if (queued_on(info->sk_addr, NULL) != 0)
		return;
	if (bpf_map_delete_elem(&ez_socks, &cookie) == 0)
		count(EZ_CNT_UNSPLICED, 1);
	bpf_sock_ops_cb_flags_set(ops, BPF_SOCK_OPS_STATE_CB_FLAG);
}

static __always_inline void on_close(struct bpf_sock_ops *ops)
{
	__u64 cookie = bpf_get_socket_cookie(ops);
	struct ez_sock_info *info = bpf_map_lookup_elem(&ez_sockinfo, &cookie);

	if (!info)
		return;
	unpublish(info);
	bpf_map_delete_elem(&ez_sockinfo, &cookie);
	count(EZ_CNT_SOCKETS_CLOSED, 1);
}

SEC("sockops")
int ez_sockops(struct bpf_sock_ops *ops)
{
	struct ez_tuple t = {};
	__u32 op = ops->op;
	bool local_enrolled;

	if (op == BPF_SOCK_OPS_STATE_CB) {
		if (ops->args[1] == BPF_TCP_CLOSE)
			on_close(ops);
		return 1;
	}
	if (op == BPF_SOCK_OPS_RTT_CB) {
		count(EZ_CNT_ACK_CALLBACKS, 1);
		on_ack(ops);
		return 1;
	}
	if (op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB && op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		return 1;
	if (!read_tuple(ops, &t))
		return 1;
	count(EZ_CNT_SOCKETS_SEEN, 1);
	if (!enabled()) {
		count(EZ_NP_DISABLED, 1);
		return 1;
	}
	local_enrolled = enrolled(&t.local);
	learn_netns(&t, local_enrolled);
	if (!in_scope(&t, local_enrolled)) {
		count(EZ_NP_OUT_OF_SCOPE, 1);
		return 1;
	}
	if (repair_mode(ops)) {
		count(EZ_NP_TCP_REPAIR, 1);
		return 1;
	}
	if (op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
		on_active(ops, &t);
	else
		on_passive(ops, &t);
	return 1;
}

/* ---- sk_msg ---------------------------------------------------------- */

/*
 * The kernel queues redirected bytes on the peer without looking at its receive
 * buffer: with a slower reader (a proxy doing TLS) the queue would grow until the
 * node's TCP memory runs out and the writer gets ENOMEM. True when the peer holds
 * more unread redirected bytes than the larger of its receive buffer and the
 * configured limit. If the peer was freed meanwhile, the redirect itself misses
 * and the socket falls back anyway.
 */
static __always_inline bool peer_backlogged(struct ez_sock_info *info, __u32 limit)
{
	__u32 rcvbuf = 0;
	long queued = queued_on(info->peer_sk_addr, &rcvbuf);

	if (rcvbuf > limit)
		limit = rcvbuf;
	return queued > (long)limit;
}

SEC("sk_msg")
int ez_msg(struct sk_msg_md *msg)
{
	struct bpf_sock *sk = msg->sk;
	struct ez_sock_info *info, *peer_info;
	struct ez_config *cfg;
	__u64 *cookie, peer;
	__u32 state;
	long ret;

	if (!sk)
		return SK_PASS;
	cookie = bpf_sk_storage_get(&ez_skcookie, sk, 0, 0);
	if (!cookie)
		return SK_PASS;
	info = bpf_map_lookup_elem(&ez_sockinfo, cookie);
	if (!info)
		return SK_PASS;
	/* First byte before pairing (UNPAIRED, or CLAIMED by a passive socket that
	 * has not finished): this socket goes through TCP for good, and the pairing's
	 * last compare-and-swap fails. The plain read keeps the locked exchange off
	 * the per-message path of paired sockets. */
	state = info->state;
	if (state == EZ_UNPAIRED || state == EZ_CLAIMED) {
		taint_now(info);
		goto pass;
	}
	if (state != EZ_PAIRED)
		goto pass;
	/* Kill switch: once through TCP, never back (the peer reads its queue first). */
	cfg = get_config();
	if (!cfg || !cfg->enabled) {
		taint(info);
		goto pass;
	}
	/* Backpressure: TCP's flow control takes over from here, in order. */
	peer = info->peer_cookie;
	if (peer_backlogged(info, cfg->backlog_limit)) {
		/* Both directions go to TCP, so both sockets can leave the sockhash. */
		taint(info);
		peer_info = bpf_map_lookup_elem(&ez_sockinfo, &peer);
		if (peer_info)
			taint(peer_info);
		count(EZ_CNT_BACKLOG_FALLBACKS, 1);
		goto pass;
	}
	ret = bpf_msg_redirect_hash(msg, &ez_socks, &peer, BPF_F_INGRESS);
	if (ret != SK_PASS) {
		/* The peer left the sockhash (closed): plain TCP from now on. */
		taint(info);
		count(EZ_CNT_REDIRECT_MISSES, 1);
		goto pass;
	}
	__sync_fetch_and_add(&info->bytes_out, msg->size);
	__sync_fetch_and_add(&info->msgs_out, 1);
	count(EZ_CNT_MSGS_REDIRECTED, 1);
	count(EZ_CNT_BYTES_REDIRECTED, msg->size);
	return SK_PASS;
pass:
	count(EZ_CNT_MSGS_PASSED, 1);
	return SK_PASS;
}

/*
 * No-op stream verdict. Attached only where the kernel loses epoll wakeups for
 * sockets in a sockhash without an SK_SKB program (docs/dataplane.md, "Kernel
 * pitfalls checked by tests").
 */
SEC("sk_skb/stream_verdict")
int ez_skb_verdict(struct __sk_buff *skb)
{
	return SK_PASS;
}
