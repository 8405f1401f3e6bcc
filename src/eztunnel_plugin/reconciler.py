"""Keep the BPF endpoint map equal to the latest xDS snapshot, by differences only.

Order of writes: deletes and flag reductions first, then additions. Every map state
between two snapshots is therefore a subset of the old one (while removing) or of
the new one (while adding): the map never enrolls an address that neither the
previous nor the current accepted snapshot enrolled. Fail closed: nothing is written
(and a pre-existing pinned map is left alone) until the state is complete, i.e. the
first response of every subscribed type has been applied; the first write then
converges the map, removing entries that no longer exist.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Mapping
from typing import Final, Protocol

from eztunnel_plugin import addr, log
from eztunnel_plugin.bpf import layout
from eztunnel_plugin.state.snapshot import SnapshotSource

EZ_EP_ENROLLED: Final = layout.EP_ENROLLED  # bpf/eztunnel.h enum ez_endpoint_flags

_log = log.get(__name__)


class EndpointSink(Protocol):
    """The endpoint map as the reconciler sees it; ip is canonical text (v4 or v6)."""

    def read_all(self) -> dict[str, int]: ...

    def put(self, ip: str, flags: int) -> None: ...

    def delete(self, ip: str) -> None:
        """Remove ip; removing an absent ip is not an error."""
        ...


class MemorySink:
    """In-memory EndpointSink for tests and benchmarks; records every write.

    Keys are canonicalized like the BPF map does (one key per address).
    """

    def __init__(self, initial: Mapping[str, int] | None = None) -> None:
        self.entries: dict[str, int] = {addr.canonical(k): v for k, v in (initial or {}).items()}
        self.ops: list[tuple[str, str, int]] = []  # ("put"|"delete", ip, flags)

    def read_all(self) -> dict[str, int]:
        return dict(self.entries)

    def put(self, ip: str, flags: int) -> None:
        ip = addr.canonical(ip)
        self.entries[ip] = flags
        self.ops.append(("put", ip, flags))

    def delete(self, ip: str) -> None:
        ip = addr.canonical(ip)
        self.entries.pop(ip, None)
        self.ops.append(("delete", ip, 0))


def desired_entries(endpoints: frozenset[str]) -> dict[str, int]:
    return dict.fromkeys(endpoints, EZ_EP_ENROLLED)


def plan(
    current: Mapping[str, int], desired: Mapping[str, int]
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Split the change into (reduce, grow) writes; flags 0 in reduce means delete.

    reduce: entries to delete, or to narrow to the flags both states share;
    grow: entries to add, or to widen to their new flags.
    """
    reduce: list[tuple[str, int]] = []
    grow: list[tuple[str, int]] = []
    for ip, flags in current.items():
        want = desired.get(ip, 0)
        if want == flags:
            continue
        common = flags & want
        if common != flags:
            reduce.append((ip, common))
        if want != common:
            grow.append((ip, want))
    for ip, want in desired.items():
        if ip not in current:
            grow.append((ip, want))
    return reduce, grow


class Reconciler:
    """Applies snapshots (from WorkloadState or another source) to an EndpointSink."""

    def __init__(
        self,
        state: SnapshotSource,
        sink: EndpointSink,
        *,
        retry_initial: float = 0.1,
        retry_max: float = 5.0,
    ) -> None:
        self.state = state
        self.sink = sink
        self.applied_version = -1  # snapshot version the sink equals; -1: none yet
        self.errors = 0
        self.refused = 0  # non-enrollable addresses a source handed over (never written)
        self._refused_seen: set[str] = set()
        self._believed: dict[str, int] | None = None  # None: re-read the sink first
        self._wake = asyncio.Event()
        self._applied = asyncio.Condition()
        self._retry_initial = retry_initial
        self._retry_max = retry_max
        state.subscribe(self._on_change)

    def _on_change(self, _version: int) -> None:
        self._wake.set()

    def _refused(self, ip: str) -> bool:
        """Defence in depth: True for an address the map must never get (the sources
        filter already), logged and counted once per address."""
        try:
            reason = addr.refusal(ip)
        except ValueError:
            reason = "not an IP address"
        if reason is None:
            return False
        if ip not in self._refused_seen:  # once per address, not per snapshot
            self._refused_seen.add(ip)
            self.refused += 1
            _log.error("reconcile.address_refused", ip=ip[:64], reason=reason)
        return True

    def reconcile(self) -> bool:
        """Bring the sink to the latest snapshot. False: nothing to do (or not complete).

        A sink error propagates; the sink is then re-read before the next attempt.
        """
        snap = self.state.snapshot()
        if not snap.complete:
            return False
        if snap.version == self.applied_version and self._believed is not None:
            return False
        started = time.perf_counter()
        converging = self._believed is None
        if self._believed is None:
            self._believed = {addr.canonical(ip): f for ip, f in self.sink.read_all().items()}
        current = self._believed
        desired = desired_entries(snap.endpoints)
        if converging:  # the whole set once; later only what is about to be added
            for ip in [ip for ip in desired if self._refused(ip)]:
                del desired[ip]
        reduce, grow = plan(current, desired)
        grow = [(ip, flags) for ip, flags in grow if not self._refused(ip)]
        try:
            for ip, flags in reduce:
                if flags:
                    self.sink.put(ip, flags)
                    current[ip] = flags
                else:
                    self.sink.delete(ip)
                    del current[ip]
            for ip, flags in grow:
                self.sink.put(ip, flags)
                current[ip] = flags
        except Exception:
            self._believed = None
            raise
        self.applied_version = snap.version
        if converging or reduce or grow:
            _log.info(
                "reconcile.applied",
                version=snap.version,
                endpoints=len(desired),
                removed=sum(1 for _, f in reduce if not f),
                written=len(grow) + sum(1 for _, f in reduce if f),
                converged=converging,
                ms=round((time.perf_counter() - started) * 1000, 3),
            )
        return True

    def resync(self) -> None:
        """Forget what the sink is believed to hold; the next reconcile re-reads it."""
        self._believed = None
        self._wake.set()

    async def wait_applied(self, version: int) -> None:
        """Wait until the sink reflects a snapshot at least this new."""
        async with self._applied:
            await self._applied.wait_for(lambda: self.applied_version >= version)

    async def run(self) -> None:
        """Reconcile on every state change until cancelled; retries sink errors with backoff."""
        delay = self._retry_initial
        self._wake.set()
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                self.reconcile()
            except Exception as e:
                self.errors += 1
                _log.error("reconcile.failed", error=repr(e), retry_s=round(delay, 3))
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, self._retry_max)
                self._wake.set()
                continue
            delay = self._retry_initial
            async with self._applied:
                self._applied.notify_all()
