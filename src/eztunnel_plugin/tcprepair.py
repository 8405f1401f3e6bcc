"""A connection's socket rebuilt with TCP_REPAIR, its next byte a given count too early.

The self-test uses it to send a segment that repeats bytes the receiver already has, as a
retransmission that starts before the receiver's rcv_nxt does (docs/kernel.md, "Repeated
bytes on the verdict path"). TCP_REPAIR needs CAP_NET_ADMIN in the socket's network
namespace; the old socket closes silently (in repair mode, close sends no FIN or RST).
"""

from __future__ import annotations

import socket
import struct
import time
from typing import Final

TCP: Final = socket.IPPROTO_TCP
TCP_REPAIR: Final = 19
TCP_REPAIR_QUEUE: Final = 20
TCP_QUEUE_SEQ: Final = 21
TCP_REPAIR_OPTIONS: Final = 22
TCP_TIMESTAMP: Final = 24
TCP_REPAIR_WINDOW: Final = 29
RECV_QUEUE: Final = 1
SEND_QUEUE: Final = 2
TCPOPT_MSS: Final = 2
TCPOPT_WINDOW: Final = 3
TCPOPT_SACK_PERM: Final = 4
TCPOPT_TIMESTAMP: Final = 8
TCPI_OPT_TIMESTAMPS: Final = 1
TCPI_OPT_SACK: Final = 2
TCPI_OPT_WSCALE: Final = 4


def wait_acked(s: socket.socket, timeout: float) -> bool:
    """Whether every byte s sent is acknowledged within `timeout` s (rebuild_behind needs
    that: else the peer would see a gap, not a repeat)."""
    deadline = time.monotonic() + timeout
    while True:
        info = s.getsockopt(TCP, socket.TCP_INFO, 104)
        if struct.unpack_from("I", info, 24)[0] == 0:  # tcpi_unacked
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)


def _queue_seq(s: socket.socket, queue: int) -> int:
    s.setsockopt(TCP, TCP_REPAIR_QUEUE, queue)
    return int(struct.unpack("I", s.getsockopt(TCP, TCP_QUEUE_SEQ, 4))[0])


def _u32(n: int) -> bytes:
    return struct.pack("I", n & 0xFFFFFFFF)


def rebuild_behind(old: socket.socket, behind: int) -> socket.socket:
    """The same established connection in a new socket, whose send sequence is `behind`
    bytes back: its next write repeats the last `behind` bytes the peer got. Every byte
    `old` sent must be acknowledged (wait_acked)."""
    info = old.getsockopt(TCP, socket.TCP_INFO, 104)
    options, wscales = info[5], info[6]
    mss = struct.unpack_from("I", info, 16)[0]  # tcpi_snd_mss
    old.setsockopt(TCP, TCP_REPAIR, 1)
    try:
        snd, rcv = _queue_seq(old, SEND_QUEUE), _queue_seq(old, RECV_QUEUE)
        wl1, *window = struct.unpack("5I", old.getsockopt(TCP, TCP_REPAIR_WINDOW, 20))
        stamp = struct.unpack("I", old.getsockopt(TCP, TCP_TIMESTAMP, 4))[0]
        local, peer = old.getsockname(), old.getpeername()
    except BaseException:
        old.setsockopt(TCP, TCP_REPAIR, 0)
        raise
    old.close()
    new = socket.socket(old.family, socket.SOCK_STREAM)
    try:
        new.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        new.setsockopt(TCP, TCP_REPAIR, 1)
        new.setsockopt(TCP, TCP_REPAIR_QUEUE, SEND_QUEUE)
        new.setsockopt(TCP, TCP_QUEUE_SEQ, _u32(snd - behind))
        new.setsockopt(TCP, TCP_REPAIR_QUEUE, RECV_QUEUE)
        new.setsockopt(TCP, TCP_QUEUE_SEQ, _u32(rcv))
        new.setsockopt(TCP, TCP_TIMESTAMP, _u32(stamp))  # the peer's PAWS sees no step back
        new.bind(local)
        new.connect(peer)  # in repair mode: established, no handshake
        opts = [(TCPOPT_MSS, mss)]
        if options & TCPI_OPT_WSCALE:
            opts.append((TCPOPT_WINDOW, (wscales & 15) | (wscales >> 4) << 16))
        if options & TCPI_OPT_SACK:
            opts.append((TCPOPT_SACK_PERM, 0))
        if options & TCPI_OPT_TIMESTAMPS:
            opts.append((TCPOPT_TIMESTAMP, 0))
        new.setsockopt(TCP, TCP_REPAIR_OPTIONS, b"".join(struct.pack("II", *o) for o in opts))
        new.setsockopt(TCP, TCP_REPAIR_WINDOW, _u32(wl1) + struct.pack("4I", *window))
        new.setsockopt(TCP, TCP_REPAIR_QUEUE, 0)
        new.setsockopt(TCP, TCP_REPAIR, 0)
        new.setsockopt(TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        new.close()
        raise
    return new
