"""`eztunnel-plugin run`: the long-running node agent.

Startup never splices wrongly: load (or reuse) the BPF data plane -> connect the
endpoint source (xDS, or a static file) -> first complete snapshot applied to
the endpoint map -> ready. Health is NOT_SERVING until ready, and again while
the xDS feed is stale. SIGTERM stops within seconds and leaves every pin in
place, so acceleration survives restarts and rolling upgrades.
"""

from __future__ import annotations

import asyncio
import platform
import signal
import time
from dataclasses import dataclass

from eztunnel_plugin import __version__, log
from eztunnel_plugin.aio import cancel_all
from eztunnel_plugin.api import admin, inspector, metrics
from eztunnel_plugin.api.inspector import ApiServer, Reader
from eztunnel_plugin.bpf import dataplane, syscalls
from eztunnel_plugin.config import AgentConfig
from eztunnel_plugin.endpoints_file import StaticEndpoints
from eztunnel_plugin.events import EventBus
from eztunnel_plugin.reconciler import EndpointSink, Reconciler
from eztunnel_plugin.state.workloads import WorkloadState, local_endpoint_ips
from eztunnel_plugin.xds.client import XdsClient

_log = log.get(__name__)


@dataclass(frozen=True)
class Owner:
    uid: str
    name: str
    namespace: str


class ObservedSink:
    """The endpoint map, announcing every enrolment and removal as an event."""

    def __init__(self, sink: EndpointSink, events: EventBus) -> None:
        self._sink = sink
        self._events = events

    def read_all(self) -> dict[str, int]:
        return self._sink.read_all()

    def put(self, ip: str, flags: int) -> None:
        self._sink.put(ip, flags)
        self._events.publish("endpoint.enrolled", ip=ip, flags=flags)
        _log.debug("endpoint.enrolled", ip=ip, flags=flags)

    def delete(self, ip: str) -> None:
        self._sink.delete(ip)
        self._events.publish("endpoint.removed", ip=ip)
        _log.debug("endpoint.removed", ip=ip)


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.version = __version__
        self.kernel = platform.release()
        self.started = time.time()
        self.events = EventBus()
        self.ready = False
        self.stale = False
        self.dp: dataplane.Dataplane | None = None
        self.state: WorkloadState | None = None
        self.static: StaticEndpoints | None = None
        self.xds: XdsClient | None = None
        self.reconciler: Reconciler | None = None
        self.reader = Reader()  # every map read the API and metrics make, off the loop
        self._api: ApiServer
        self._disconnected_since: float | None = time.monotonic()

    # ---- read side, for the API and metrics --------------------------------------

    @property
    def source(self) -> str:
        return f"file:{self.cfg.endpoints_file}" if self.static else "xds"

    def owners(self) -> dict[str, Owner]:
        """Desired endpoints -> who owns them (from the accepted state)."""
        if self.static is not None:
            return {ip: Owner("", "", "") for ip in self.static.endpoints}
        out: dict[str, Owner] = {}
        if self.state is not None:
            for w in self.state.workloads.values():
                for ip in local_endpoint_ips(w, self.cfg.node_name):
                    out[ip] = Owner(w.uid, w.name, w.namespace)
        return out

    def serving(self) -> bool:
        return self.ready and not self.stale

    # ---- lifecycle ------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> int:
        cfg = self.cfg
        self.dp = dataplane.Dataplane.install_or_reuse(
            cfg.bpffs, cfg.cgroup, capture_ports=cfg.capture_ports, isolated=True
        )
        if self.dp.reused:
            self.dp.set_capture_ports(cfg.capture_ports)
        self.dp.set_backlog_limit(cfg.backlog_limit)
        self.events.publish("dataplane.ready", reused=self.dp.reused, bpffs=cfg.bpffs)
        self._api = await inspector.start(self, cfg.grpc_listen)
        tasks: list[asyncio.Task[None]] = []
        metrics_server = None
        admin_server = None
        try:
            admin_server = await admin.start(self, cfg.admin_socket)
            if cfg.metrics_listen is not None:
                metrics_server = await metrics.start(self, cfg.metrics_listen)
            sink = ObservedSink(self.dp.endpoints, self.events)
            if cfg.endpoints_file is not None:
                self.static = StaticEndpoints(cfg.endpoints_file)
                self.reconciler = Reconciler(self.static, sink)
                tasks.append(asyncio.create_task(self.static.watch()))
            else:
                assert cfg.xds is not None
                self.state = WorkloadState(cfg.node_name)
                self.xds = XdsClient(cfg.xds, self.state, on_event=self._xds_event)
                self.reconciler = Reconciler(self.state, sink)
                tasks.append(asyncio.create_task(self.xds.run()))
                tasks.append(asyncio.create_task(self._watch_staleness()))
            tasks.append(asyncio.create_task(self.reconciler.run()))
            tasks.append(asyncio.create_task(self._become_ready()))
            tasks.append(asyncio.create_task(_trim_periodically()))
            await stop.wait()
            _log.info("agent.stopping", pins_kept=str(cfg.bpffs))
            self.ready = False
            await self._api.set_serving(False)
        finally:
            await cancel_all(tasks)
            if metrics_server is not None:
                metrics_server.close()
            if admin_server is not None:
                await admin_server.stop(grace=1.0)
            await self._api.stop(grace=1.0)
            self.reader.close()  # before the maps close under a read
            self.dp.close()
        return 0

    async def _become_ready(self) -> None:
        assert self.reconciler is not None
        await self.reconciler.wait_applied(0)
        release_memory()  # decoding the first snapshot is the agent's peak
        self.ready = True
        snap = (self.static or self.state).snapshot()  # type: ignore[union-attr]
        _log.info("agent.ready", endpoints=len(snap.endpoints), version=snap.version)
        self.events.publish("agent.ready", endpoints=len(snap.endpoints))
        await self._api.set_serving(self.serving())

    def _xds_event(self, kind: str, fields: dict[str, object]) -> None:
        if kind == "xds.connected":
            self._disconnected_since = None
        elif kind == "xds.disconnected" and self._disconnected_since is None:
            self._disconnected_since = time.monotonic()
        self.events.publish(kind, **fields)

    async def _watch_staleness(self) -> None:
        """NOT_SERVING while no xDS stream has been up for longer than the limit."""
        while True:
            since = self._disconnected_since
            stale = since is not None and time.monotonic() - since > self.cfg.xds_stale_after_s
            if stale != self.stale:
                self.stale = stale
                _log.warning(
                    "xds.stale" if stale else "xds.fresh", limit_s=self.cfg.xds_stale_after_s
                )
                self.events.publish("xds.stale" if stale else "xds.fresh")
                await self._api.set_serving(self.serving())
            await asyncio.sleep(0.5)


M_ARENA_MAX = -8


def release_memory() -> None:
    """Give freed heap back to the kernel (glibc keeps it otherwise)."""
    syscalls.libc().malloc_trim(0)


async def _trim_periodically(interval: float = 30.0) -> None:
    while True:
        await asyncio.sleep(interval)
        release_memory()


def main(cfg: AgentConfig) -> int:
    # Fewer malloc arenas for gRPC's threads: less memory held per thread.
    syscalls.libc().mallopt(M_ARENA_MAX, 2)

    async def _main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await Agent(cfg).run(stop)

    return asyncio.run(_main())
