"""Python mirror of bpf/eztunnel.h: map keys, values and constants.

tests/bpf/test_layout.py checks every size, offset and enum value here against
the BTF of the compiled object. Addresses convert through addr (one canonical text).
"""

from __future__ import annotations

import ctypes
import enum

from eztunnel_plugin import addr

LAYOUT_VERSION = 4

MAX_SOCKETS = 65536
MAX_INDEX = 131072
MAX_ENDPOINTS = 16384
MAX_NETNS = 4096
MAX_CAPTURE_PORTS = 64

DEFAULT_CAPTURE_PORTS = (15001,)
# Unread redirected bytes a peer may hold before its sender falls back to TCP:
# about what TCP buffers for one socket on a fast local path, and bounded.
DEFAULT_BACKLOG_LIMIT = 4 << 20


class SockState(enum.IntEnum):
    UNPAIRED = 0
    TAINTED = 1
    PAIRED = 2
    CLAIMED = 3  # an active socket a passive one won, for the instant it writes the pair
    TCP_PAIRED = 4  # paired; this direction on TCP until its peer provably drained it


class SockFlag(enum.IntFlag):
    """enum ez_sock_flags (SockInfo.flags)."""

    BYPASS = 1 << 0  # the peer's reader took TCP bytes past unread redirected ones
    PEER_KNOWN = 1 << 1  # the peer's receive path was looked at
    NO_RESUME = 1 << 2  # ... and a fallback can never come back from it
    LAGGED = 1 << 3  # fell back once: the peer's queue stays within half its buffer
    RX_SEQ = 1 << 4  # rx_next is set (the verdict program saw this socket's TCP bytes)
    RX_TRIMMED = 1 << 5  # a segment repeated bytes already handed on: trimmed
    RX_UNTRIMMED = 1 << 6  # ... and one could not be trimmed: bytes went twice


class ConfigFlag(enum.IntFlag):
    """enum ez_config_flags (Config.flags)."""

    NO_RESUME = 1 << 0  # a backlog fallback is for good (layout 3's behaviour)


class Rule(enum.IntEnum):
    NONE = 0
    NETNS_MIRROR = 1
    CAPTURE = 2
    CROSS_MIRROR = 3


class IndexKind(enum.IntEnum):
    NETNS_MIRROR = 1
    HANDSHAKE = 2
    CROSS_MIRROR = 3


class Counter(enum.IntEnum):
    """enum ez_counter; lower-cased names are the API names."""

    SOCKETS_SEEN = 0
    ACTIVE_REGISTERED = 1
    PAIRS = 2
    PAIRS_NETNS_MIRROR = 3
    PAIRS_CAPTURE = 4
    PAIRS_CROSS_MIRROR = 5
    MSGS_REDIRECTED = 6
    BYTES_REDIRECTED = 7
    MSGS_PASSED = 8
    REDIRECT_MISSES = 9
    TAINTED = 10
    SOCKETS_CLOSED = 11
    BACKLOG_FALLBACKS = 12
    UNSPLICED = 13
    NP_DISABLED = 14
    NP_OUT_OF_SCOPE = 15
    NP_NO_PEER = 16
    NP_AMBIGUOUS = 17
    NP_PEER_NOT_ENROLLED = 18
    NP_TAINTED = 19
    NP_DATA_BEFORE_PAIRING = 20
    NP_MAP_FULL = 21
    ACK_CALLBACKS = 22
    NP_TCP_REPAIR = 23
    NP_PEER_MISSING = 24
    NP_HANDSHAKE_MISMATCH = 25
    NP_PEER_TAKEN = 26
    RESUMES = 27
    BYTES_TCP_PAIRED = 28
    RESUME_WAIT_DRAIN = 29
    RESUME_WAIT_QUIET = 30
    BYPASS_READERS = 31


COUNTER_MAX = 32

EP_ENROLLED = 1 << 0


class Addr(ctypes.Structure):
    """struct ez_addr: IPv6, or IPv4 as v4-mapped IPv6, network byte order."""

    _fields_ = [("a", ctypes.c_uint8 * 16)]

    @classmethod
    def of(cls, ip: str) -> Addr:
        """The key of an address given as text (any spelling). Raises ValueError."""
        return cls.from_buffer_copy(addr.packed16(ip))

    def text(self) -> str:
        """Canonical text (addr.canonical's form)."""
        return addr.from_bytes(bytes(self.a))


class Endpoint(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint32), ("reserved", ctypes.c_uint32)]


class Config(ctypes.Structure):
    _fields_ = [
        ("enabled", ctypes.c_uint32),
        ("layout_version", ctypes.c_uint32),
        ("backlog_limit", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),  # ConfigFlag
    ]


class IndexKey(ctypes.Structure):
    _fields_ = [
        ("netns", ctypes.c_uint64),
        ("local", Addr),
        ("remote", Addr),
        ("local_port", ctypes.c_uint16),
        ("remote_port", ctypes.c_uint16),
        ("kind", ctypes.c_uint32),
        ("hs_client_nxt", ctypes.c_uint32),
        ("hs_server_nxt", ctypes.c_uint32),
    ]


class IndexValue(ctypes.Structure):
    _fields_ = [
        ("cookie", ctypes.c_uint64),
        ("ambiguous", ctypes.c_uint32),
        ("claims", ctypes.c_uint32),
    ]


class SockInfo(ctypes.Structure):
    _fields_ = [
        ("state", ctypes.c_uint32),
        ("rule", ctypes.c_uint32),
        ("peer_cookie", ctypes.c_uint64),
        ("netns", ctypes.c_uint64),
        ("bytes_out", ctypes.c_uint64),
        ("msgs_out", ctypes.c_uint64),
        ("local", Addr),
        ("remote", Addr),
        ("local_port", ctypes.c_uint16),
        ("remote_port", ctypes.c_uint16),
        ("active", ctypes.c_uint8),
        ("index_claims", ctypes.c_uint8),
        ("reserved", ctypes.c_uint8 * 2),
        ("sk_addr", ctypes.c_uint64),
        ("peer_sk_addr", ctypes.c_uint64),
        ("tainted_ns", ctypes.c_uint64),
        ("hs_snd_nxt", ctypes.c_uint32),
        ("hs_rcv_nxt", ctypes.c_uint32),
        # Layout 4: this direction's TCP phases while paired.
        ("tcp_bytes", ctypes.c_uint64),
        ("tcp_msgs", ctypes.c_uint64),
        ("fallback_ns", ctypes.c_uint64),
        ("fallbacks", ctypes.c_uint32),
        ("resumes", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),  # SockFlag
        ("rx_next", ctypes.c_uint32),  # verdict: seq after the last TCP byte handed on
    ]


# C struct name -> mirror, for the BTF check.
STRUCTS: dict[str, type[ctypes.Structure]] = {
    "ez_addr": Addr,
    "ez_endpoint": Endpoint,
    "ez_config": Config,
    "ez_index_key": IndexKey,
    "ez_index_value": IndexValue,
    "ez_sock_info": SockInfo,
}

# C enum name -> {C constant name: value}, for the BTF check.
ENUMS: dict[str, dict[str, int]] = {
    "ez_layout": {"EZ_LAYOUT_VERSION": LAYOUT_VERSION},
    "ez_limits": {
        "EZ_MAX_SOCKETS": MAX_SOCKETS,
        "EZ_MAX_INDEX": MAX_INDEX,
        "EZ_MAX_ENDPOINTS": MAX_ENDPOINTS,
        "EZ_MAX_NETNS": MAX_NETNS,
        "EZ_MAX_CAPTURE_PORTS": MAX_CAPTURE_PORTS,
    },
    "ez_sock_state": {f"EZ_{s.name}": s.value for s in SockState},
    "ez_sock_flags": {f"EZ_SF_{f.name}": f.value for f in SockFlag},
    "ez_config_flags": {f"EZ_CFG_{f.name}": f.value for f in ConfigFlag},
    "ez_rule": {f"EZ_RULE_{r.name}": r.value for r in Rule},
    "ez_index_kind": {f"EZ_IDX_{k.name}": k.value for k in IndexKind},
    "ez_counter": {
        **{
            (f"EZ_{c.name}" if c.name.startswith("NP_") else f"EZ_CNT_{c.name}"): c.value
            for c in Counter
        },
        "EZ_CNT_MAX": COUNTER_MAX,
    },
    "ez_endpoint_flags": {"EZ_EP_ENROLLED": EP_ENROLLED},
}

# Pinned map name -> (key struct or size, value struct or size).
MAPS: dict[str, tuple[type[ctypes.Structure] | int, type[ctypes.Structure] | int]] = {
    "ez_socks": (8, 8),
    "ez_sockinfo": (8, SockInfo),
    "ez_skcookie": (4, 8),
    "ez_index": (IndexKey, IndexValue),
    "ez_endpoints": (Addr, Endpoint),
    "ez_netns": (8, Addr),
    "ez_ports": (4, 4),
    "ez_config": (4, Config),
    "ez_counters": (4, 8),
}


def size_of(t: type[ctypes.Structure] | int) -> int:
    return t if isinstance(t, int) else ctypes.sizeof(t)
