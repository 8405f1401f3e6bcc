"""`eztunnel-plugin run`: the long-running node agent.

Startup never splices wrongly: the kernel self-test decides (selftest.py) -> load
(or reuse) the BPF data plane as it decided, or attach nothing at all -> connect the
endpoint source (xDS, or a static file) -> first complete snapshot applied to
the endpoint map -> ready. Health is NOT_SERVING until ready, and again while
the xDS feed is stale (gRPC health, and HTTP probes with --health-listen). SIGTERM
stops within seconds and leaves every pin in place, so acceleration survives restarts
and rolling upgrades.

The API servers (inspector, admin, metrics) get `View`, the api.view.AdminView of the
agent, never the agent itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import platform
import signal
import time
from collections import deque
from contextlib import AbstractAsyncContextManager
from pathlib import Path

from eztunnel_plugin import __version__, log, selftest
from eztunnel_plugin.aio import cancel_all
from eztunnel_plugin.api import admin, inspector, readings
from eztunnel_plugin.api.inspector import ApiServer
from eztunnel_plugin.api.reader import Reader
from eztunnel_plugin.api.view import (
    AdminView,
    DataplaneStatus,
    FileStatus,
    FlowPage,
    LatencyHistogram,
    Owner,
    SelftestStatus,
    XdsStatus,
    XdsTypeStatus,
)
from eztunnel_plugin.bpf import loader, syscalls
from eztunnel_plugin.bpf.maps import Dataplane
from eztunnel_plugin.config import AgentConfig
from eztunnel_plugin.endpoints_file import StaticEndpoints
from eztunnel_plugin.errors import DataplaneError
from eztunnel_plugin.events import Event, EventBus
from eztunnel_plugin.reconciler import EndpointSink, Reconciler
from eztunnel_plugin.state.workloads import WorkloadState, local_endpoint_ips
from eztunnel_plugin.xds.client import XdsClient
from eztunnel_plugin.xds.updater import state_watches

_log = log.get(__name__)


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


class NoMap:
    """The endpoint sink when nothing is attached (the self-test decided not to splice):
    the reconciler still applies every snapshot, so readiness and status stay true."""

    def __init__(self) -> None:
        self.entries: dict[str, int] = {}

    def read_all(self) -> dict[str, int]:
        return dict(self.entries)

    def put(self, ip: str, flags: int) -> None:
        self.entries[ip] = flags

    def delete(self, ip: str) -> None:
        self.entries.pop(ip, None)


class Agent:
    """One node agent: the data plane, an endpoint source, the reconciler, the API."""

    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.version = __version__
        self.kernel = platform.release()
        self.started = time.time()
        self.events = EventBus()
        self.ready = False
        self.stale = False
        self.dp: Dataplane | None = None
        self.state: WorkloadState | None = None
        self.static: StaticEndpoints | None = None
        self.xds: XdsClient | None = None
        self.reconciler: Reconciler | None = None
        self.reader = Reader()  # every map read the API and metrics make, off the loop
        self.selftest: SelftestStatus | None = None  # the kernel self-test fills it at start
        self.push_latency = readings.LatencyRecorder()  # push received -> endpoint map
        self._pushes: deque[tuple[int, float]] = deque(maxlen=1024)  # (version, received)
        self._pushed = asyncio.Event()
        self.view: AdminView = View(self)  # all the API sees of the agent
        self._api: ApiServer
        self._disconnected_since: float | None = time.monotonic()

    def serving(self) -> bool:
        return self.ready and not self.stale

    # ---- lifecycle ------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> int:
        # The probes answer from the first moment: live at once, ready once all is.
        probes = None
        if self.cfg.health_listen is not None:
            from eztunnel_plugin.api import health  # only with --health-listen

            probes = await health.start(self.view, self.cfg.health_listen)
        try:
            await self._prepare_dataplane()
            return await self._serve(stop)
        finally:
            if probes is not None:
                probes.close()

    async def _prepare_dataplane(self) -> None:
        """The kernel self-test decides; attach as it decided, or attach nothing."""
        cfg = self.cfg
        st = await asyncio.to_thread(selftest.run, allow_workaround=cfg.allow_workaround)
        if st.decision == selftest.NO_SPLICE:
            problem = await asyncio.to_thread(_stand_down, cfg.bpffs)
            if problem:
                st = dataclasses.replace(st, reason=f"{st.reason}; {problem}")
        self.selftest = st
        selftest.log_outcome(st)
        self.events.publish("selftest.decided", decision=st.decision, reason=st.reason)
        if st.decision == selftest.NO_SPLICE:
            return
        self.dp = await asyncio.to_thread(
            loader.install_or_reuse,
            cfg.bpffs,
            cfg.cgroup,
            capture_ports=cfg.capture_ports,
            skb_verdict=st.decision == selftest.ATTACH_WORKAROUND,
            isolated=True,
        )
        if self.dp.reused:
            self.dp.ports.set(cfg.capture_ports)
        self.dp.config.set_backlog_limit(cfg.backlog_limit)
        self.events.publish("dataplane.ready", reused=self.dp.reused, bpffs=cfg.bpffs)

    async def _serve(self, stop: asyncio.Event) -> int:
        cfg = self.cfg
        self._api = await inspector.start(self.view, cfg.grpc_listen, self.reader, cfg.admin_socket)
        tasks: list[asyncio.Task[None]] = []
        metrics_server = None
        admin_server = None
        try:
            admin_server = await admin.start(self.view, cfg.admin_socket)
            if cfg.metrics_listen is not None:
                from eztunnel_plugin.api import metrics  # only with --metrics-listen

                metrics_server = await metrics.start(self.view, cfg.metrics_listen, self.reader)
            sink: EndpointSink = (
                NoMap() if self.dp is None else ObservedSink(self.dp.endpoints, self.events)
            )
            if cfg.endpoints_file is not None:
                self.static = StaticEndpoints(cfg.endpoints_file)
                self.reconciler = Reconciler(self.static, sink)
                tasks.append(asyncio.create_task(self.static.watch()))
            else:
                assert cfg.xds is not None
                self.state = WorkloadState(cfg.node_name)
                self.xds = XdsClient(cfg.xds, state_watches(self.state), on_event=self._xds_event)
                self.reconciler = Reconciler(self.state, sink)
                tasks.append(asyncio.create_task(self.xds.run()))
                tasks.append(asyncio.create_task(self._watch_staleness()))
            (self.static or self.state).subscribe(self._on_push)  # type: ignore[union-attr]
            tasks.append(asyncio.create_task(self._measure_pushes()))
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
            if self.dp is not None:
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

    def _on_push(self, version: int) -> None:
        """A source changed (same thread, inside the xDS response's handler): note when
        that push arrived, for the push-to-map latency."""
        st = self.xds.stats if self.xds is not None else None
        received = st.last_response_at if st is not None and st.last_response_at else None
        self._pushes.append((version, received or time.perf_counter()))
        self._pushed.set()

    async def _measure_pushes(self) -> None:
        """Observe each push's latency once the endpoint map holds its snapshot."""
        assert self.reconciler is not None
        while True:
            await self._pushed.wait()
            self._pushed.clear()
            while self._pushes:
                await self.reconciler.wait_applied(self._pushes[-1][0])
                now, applied = time.perf_counter(), self.reconciler.applied_version
                while self._pushes and self._pushes[0][0] <= applied:
                    self.push_latency.observe(now - self._pushes.popleft()[1])

    def _xds_event(self, kind: str, fields: dict[str, object]) -> None:
        if kind == "xds.connected":
            self._disconnected_since = None
        elif kind == "xds.disconnected" and self._disconnected_since is None:
            self._disconnected_since = time.monotonic()
        elif kind == "xds.synced" and self.state is not None:
            fields = {**fields, "version": self.state.version}  # the client has no state version
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


class View:
    """The agent as the API sees it (api.view.AdminView): what it may read, and the
    kill switch. The API holds this, never the agent."""

    def __init__(self, agent: Agent) -> None:
        self._agent = agent

    @property
    def version(self) -> str:
        return self._agent.version

    @property
    def node(self) -> str:
        return self._agent.cfg.node_name

    @property
    def kernel(self) -> str:
        return self._agent.kernel

    @property
    def bpffs(self) -> str:
        return str(self._agent.cfg.bpffs)

    @property
    def cgroup(self) -> str:
        return str(self._agent.cfg.cgroup)

    @property
    def started(self) -> float:
        return self._agent.started

    @property
    def ready(self) -> bool:
        return self._agent.ready

    @property
    def stale(self) -> bool:
        return self._agent.stale

    @property
    def endpoint_source(self) -> str:
        a = self._agent
        return f"file:{a.cfg.endpoints_file}" if a.static is not None else "xds"

    @property
    def addresses_refused(self) -> int:
        # The sources' own check, then the reconciler's (which should never find one).
        a = self._agent
        total = a.state.refused_total if a.state is not None else 0
        return total + (a.reconciler.refused if a.reconciler is not None else 0)

    @property
    def selftest(self) -> SelftestStatus | None:
        return self._agent.selftest

    def push_to_map(self) -> LatencyHistogram:
        return self._agent.push_latency.snapshot()

    def owners(self) -> dict[str, Owner]:
        a = self._agent
        if a.static is not None:
            return {ip: Owner("", "", "") for ip in a.static.endpoints}
        out: dict[str, Owner] = {}
        if a.state is not None:
            for w in a.state.workloads.values():
                for ip in local_endpoint_ips(w, a.cfg.node_name):
                    protocol = "HBONE" if w.hbone else "TCP"
                    out[ip] = Owner(w.uid, w.name, w.namespace, w.node, protocol)
        return out

    def xds(self) -> XdsStatus | None:
        a = self._agent
        if a.xds is None or a.state is None:
            return None
        st = a.xds.stats
        types = tuple(
            XdsTypeStatus(t, st.acked_nonce.get(t, ""), len(a.xds.held(t)))
            for t in a.xds.config.types
        )
        return XdsStatus(
            address=a.xds.config.address,
            connected=st.connected,
            complete=a.state.complete,
            stale=a.stale,
            nacks=st.nacks,
            streams=st.streams,
            protocol_errors=st.protocol_errors,
            last_error=st.last_error,
            types=types,
        )

    def endpoints_file(self) -> FileStatus | None:
        static = self._agent.static
        return None if static is None else FileStatus(static.last_error, static.errors)

    def subscribe(self) -> AbstractAsyncContextManager[asyncio.Queue[Event]]:
        return self._agent.events.subscribe()

    def dataplane(self) -> DataplaneStatus | None:
        dp = self._agent.dp
        if dp is None:
            return None
        cfg = dp.config.read()
        return DataplaneStatus(
            enabled=bool(cfg.enabled),
            reused=dp.reused,
            programs=tuple(sorted(dp.links)),
            backlog_limit=cfg.backlog_limit,
            capture_ports=tuple(dp.ports.read()),
        )

    def endpoints_in_map(self) -> dict[str, int] | None:
        dp = self._agent.dp
        return None if dp is None else dp.endpoints.read_all()

    def counters(self) -> dict[str, int] | None:
        dp = self._agent.dp
        return None if dp is None else dp.counters.read()

    def active_pairs(self) -> dict[str, int] | None:
        dp = self._agent.dp
        return None if dp is None else readings.read_active_pairs(dp)

    def flow_page(self, bucket: int, size: int) -> FlowPage | None:
        dp = self._agent.dp
        return None if dp is None else FlowPage(*inspector.read_flow_page(dp, bucket, size))

    def set_enabled(self, enabled: bool, *, uid: int, pid: int) -> bool | None:
        a = self._agent
        if a.dp is None:
            return None
        was = a.dp.config.enabled
        a.dp.config.set_enabled(enabled)
        a.events.publish("dataplane.enabled" if enabled else "dataplane.disabled", uid=uid, pid=pid)
        return was


def _stand_down(bpffs: Path) -> str:
    """Not splicing: a data plane an earlier start attached goes, as `uninstall` removes it
    (kill switch first, so spliced flows go on over TCP and no queued byte is lost).
    Returns what went wrong, or ""."""
    if not bpffs.is_dir() or not any(bpffs.iterdir()):
        return ""
    try:
        report = loader.uninstall(bpffs)
    except (DataplaneError, OSError) as e:
        _log.error("selftest.stand_down_failed", bpffs=str(bpffs), error=str(e))
        return f"removing the data plane an earlier start attached failed: {e}"
    _log.warning(
        "selftest.stood_down",
        bpffs=str(bpffs),
        detached=report.detached,
        live_paired_sockets=report.paired_sockets,
    )
    return ""


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
