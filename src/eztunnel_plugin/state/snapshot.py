"""What the reconciler reads from a source of endpoints (the xDS state, a static file)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

Listener = Callable[[int], None]  # called with the new snapshot version


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One consistent view for the reconciler."""

    version: int
    complete: bool  # the source has delivered its first full view: writing may start
    endpoints: frozenset[str]  # this node's in-mesh endpoint IPs, canonical text


class SnapshotSource(Protocol):
    """Where desired endpoints come from: WorkloadState, or a static endpoints file."""

    def snapshot(self) -> Snapshot: ...

    def subscribe(self, listener: Listener) -> None: ...
