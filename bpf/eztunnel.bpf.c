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
 * compare-and-swap, see enum ez_sock_state), so bytes never reorder. A direction
 * whose reader lags goes to TCP and back to redirecting once that is proven safe
 * (docs/dataplane.md, "Resumable splice").
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
	enum ez_sock_flags sock_flags;
	enum ez_config_flags config_flags;
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
	if (old == EZ_PAIRED || old == EZ_TCP_PAIRED)
		count(EZ_CNT_TAINTED, 1);
}

/* A paired direction, redirecting or in a TCP phase, to TCP for good. */
static __always_inline void taint(struct ez_sock_info *info)
{
	if (taint_from(info, EZ_PAIRED) || taint_from(info, EZ_TCP_PAIRED))
		count(EZ_CNT_TAINTED, 1);
}

/* sk_user_data carries flag bits below the psock pointer (SK_USER_DATA_PTRMASK); a
 * psock is marked SK_USER_DATA_PSOCK. */
#define EZ_USER_DATA_PTRMASK (~7UL)
#define EZ_USER_DATA_PSOCK 4UL

/* A socket's psock (it is in a sockhash), or NULL. Probe reads only. */
static __always_inline struct sk_psock *psock_of(struct sock *sk)
{
	unsigned long data = (unsigned long)BPF_CORE_READ(sk, sk_user_data);

	if (!(data & EZ_USER_DATA_PSOCK))
		return NULL;
	return (struct sk_psock *)(data & EZ_USER_DATA_PTRMASK);
}

/* Redirected bytes queued unread on a socket; -1 when unknown. Probe reads only. */
static __always_inline long queued_on(__u64 sk_addr, __u32 *rcvbuf)
{
	struct sock *sk = (struct sock *)(unsigned long)sk_addr;
	struct sk_psock *psock;

	if (!sk || !bpf_core_field_exists(struct sk_psock, msg_tot_len))
		return -1;
	psock = psock_of(sk);
	if (!psock)
		return -1;
	if (rcvbuf)
		*rcvbuf = BPF_CORE_READ(sk, sk_rcvbuf);
	return BPF_CORE_READ(psock, msg_tot_len);
}

/* A receive path with a verdict program (stream or skb): the verdict moves TCP bytes
 * into the redirect queue, and readers read that queue only. */
static __always_inline bool verdict_rx(struct sk_psock *psock)
{
	if (BPF_CORE_READ(psock, progs.stream_verdict))
		return true;
	return bpf_core_field_exists(psock->progs.skb_verdict) &&
	       BPF_CORE_READ(psock, progs.skb_verdict);
}

/* Present where a reader of the redirect queue advances copied_seq by the TCP bytes it
 * reads only, not by redirected ones (the kernel's "incorrect copied_seq" fix). */
extern const void __sk_msg_recvmsg __ksym __weak;

/* Can a direction into this psock's socket come back from a TCP phase at all? With a
 * verdict program, TCP bytes reach the reader through the redirect queue too, and D's
 * copied_seq counts what the reader took of them only where __sk_msg_recvmsg exists:
 * elsewhere such a fallback stays for good (docs/dataplane.md, "Where it is off"). */
static __always_inline bool resumable_rx(struct sk_psock *psock)
{
	return !verdict_rx(psock) || &__sk_msg_recvmsg != 0;
}

/* Orders of loads that the checks below rely on hold on x86 (total store order);
 * BPF cannot ask for them elsewhere, so other architectures keep the stricter rule. */
#if defined(__TARGET_ARCH_x86)
#define EZ_RESUME_ARCH 1
#else
#define EZ_RESUME_ARCH 0
#endif

/* TCP bytes a verdict program took off the receive queue and has not yet moved into
 * the redirect queue (psock->ingress_skb, which the psock's work item empties: it
 * queues an skb's bytes, then unlinks it). Read before the redirect queue, so that an
 * skb moved in between is seen in one or the other. */
static __always_inline bool verdict_backlog(__u64 sk_addr)
{
	struct sk_psock *psock = psock_of((struct sock *)(unsigned long)sk_addr);

	if (!psock || !verdict_rx(psock))
		return false;
	if (!EZ_RESUME_ARCH)
		return true;
	return BPF_CORE_READ(psock, ingress_skb.qlen) != 0;
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
	if (verdict_backlog(info->sk_addr) || queued_on(info->sk_addr, NULL) != 0)
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

/* ---- sk_msg: backpressure ---------------------------------------------- */

/*
 * The kernel queues redirected bytes on the peer without looking at its receive
 * buffer: with a slower reader (a proxy doing TLS) the queue would grow until the
 * node's TCP memory runs out and the writer gets ENOMEM. So a direction goes to
 * TCP, whose flow control then holds the sender back, once the peer holds too many
 * unread redirected bytes. If the peer was freed meanwhile, the redirect itself
 * misses and the direction falls back for good anyway.
 *
 * Returns how many bytes of this message may be redirected: all of them, a first part
 * (the kernel runs the program again for the rest), or none (fall back).
 *
 * Resumable (the direction comes back, see below): the peer may hold at most the
 * limit. Once the direction has fallen back (its reader lags), at most half the
 * peer's receive buffer too: redirected bytes are charged to the peer's receive
 * memory and reading them sends no window update, so a fuller queue starves the TCP
 * phases that follow. Until then the whole limit serves: a reader that keeps up
 * takes messages of up to the limit without a fallback. For good (layout 3's rule):
 * the peer may hold more than the larger of the limit and its receive buffer, by a
 * message.
 */
#define EZ_MIN_SPLIT 4096 /* smaller first parts are not worth a second verdict */

static __always_inline __u32 redirect_room(struct ez_sock_info *info, __u32 limit, __u32 size,
					   bool resumable)
{
	__u32 rcvbuf = 0, room;
	long queued = queued_on(info->peer_sk_addr, &rcvbuf);

	if (!resumable) {
		if (rcvbuf > limit)
			limit = rcvbuf;
		return queued > (long)limit ? 0 : size;
	}
	if (queued < 0)
		return size; /* no psock: the redirect misses, which is for good */
	if ((info->flags & EZ_SF_LAGGED) && rcvbuf / 2 < limit)
		limit = rcvbuf / 2;
	if (queued >= (long)limit)
		return 0;
	room = limit - (__u32)queued;
	if (size <= room)
		return size;
	return room >= EZ_MIN_SPLIT ? room : 0;
}

/* ---- sk_msg: resumable splice ------------------------------------------ */

/*
 * A direction (this socket S -> its peer P) in a TCP phase goes back to redirecting
 * only when no reader of P can take a TCP byte of it after a redirected one
 * (docs/dataplane.md, "Resumable splice", has the proof). sk_msg runs under S's
 * socket lock, so S's write_seq is stable while we look; P is read with probe reads:
 *   D (drained): P.copied_seq == S.write_seq and P's TCP receive queue is empty: every
 *                byte S handed to TCP was consumed, nothing is in flight or queued;
 *   B (bypass):  P's redirect queue is empty too; if not while D holds, P's reader
 *                consumed TCP bytes past older redirected ones (splice(2), zero-copy
 *                receive): it never reads that queue, so this direction stays on TCP;
 *   Q (quiet):   P's socket lock is not owned and no task sleeps on P's wait queue in
 *                sk_wait_event (woken_wake_function): a reader inside the TCP receive
 *                path either owns P's lock or sleeps there.
 * D is read before Q; x86's total store order keeps that order, which BPF cannot ask
 * for elsewhere, so other architectures keep the fallback for good.
 *
 * Into a P with a verdict program (the SK_SKB workaround) only as resumable_rx() says,
 * and on D alone: its readers never read the TCP queue.
 */
/* Resolved from kallsyms by libbpf; 0 when the kernel hides addresses (then any wait
 * queue entry that names a task or poll table counts as a sleeping reader). */
extern const void woken_wake_function __ksym __weak;

#define EZ_WAITQ_MAX 8

/* No task sleeps on the socket's wait queue in sk_wait_event. Any fault, NULL, or a
 * list longer than EZ_WAITQ_MAX counts as "not quiet". */
static __always_inline bool waitq_quiet(struct sock *psk)
{
	unsigned long woken = (unsigned long)&woken_wake_function;
	struct socket_wq *wq = BPF_CORE_READ(psk, sk_wq);
	unsigned long head, p;

	if (!wq)
		return false;
	head = (unsigned long)wq + bpf_core_field_offset(struct socket_wq, wait) +
	       bpf_core_field_offset(struct wait_queue_head, head);
	p = (unsigned long)BPF_CORE_READ(wq, wait.head.next);
	for (int i = 0; i < EZ_WAITQ_MAX; i++) {
		struct wait_queue_entry *e;
		unsigned long func, priv;

		if (p == head)
			return true;
		if (!p)
			return false;
		e = (struct wait_queue_entry *)(p - bpf_core_field_offset(struct wait_queue_entry,
									 entry));
		func = (unsigned long)BPF_CORE_READ(e, func);
		priv = (unsigned long)BPF_CORE_READ(e, private);
		if (!func)
			return false;
		/* epoll entries (ep_poll_callback, no private) and poll/select entries
		 * (pollwake) consume nothing: their task reads later, through recvmsg. */
		if (woken ? func == woken : priv != 0)
			return false;
		p = (unsigned long)BPF_CORE_READ(e, entry.next);
	}
	return false;
}

enum ez_resume {
	EZ_R_WAIT = 0,   /* not now: stay on TCP, look again at the next message */
	EZ_R_YES = 1,    /* redirect this message */
	EZ_R_NEVER = 2,  /* this direction stays on TCP for good */
	EZ_R_BYPASS = 3, /* for good: the peer's reader bypasses its redirect queue */
};

/* What TCP's invariants make of D (copied_seq == write_seq): every byte received in
 * order, none in the backlog or out of order, every byte acknowledged. Each is implied;
 * each is checked, so that a kernel that keeps them otherwise waits instead of resuming. */
static __always_inline bool tcp_settled(struct tcp_sock *tp, struct sock *psk, __u32 wseq)
{
	struct tcp_sock *ptp = (struct tcp_sock *)psk;

	if (tp->snd_una != wseq || BPF_CORE_READ(ptp, rcv_nxt) != wseq)
		return false;
	if (BPF_CORE_READ(psk, sk_backlog.tail))
		return false;
	return !BPF_CORE_READ(ptp, out_of_order_queue.rb_node);
}

static __always_inline int may_resume(struct bpf_sock *sk, struct ez_sock_info *info)
{
	struct sock *psk = (struct sock *)(unsigned long)info->peer_sk_addr;
	struct sk_psock *psock;
	struct tcp_sock *tp;
	__u32 wseq, copied, qlen;

	if (!EZ_RESUME_ARCH || !psk)
		return EZ_R_NEVER;
	tp = bpf_skc_to_tcp_sock(sk);
	if (!tp)
		return EZ_R_NEVER;
	wseq = tp->write_seq; /* stable: our own socket lock is held */
	/* D */
	copied = BPF_CORE_READ((struct tcp_sock *)psk, copied_seq);
	qlen = BPF_CORE_READ(psk, sk_receive_queue.qlen);
	if (copied != wseq || qlen || !tcp_settled(tp, psk, wseq)) {
		count(EZ_CNT_RESUME_WAIT_DRAIN, 1);
		return EZ_R_WAIT;
	}
	psock = psock_of(psk);
	if (!psock || !bpf_core_field_exists(psock->msg_tot_len))
		return EZ_R_NEVER;
	if (!resumable_rx(psock))
		return EZ_R_NEVER;
	/* With a verdict program both kinds of bytes share the redirect queue, so B cannot
	 * tell a bypass; D there also waits for that queue and the verdict's backlog to empty.
	 * Q is not needed there: such a P's recvmsg (tcp_bpf_recvmsg_parser) reads the
	 * redirect queue only, never the TCP queue, so a reader asleep in it takes the next
	 * redirected byte behind every TCP byte it already consumed (D). */
	if (verdict_rx(psock)) {
		if (BPF_CORE_READ(psock, msg_tot_len) || BPF_CORE_READ(psock, ingress_skb.qlen)) {
			count(EZ_CNT_RESUME_WAIT_DRAIN, 1);
			return EZ_R_WAIT;
		}
		return EZ_R_YES;
	}
	/* B */
	if (BPF_CORE_READ(psock, msg_tot_len))
		return EZ_R_BYPASS;
	/* Q, read after D */
	if (BPF_CORE_READ(psk, sk_lock.owned) || !waitq_quiet(psk)) {
		count(EZ_CNT_RESUME_WAIT_QUIET, 1);
#ifndef EZ_TEST_UNSAFE_NO_QUIET /* only a test build ignores Q, to show what it prevents */
		return EZ_R_WAIT;
#endif
	}
	return EZ_R_YES;
}

/* A direction in a TCP phase: true when this message may be redirected again. A
 * direction that can never come back goes to TCP for good, so that both sockets can
 * leave the sockhash once neither redirects any more (see on_ack). */
static __always_inline bool try_resume(struct sk_msg_md *msg, struct ez_sock_info *info,
				       struct ez_config *cfg, __u64 cookie)
{
	struct ez_sock_info *peer_info;
	__u64 peer = info->peer_cookie;
	int r = EZ_R_NEVER;

	/* A missing peer (closed) or a stale pairing stays terminal. */
	peer_info = bpf_map_lookup_elem(&ez_sockinfo, &peer);
	if (peer_info && peer_info->peer_cookie == cookie && !(cfg->flags & EZ_CFG_NO_RESUME))
		r = may_resume(msg->sk, info);
	if (r == EZ_R_WAIT)
		return false;
	if (r == EZ_R_BYPASS) {
		__sync_fetch_and_or(&info->flags, EZ_SF_BYPASS);
		count(EZ_CNT_BYPASS_READERS, 1);
	}
	if (r != EZ_R_YES) {
		taint(info);
		return false;
	}
	if (__sync_val_compare_and_swap(&info->state, EZ_TCP_PAIRED, EZ_PAIRED) != EZ_TCP_PAIRED)
		return false;
	info->resumes++;
	count(EZ_CNT_RESUMES, 1);
	return true;
}

/* This direction's peer lags: to TCP, in order (the peer reads its redirect queue
 * first). Resumable, or for good in both directions (the rule of layout 3). */
static __always_inline void fall_back(struct ez_sock_info *info, bool resumable)
{
	struct ez_sock_info *peer_info;
	__u64 peer = info->peer_cookie;

	count(EZ_CNT_BACKLOG_FALLBACKS, 1);
	if (resumable) {
		if (__sync_val_compare_and_swap(&info->state, EZ_PAIRED, EZ_TCP_PAIRED) ==
		    EZ_PAIRED) {
			info->fallback_ns = bpf_ktime_get_ns();
			info->fallbacks++;
			if (!(info->flags & EZ_SF_LAGGED))
				__sync_fetch_and_or(&info->flags, EZ_SF_LAGGED);
		}
		return;
	}
	taint(info);
	peer_info = bpf_map_lookup_elem(&ez_sockinfo, &peer);
	if (peer_info)
		taint(peer_info);
}

/* Can a fallback of this direction come back? Not on other architectures, not when
 * configured off, and not into a peer that has no psock or has a verdict program
 * (looked at once: a socket keeps the psock and programs it joined the sockhash with). */
static __always_inline bool resumable(struct ez_sock_info *info, struct ez_config *cfg)
{
	struct sock *psk = (struct sock *)(unsigned long)info->peer_sk_addr;
	__u32 flags = info->flags;
	struct sk_psock *psock;

	if (!EZ_RESUME_ARCH || (cfg->flags & EZ_CFG_NO_RESUME))
		return false;
	if (!(flags & EZ_SF_PEER_KNOWN)) {
		psock = psk ? psock_of(psk) : NULL;
		flags = EZ_SF_PEER_KNOWN;
		if (!psock || !resumable_rx(psock))
			flags |= EZ_SF_NO_RESUME;
		__sync_fetch_and_or(&info->flags, flags);
	}
	return !(flags & EZ_SF_NO_RESUME);
}

/* ---- sk_msg ---------------------------------------------------------- */

SEC("sk_msg")
int ez_msg(struct sk_msg_md *msg)
{
	struct bpf_sock *sk = msg->sk;
	struct ez_sock_info *info;
	struct ez_config *cfg;
	__u32 state, room, size = msg->size;
	__u64 *cookie, peer;
	bool back;
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
	if (state != EZ_PAIRED && state != EZ_TCP_PAIRED) {
		/* TCP for good; a socket that was paired still pays the sk_msg path. */
		if (info->peer_cookie)
			goto tcp;
		goto pass;
	}
	/* Kill switch: once through TCP, never back (the peer reads its queue first). */
	cfg = get_config();
	if (!cfg || !cfg->enabled) {
		taint(info);
		goto tcp;
	}
	if (state == EZ_TCP_PAIRED && !try_resume(msg, info, cfg, *cookie))
		goto tcp;
	/* Backpressure: TCP's flow control takes over from here, in order. */
	back = resumable(info, cfg);
	room = redirect_room(info, cfg->backlog_limit, size, back);
	if (!room) {
		fall_back(info, back);
		goto tcp;
	}
	peer = info->peer_cookie;
	ret = bpf_msg_redirect_hash(msg, &ez_socks, &peer, BPF_F_INGRESS);
	if (ret != SK_PASS) {
		/* The peer left the sockhash (closed): plain TCP from now on. */
		taint(info);
		count(EZ_CNT_REDIRECT_MISSES, 1);
		goto tcp;
	}
	/* Only the first part fits: the rest of the message gets a verdict of its own. The
	 * kernel keeps the last value for every later verdict of this send, so always set it. */
	bpf_msg_apply_bytes(msg, room < size ? room : 0);
	__sync_fetch_and_add(&info->bytes_out, room);
	__sync_fetch_and_add(&info->msgs_out, 1);
	count(EZ_CNT_MSGS_REDIRECTED, 1);
	count(EZ_CNT_BYTES_REDIRECTED, room);
	return SK_PASS;
tcp:
	__sync_fetch_and_add(&info->tcp_bytes, size);
	__sync_fetch_and_add(&info->tcp_msgs, 1);
	count(EZ_CNT_BYTES_TCP_PAIRED, size);
pass:
	bpf_msg_apply_bytes(msg, 0); /* the whole rest, after a split */
	count(EZ_CNT_MSGS_PASSED, 1);
	return SK_PASS;
}

/* ---- sk_skb ---------------------------------------------------------- */

/* The kernel's sk_buff behind an __sk_buff (6.3+); NULL where it is missing. */
extern void *bpf_cast_to_kern_ctx(void *obj) __ksym __weak;

#define EZ_TCPHDR_SYN 0x02
/* bpf_skb_adjust_room() removes at most 0xfff bytes a call in an sk_skb program. */
#define EZ_TRIM_STEP 4095
#define EZ_TRIM_STEPS 32 /* 131,040 bytes: more than any 64 KiB GSO segment repeats */

/* Remove the first n bytes of skb; false if the kernel could not (memory). */
static __always_inline bool trim_head(struct __sk_buff *skb, __u32 n)
{
	for (int i = 0; i < EZ_TRIM_STEPS && n; i++) {
		__u32 step = n < EZ_TRIM_STEP ? n : EZ_TRIM_STEP;

		if (bpf_skb_adjust_room(skb, -(__s32)step, 0, 0))
			return false;
		n -= step;
	}
	return n == 0;
}

/*
 * The stream verdict: attached only where the kernel loses epoll wakeups for sockets
 * in a sockhash without an SK_SKB program (docs/kernel.md, "Lost epoll wakeups"). It
 * passes every TCP byte on to the socket's own reader, once.
 *
 * Once: the kernel's tcp_read_skb() hands the verdict whole skbs, and TCP queues a
 * retransmitted segment that starts before bytes it already has whole (its own
 * readers skip the repeated head by copied_seq). Passed as is, the reader gets those
 * bytes twice, and copied_seq runs ahead, so after the socket leaves the sockhash its
 * reader skips as many new bytes (docs/kernel.md, "Repeated bytes on the verdict
 * path"). So the program remembers where the last skb ended (rx_next) and cuts what
 * a new one repeats. The verdict runs under the socket's lock, one skb at a time.
 */
SEC("sk_skb/stream_verdict")
int ez_skb_verdict(struct __sk_buff *skb)
{
	__u64 cookie = bpf_get_socket_cookie(skb);
	struct ez_sock_info *info;
	struct tcp_skb_cb *cb;
	struct sk_buff *kskb;
	__u32 seq, end, next;
	__s32 repeated;

#ifdef EZ_TEST_NO_TRIM
	return SK_PASS; /* a test shows the kernel's repeat; production never sets this */
#endif
	if (!bpf_cast_to_kern_ctx)
		return SK_PASS; /* the self-test's repeated_bytes check fails such kernels */
	info = bpf_map_lookup_elem(&ez_sockinfo, &cookie);
	if (!info)
		return SK_PASS; /* registered sockets only are in the sockhash */
	kskb = bpf_cast_to_kern_ctx(skb);
	cb = (struct tcp_skb_cb *)kskb->cb;
	seq = cb->seq;
	if (cb->tcp_flags & EZ_TCPHDR_SYN)
		seq++; /* a SYN's data starts after it (fast open) */

	end = seq + skb->len;
	if (info->flags & EZ_SF_RX_SEQ) {
		next = info->rx_next;
	} else {
		/* First skb: nothing handed on yet, so the reader's copied_seq is where the
		 * stream stands (a reader may have taken part of this skb before). Probe
		 * reads through the address sockops recorded, as in the sk_msg program. */
		struct tcp_sock *tp = (struct tcp_sock *)(unsigned long)info->sk_addr;

		next = tp ? BPF_CORE_READ(tp, copied_seq) : seq;
	}
	repeated = (__s32)(next - seq);
	/* TCP never queues an skb that adds nothing, so repeated < len; a larger one
	 * would mean rx_next is wrong: pass it untouched rather than cut real bytes. */
	if (repeated > 0 && repeated < (__s32)skb->len)
		__sync_fetch_and_or(&info->flags, trim_head(skb, repeated) ? EZ_SF_RX_TRIMMED
									   : EZ_SF_RX_UNTRIMMED);
	info->rx_next = end;
	__sync_fetch_and_or(&info->flags, EZ_SF_RX_SEQ);
	return SK_PASS;
}
