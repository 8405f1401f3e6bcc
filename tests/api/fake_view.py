"""A stand-in for the agent as the API sees it (api.view.AdminView): plain fields the
test sets, map reads from dicts, and a record of every kill-switch change."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field

from eztunnel_plugin.api.view import (
    DataplaneStatus,
    FileStatus,
    Flow,
    FlowPage,
    LatencyHistogram,
    Owner,
    SelftestStatus,
    XdsStatus,
)
from eztunnel_plugin.bpf import layout
from eztunnel_plugin.events import Event, EventBus


def flow(cookie: int, client: str = "10.1.0.1:40000", server: str = "10.1.0.2:80") -> Flow:
    return Flow(
        active_cookie=cookie, passive_cookie=cookie + 1, rule=layout.Rule.CROSS_MIRROR,
        local=client, remote=server, active_netns=11, passive_netns=22,
        bytes_active_to_passive=1000 + cookie, bytes_passive_to_active=2000 + cookie,
        state_active=layout.SockState.PAIRED, state_passive=layout.SockState.TAINTED,
    )  # fmt: skip


LOADED = DataplaneStatus(True, False, ("link_msg", "link_sockops"), 4 << 20, (15001,))


@dataclass
class FakeView:
    version: str = "9.9.9"
    node: str = "node-1"
    kernel: str = "6.18.0-test"
    bpffs: str = "/sys/fs/bpf/test"
    cgroup: str = "/sys/fs/cgroup/test"
    started: float = field(default_factory=lambda: time.time() - 5)
    ready: bool = True
    stale: bool = False
    endpoint_source: str = "xds"
    addresses_refused: int = 0
    owner_map: dict[str, Owner] = field(default_factory=dict)
    xds_status: XdsStatus | None = None
    file_status: FileStatus | None = None
    selftest: SelftestStatus | None = None
    push_latency: LatencyHistogram = field(
        default_factory=lambda: LatencyHistogram((0.01, 0.1), (0, 0, 0), 0.0)
    )
    events: EventBus = field(default_factory=EventBus)
    # The data plane: None while "not loaded".
    plane: DataplaneStatus | None = field(default_factory=lambda: LOADED)
    in_map: dict[str, int] = field(default_factory=dict)
    counter_values: dict[str, int] = field(default_factory=dict)
    pairs_now: dict[str, int] = field(default_factory=dict)  # active pairs by rule
    flows: list[Flow] = field(default_factory=list)
    # Called on every map read, on the thread that reads (to hold or count reads).
    on_read: Callable[[str], None] | None = None
    read_threads: list[str] = field(default_factory=list)
    switched: list[tuple[bool, int, int]] = field(default_factory=list)

    def _read(self, what: str) -> bool:
        self.read_threads.append(threading.current_thread().name)
        if self.on_read is not None:
            self.on_read(what)
        return self.plane is not None

    def owners(self) -> Mapping[str, Owner]:
        return self.owner_map

    def xds(self) -> XdsStatus | None:
        return self.xds_status

    def endpoints_file(self) -> FileStatus | None:
        return self.file_status

    def subscribe(self) -> AbstractAsyncContextManager[asyncio.Queue[Event]]:
        return self.events.subscribe()

    def dataplane(self) -> DataplaneStatus | None:
        return self.plane if self._read("dataplane") else None

    def endpoints_in_map(self) -> dict[str, int] | None:
        return dict(self.in_map) if self._read("endpoints") else None

    def counters(self) -> dict[str, int] | None:
        return dict(self.counter_values) if self._read("counters") else None

    def active_pairs(self) -> dict[str, int] | None:
        return dict(self.pairs_now) if self._read("active_pairs") else None

    def push_to_map(self) -> LatencyHistogram:
        return self.push_latency

    def flow_page(self, bucket: int, size: int) -> FlowPage | None:
        """`bucket` indexes the flow list here; pages of exactly `size`."""
        if not self._read("flows"):
            return None
        page = self.flows[bucket : bucket + size]
        after = bucket + size if bucket + size < len(self.flows) else None
        return FlowPage(page, after)

    def set_enabled(self, enabled: bool, *, uid: int, pid: int) -> bool | None:
        if self.plane is None:
            return None
        was = self.plane.enabled
        self.plane = dataclasses.replace(self.plane, enabled=enabled)
        self.switched.append((enabled, uid, pid))
        return was
