/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/*
 * Every struct and constant shared between the BPF programs and user space.
 * src/eztunnel_plugin/bpf/layout.py mirrors this file; tests/test_layout.py checks
 * both against the BTF of the compiled object, so they cannot drift.
 */
#ifndef EZTUNNEL_H
#define EZTUNNEL_H

/* Bump whenever a map's key/value layout or meaning changes. */
enum ez_layout {
	EZ_LAYOUT_VERSION = 4,
};

/* Map sizes (pinned maps cannot be resized: part of the layout). */
enum ez_limits {
	EZ_MAX_SOCKETS = 65536,
	EZ_MAX_INDEX = 131072,
	EZ_MAX_ENDPOINTS = 16384,
	EZ_MAX_NETNS = 4096,
	EZ_MAX_CAPTURE_PORTS = 64,
};

/*
 * Per-socket pairing state; only ever changed atomically: compare-and-swap, or an
 * exchange to TAINTED, which every state may go to (docs/dataplane.md, "State machine").
 * Once paired, the state is that of one direction: this socket -> its peer.
 *   active:  UNPAIRED -> CLAIMED -> PAIRED, and UNPAIRED or CLAIMED -> TAINTED
 *   passive: UNPAIRED -> PAIRED, and UNPAIRED -> TAINTED
 *   paired:  PAIRED <-> TCP_PAIRED (backlog fallback, proven resume), either -> TAINTED
 */
enum ez_sock_state {
	EZ_UNPAIRED = 0,   /* no byte sent yet, may still be paired */
	EZ_TAINTED = 1,    /* bytes went (or go) through TCP: never redirect again */
	EZ_PAIRED = 2,     /* every byte goes straight to the peer socket */
	EZ_CLAIMED = 3,    /* one passive socket won this one and writes its peer fields */
	EZ_TCP_PAIRED = 4, /* paired, this direction on TCP until the peer provably drained it */
};

/* ez_sock_info.flags */
enum ez_sock_flags {
	EZ_SF_BYPASS = 1 << 0,     /* the peer's reader took TCP bytes past unread redirected ones */
	EZ_SF_PEER_KNOWN = 1 << 1, /* the peer's receive path was looked at (first message) */
	EZ_SF_NO_RESUME = 1 << 2,  /* ... and a fallback can never come back from it */
	EZ_SF_LAGGED = 1 << 3,     /* fell back once: the peer's queue stays in half its buffer */
	/* The verdict program's view of this socket's TCP receive stream (rx_next). */
	EZ_SF_RX_SEQ = 1 << 4,       /* rx_next is set */
	EZ_SF_RX_TRIMMED = 1 << 5,   /* a segment repeated bytes already handed on: trimmed */
	EZ_SF_RX_UNTRIMMED = 1 << 6, /* ... and one could not be trimmed: bytes went twice */
};

/* ez_config.flags */
enum ez_config_flags {
	EZ_CFG_NO_RESUME = 1 << 0, /* a backlog fallback is for good (the behaviour of layout 3) */
};

/* Which candidate rule paired a socket (docs/dataplane.md, "Pairing"). */
enum ez_rule {
	EZ_RULE_NONE = 0,
	EZ_RULE_NETNS_MIRROR = 1, /* same netns, exact mirrored tuple */
	EZ_RULE_CAPTURE = 2,      /* same netns, capture port, found by handshake */
	EZ_RULE_CROSS_MIRROR = 3, /* different netns, unambiguous mirror */
};

/* Kinds of pairing-index entries an active socket publishes. */
enum ez_index_kind {
	EZ_IDX_NETNS_MIRROR = 1, /* netns + exact tuple */
	EZ_IDX_HANDSHAKE = 2,    /* netns + client address + both sequence numbers, no ports */
	EZ_IDX_CROSS_MIRROR = 3, /* exact tuple, any netns */
};

/* Per-CPU counters; names after the EZ_CNT_ / EZ_NP_ prefix are API. */
enum ez_counter {
	EZ_CNT_SOCKETS_SEEN = 0,
	EZ_CNT_ACTIVE_REGISTERED,
	EZ_CNT_PAIRS,
	EZ_CNT_PAIRS_NETNS_MIRROR,
	EZ_CNT_PAIRS_CAPTURE,
	EZ_CNT_PAIRS_CROSS_MIRROR,
	EZ_CNT_MSGS_REDIRECTED,
	EZ_CNT_BYTES_REDIRECTED,
	EZ_CNT_MSGS_PASSED,
	EZ_CNT_REDIRECT_MISSES,
	EZ_CNT_TAINTED,
	EZ_CNT_SOCKETS_CLOSED,
	EZ_CNT_BACKLOG_FALLBACKS, /* a direction went to TCP: the peer had too much queued */
	EZ_CNT_UNSPLICED,         /* sockets back on plain TCP: out of the sockhash for good */
	/* One counter per reason a socket was not paired. */
	EZ_NP_DISABLED,
	EZ_NP_OUT_OF_SCOPE,
	EZ_NP_NO_PEER,
	EZ_NP_AMBIGUOUS,
	EZ_NP_PEER_NOT_ENROLLED,
	EZ_NP_TAINTED,
	EZ_NP_DATA_BEFORE_PAIRING,
	EZ_NP_MAP_FULL,
	/* Appended in layout 3 (earlier values keep their meaning). */
	EZ_CNT_ACK_CALLBACKS,     /* RTT callbacks run: registered sockets still in the sockhash */
	EZ_NP_TCP_REPAIR,         /* TCP_REPAIR socket: its sequence numbers prove nothing */
	EZ_NP_PEER_MISSING,       /* the index named a socket whose state is gone */
	EZ_NP_HANDSHAKE_MISMATCH, /* the candidate's sequence numbers are not ours */
	EZ_NP_PEER_TAKEN,         /* another passive socket claimed the candidate first */
	/* Appended in layout 4: resumable splice, per direction. */
	EZ_CNT_RESUMES,           /* a direction went back from TCP to redirecting */
	EZ_CNT_BYTES_TCP_PAIRED,  /* bytes a paired socket sent through TCP (fallback, terminal) */
	EZ_CNT_RESUME_WAIT_DRAIN, /* resume checks: the peer had not consumed every TCP byte */
	EZ_CNT_RESUME_WAIT_QUIET, /* resume checks: a reader of the peer may be on the TCP path */
	EZ_CNT_BYPASS_READERS,    /* the peer's reader bypasses its redirect queue: for good */
	EZ_CNT_MAX,
};

/* Endpoint flags (user space fills the endpoint map from xDS). */
enum ez_endpoint_flags {
	EZ_EP_ENROLLED = 1 << 0, /* in-mesh pod on this node: may be spliced */
};

/* An IPv6 address, or IPv4 as v4-mapped IPv6 (::ffff:a.b.c.d), network order. */
struct ez_addr {
	__u32 a[4];
};

struct ez_endpoint {
	__u32 flags; /* enum ez_endpoint_flags */
	__u32 reserved;
};

/* Global switches, ARRAY map with one entry. */
struct ez_config {
	__u32 enabled;        /* 0: kill switch, pass everything, pair nothing */
	__u32 layout_version; /* written at install, checked on reuse */
	__u32 backlog_limit;  /* bytes a peer may hold unread before TCP takes over */
	__u32 flags;          /* enum ez_config_flags */
};

/*
 * Pairing index key, always from the active socket's point of view; unused
 * fields are 0. NETNS_MIRROR: netns + tuple; CROSS_MIRROR: tuple; HANDSHAKE:
 * netns, local (the client's address) and both sequence numbers. Ports host order.
 */
struct ez_index_key {
	__u64 netns;
	struct ez_addr local;
	struct ez_addr remote;
	__u16 local_port;
	__u16 remote_port;
	__u32 kind;          /* enum ez_index_kind */
	__u32 hs_client_nxt; /* HANDSHAKE: the client's ISN + 1 */
	__u32 hs_server_nxt; /* HANDSHAKE: the server's ISN + 1 */
};

struct ez_index_value {
	__u64 cookie;    /* first socket that published this key */
	__u32 ambiguous; /* a second socket claimed the same key: never pair */
	__u32 claims;    /* live sockets holding a claim on the key; 0: being deleted */
};

/* Per-socket state, keyed by socket cookie; reachable from the peer's sockops. */
struct ez_sock_info {
	__u32 state; /* enum ez_sock_state */
	__u32 rule;  /* enum ez_rule, set when paired */
	__u64 peer_cookie;
	__u64 netns;
	__u64 bytes_out; /* bytes redirected from this socket to its peer */
	__u64 msgs_out;
	struct ez_addr local;
	struct ez_addr remote;
	__u16 local_port;  /* host order */
	__u16 remote_port; /* host order */
	__u8 active;       /* 1: connect() side */
	__u8 index_claims; /* bit (1 << kind): this socket holds a claim on that index key */
	__u8 reserved[2];
	__u64 sk_addr;      /* this socket's struct sock, for its peer's backlog check */
	__u64 peer_sk_addr; /* the peer's struct sock (only ever read with probe reads) */
	__u64 tainted_ns;   /* when the socket went to TCP for good (bpf_ktime_get_ns) */
	__u32 hs_snd_nxt;   /* snd_nxt when established: own ISN + 1 */
	__u32 hs_rcv_nxt;   /* rcv_nxt when established: the other end's ISN + 1 */
	/* Layout 4: this direction's TCP phases while paired (docs/dataplane.md,
	 * "Resumable splice"). */
	__u64 tcp_bytes;   /* bytes sent through TCP while paired */
	__u64 tcp_msgs;    /* messages sent through TCP while paired */
	__u64 fallback_ns; /* when this direction last went to TCP */
	__u32 fallbacks;   /* redirect -> TCP switches */
	__u32 resumes;     /* TCP -> redirect switches */
	__u32 flags;       /* enum ez_sock_flags */
	/* Sequence number after the last TCP byte the verdict program handed to the
	 * reader (with EZ_SF_RX_SEQ). Was reserved (zero) in layout 4's first programs,
	 * which never read it: the layout did not change. */
	__u32 rx_next;
};

/* A socket leaves the sockhash this long after its peer stopped redirecting to it:
 * longer than any redirect the peer may still have in flight. */
#define EZ_UNSPLICE_GRACE_NS 1000000000ULL

#endif /* EZTUNNEL_H */
