"""What the agent measures and reads for its series, whether or not it serves metrics.

The agent holds these at rest; api/metrics.py (the series and their listener) is imported
only with --metrics-listen.
"""

from __future__ import annotations

import ctypes
import errno
import struct
from typing import Final

from eztunnel_plugin.api.view import LatencyHistogram
from eztunnel_plugin.bpf import layout, maps, syscalls
from eztunnel_plugin.errors import BpfError

# Push-to-map latency buckets, seconds: a one-workload change lands in a few ms, a first
# 10,000-workload snapshot in well under a second.
PUSH_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class LatencyRecorder:
    """Durations in PUSH_BUCKETS; observed on the event loop, read by scrapes."""

    def __init__(self, bounds: tuple[float, ...] = PUSH_BUCKETS) -> None:
        self._bounds = bounds
        self._counts = [0] * (len(bounds) + 1)
        self._total = 0.0

    def observe(self, seconds: float) -> None:
        i = next((i for i, b in enumerate(self._bounds) if seconds <= b), len(self._bounds))
        self._counts[i] += 1
        self._total += seconds

    def snapshot(self) -> LatencyHistogram:
        return LatencyHistogram(self._bounds, tuple(self._counts), self._total)


_SOCK = layout.SockInfo
_VSIZE = ctypes.sizeof(_SOCK)
_SPLICED = frozenset({layout.SockState.PAIRED, layout.SockState.TCP_PAIRED})
_RULE_NAMES: Final = {r.value: r.name.lower() for r in layout.Rule if r.value}
_BATCH = 1024


def read_active_pairs(dp: maps.Dataplane) -> dict[str, int]:
    """Pairs spliced now, by rule: both sockets in the socket table, pointing at each other,
    and at least one direction still spliced (redirecting, or on TCP until it resumes).

    Batched reads of the socket table, bounded by its size; only four fields of each
    entry are decoded.
    """
    fd = dp.maps["ez_sockinfo"]
    socks: dict[int, tuple[int, int, int, int]] = {}  # cookie -> state, rule, peer, active
    cursor: int | None = 0
    batch = _BATCH
    for _ in range(layout.MAX_SOCKETS // _BATCH + 64):  # bounded: every batch moves on
        if cursor is None:
            break
        try:
            entries, cursor = syscalls.map_lookup_batch(fd, 8, _VSIZE, cursor, batch)
        except BpfError as e:
            if e.errno != errno.ENOSPC or batch >= layout.MAX_SOCKETS:
                raise
            batch *= 4  # one bucket holds more than a batch: read it whole
            continue
        for key, raw in entries:
            socks[struct.unpack("=Q", key)[0]] = (
                struct.unpack_from("=I", raw, _SOCK.state.offset)[0],
                struct.unpack_from("=I", raw, _SOCK.rule.offset)[0],
                struct.unpack_from("=Q", raw, _SOCK.peer_cookie.offset)[0],
                raw[_SOCK.active.offset],
            )
    out = {r.name.lower(): 0 for r in layout.Rule if r.value}
    for cookie, (state, rule, peer_cookie, active) in socks.items():
        peer = socks.get(peer_cookie)
        if not active or peer is None or peer[2] != cookie or rule not in _RULE_NAMES:
            continue
        if state in _SPLICED or peer[0] in _SPLICED:
            out[_RULE_NAMES[rule]] += 1
    return out
