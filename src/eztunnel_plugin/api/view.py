"""What the API (inspector, admin, metrics) sees of the agent: a narrow view.

The API never holds the agent. It reads through `AgentView`: status fields, who owns
each endpoint, the xDS feed's stats, the events, and reads of the BPF maps. The admin
socket also gets `AdminView`, which adds the one change the API may make: the kill
switch. Data flows one way (xDS -> state -> reconciler -> BPF maps); the view only
looks at where it ends up.

Plain fields are cheap and read on the event loop. The map reads block on bpf(2):
callers run them on the API's reader thread (api/reader.py), never on the loop; each
returns None while the data plane is not loaded yet.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

from eztunnel_plugin.bpf.maps import Flow
from eztunnel_plugin.events import Event

__all__ = [
    "AdminView",
    "AgentView",
    "DataplaneStatus",
    "FileStatus",
    "Flow",
    "FlowPage",
    "LatencyHistogram",
    "Owner",
    "SelftestCheck",
    "SelftestStatus",
    "XdsStatus",
    "XdsTypeStatus",
]


@dataclass(frozen=True)
class Owner:
    """Who an enrolled address belongs to (all empty for a static endpoints file)."""

    uid: str
    name: str
    namespace: str
    node: str = ""
    protocol: str = ""  # the workload's tunnel protocol: HBONE or TCP


@dataclass(frozen=True)
class XdsTypeStatus:
    type_url: str
    last_acked_nonce: str
    resources: int  # held now


@dataclass(frozen=True)
class XdsStatus:
    """The xDS feed, as the client and the state it fills see it."""

    address: str
    connected: bool
    complete: bool  # every subscribed type applied once
    stale: bool  # no stream for longer than the staleness limit
    nacks: int
    streams: int  # opened so far
    protocol_errors: int
    last_error: str
    types: tuple[XdsTypeStatus, ...]


@dataclass(frozen=True)
class FileStatus:
    """A static endpoints file in place of xDS."""

    last_error: str  # "" after a good load
    errors: int  # bad loads so far


@dataclass(frozen=True)
class DataplaneStatus:
    """The data plane's settings, read from its config and capture-port maps."""

    enabled: bool  # the kill switch: False passes everything through TCP
    reused: bool  # the pins of an earlier agent were taken over
    programs: tuple[str, ...]  # links attached, by pin name
    backlog_limit: int
    capture_ports: tuple[int, ...]


@dataclass(frozen=True)
class SelftestCheck:
    """One check of the kernel self-test."""

    name: str
    passed: bool
    detail: str  # why it failed ("" when it passed)


@dataclass(frozen=True)
class SelftestStatus:
    """The kernel self-test's outcome at start (filled by the self-test; metrics export
    `decision` as a label, so any short lower-case word works there)."""

    decision: str  # what the agent did: attach, attach with the SK_SKB workaround, or not splice
    reason: str
    checks: tuple[SelftestCheck, ...]
    kernel: str = ""  # the release tested
    kernel_listed: bool = False  # known to lose epoll wakeups without the workaround
    environment: str = ""  # where the checks ran (netns, loopback address, cgroup)
    duration_s: float = 0.0


@dataclass(frozen=True)
class LatencyHistogram:
    """Observed durations in buckets: counts[i] fell in (bounds[i-1], bounds[i]]; the last
    count is past the last bound (+Inf)."""

    bounds: tuple[float, ...]  # seconds, increasing
    counts: tuple[int, ...]  # len(bounds) + 1
    total_s: float  # sum of every observation


@dataclass(frozen=True)
class FlowPage:
    """Flows from one hash bucket of the socket map on; `after` resumes (None: the end)."""

    flows: list[Flow]
    after: int | None


class AgentView(Protocol):
    """Read only: everything inspector, metrics and admin may know of the agent."""

    # ---- plain fields (cheap) -------------------------------------------------------

    @property
    def version(self) -> str: ...

    @property
    def node(self) -> str: ...

    @property
    def kernel(self) -> str: ...

    @property
    def bpffs(self) -> str: ...

    @property
    def cgroup(self) -> str: ...

    @property
    def started(self) -> float:
        """time.time() at start."""
        ...

    @property
    def ready(self) -> bool:
        """The first complete snapshot is in the endpoint map."""
        ...

    @property
    def stale(self) -> bool: ...

    @property
    def endpoint_source(self) -> str:
        """`xds`, or `file:<path>`."""
        ...

    @property
    def addresses_refused(self) -> int:
        """Addresses a source named that were never enrolled (loopback, multicast, ...)."""
        ...

    @property
    def selftest(self) -> SelftestStatus | None:
        """The kernel self-test's outcome; None until it has run."""
        ...

    def push_to_map(self) -> LatencyHistogram:
        """From a push (xDS response, or endpoints file change) received to the endpoint
        map holding it, for every push applied so far."""
        ...

    def owners(self) -> Mapping[str, Owner]:
        """Desired endpoints -> who owns them (from the accepted state)."""
        ...

    def xds(self) -> XdsStatus | None:
        """None when endpoints come from a file."""
        ...

    def endpoints_file(self) -> FileStatus | None:
        """None when endpoints come from xDS."""
        ...

    def subscribe(self) -> AbstractAsyncContextManager[asyncio.Queue[Event]]:
        """The agent's events from now on (bounded: a slow reader loses the oldest)."""
        ...

    # ---- the BPF maps (blocking: run on the reader) ------------------------------------

    def dataplane(self) -> DataplaneStatus | None: ...

    def endpoints_in_map(self) -> dict[str, int] | None:
        """The endpoint map: IP -> flags."""
        ...

    def counters(self) -> dict[str, int] | None:
        """Every BPF counter summed over CPUs, by lower-case name."""
        ...

    def active_pairs(self) -> dict[str, int] | None:
        """Socket pairs spliced now (both sockets open, a direction still spliced), by
        lower-case rule name; every rule is present."""
        ...

    def flow_page(self, bucket: int, size: int) -> FlowPage | None:
        """About `size` flows from hash bucket `bucket` on (whole buckets: a cursor
        stays valid whatever changes meanwhile)."""
        ...


class AdminView(AgentView, Protocol):
    """The view plus the one state change the API makes (admin socket, root only)."""

    def set_enabled(self, enabled: bool, *, uid: int, pid: int) -> bool | None:
        """The kill switch, asked by the caller uid/pid (announced as an event).
        Returns the previous state; None while the data plane is not loaded (nothing
        changed)."""
        ...
