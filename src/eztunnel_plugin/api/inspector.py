"""The gRPC inspection API `eztunnel.v1.Inspector`, with health and server reflection.

It reads what the agent holds (and the BPF maps themselves) and changes nothing:
state changes are `eztunnel.v1.Admin`, served only on the admin socket (admin.py).
Map reads run on one worker thread, never on the event loop, so a large map
can't stall xDS or health; ListFlows reads one bounded page per call.
"""

from __future__ import annotations

import asyncio
import base64
import ctypes
import errno
import re
import struct
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from eztunnel_plugin import log
from eztunnel_plugin.bpf import dataplane, layout, syscalls
from eztunnel_plugin.config import Listen
from eztunnel_plugin.pb.eztunnel.v1 import inspector_pb2 as pb
from eztunnel_plugin.pb.eztunnel.v1 import inspector_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from eztunnel_plugin.agent import Agent

SERVICE = "eztunnel.v1.Inspector"
ADMIN_SERVICE = "eztunnel.v1.Admin"
DEFAULT_PAGE = 100
MAX_PAGE = 1000
MAX_SCAN = 8 * MAX_PAGE  # sockets one ListFlows page reads at most, flows or not
MAX_WAITING_READS = 32

_log = log.get(__name__)
_T = TypeVar("_T")
_TOKEN = re.compile(r"b(\d{1,10})")


class ReaderBusy(Exception):
    """Too many reads are already waiting for the reader."""


class Reader:
    """Map reads for the API and metrics, on one worker thread off the event loop.

    One worker: a burst of requests queues up instead of running many map reads at
    once; past `max_waiting` a read is refused rather than queued.
    """

    def __init__(self, max_waiting: int = MAX_WAITING_READS) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ez-reader")
        self._max = max_waiting
        self._waiting = 0

    @property
    def waiting(self) -> int:
        """Reads running or queued."""
        return self._waiting

    async def run(self, fn: Callable[..., _T], *args: Any) -> _T:
        if self._waiting >= self._max:
            raise ReaderBusy(f"{self._waiting} map reads are waiting already")
        self._waiting += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        finally:
            self._waiting -= 1

    def close(self) -> None:
        """Wait for the read in progress (the maps must outlive it); drop queued ones."""
        self._pool.shutdown(wait=True, cancel_futures=True)


def read_flow_page(
    dp: dataplane.Dataplane, bucket: int, size: int
) -> tuple[list[dataplane.Flow], int | None]:
    """Flows from hash bucket `bucket` of the socket map on, and where to resume.

    Whole buckets are read, so a cursor stays valid whatever changes meanwhile. Each
    batch asks for no more sockets than flows are still missing, so the page stays
    within `size` unless one bucket alone holds more.
    """
    fd = dp.maps["ez_sockinfo"]
    vsize = ctypes.sizeof(layout.SockInfo)
    flows: list[dataplane.Flow] = []
    cursor: int | None = bucket
    scanned = 0
    while cursor is not None and len(flows) < size and scanned < MAX_SCAN:
        want = size - len(flows)
        try:
            entries, after = syscalls.map_lookup_batch(fd, 8, vsize, cursor, want)
        except syscalls.BpfError as e:
            if e.errno != errno.ENOSPC:
                raise
            if flows:
                break  # the next bucket holds more than this page has room for
            entries, after = _whole_bucket(fd, vsize, cursor, want)
        scanned += len(entries)
        cursor = after
        for key, raw in entries:
            info = layout.SockInfo.from_buffer_copy(raw)
            if not info.active or info.rule == layout.Rule.NONE:
                continue
            peer = syscalls.map_lookup(fd, struct.pack("=Q", info.peer_cookie), vsize)
            if peer is None:
                continue
            (cookie,) = struct.unpack("=Q", key)
            pair = {cookie: info, info.peer_cookie: layout.SockInfo.from_buffer_copy(peer)}
            # One flow per active socket: its peer is listed when the walk reaches it.
            flows.extend(f for f in dataplane._pairs(pair) if f.active_cookie == cookie)
    return flows, cursor


def _whole_bucket(
    fd: int, vsize: int, bucket: int, count: int
) -> tuple[list[tuple[bytes, bytes]], int | None]:
    """A first bucket larger than `count`: read it whole (the page may grow past size)."""
    while count < layout.MAX_SOCKETS:
        count *= 2
        try:
            return syscalls.map_lookup_batch(fd, 8, vsize, bucket, count)
        except syscalls.BpfError as e:
            if e.errno != errno.ENOSPC:
                raise
    return syscalls.map_lookup_batch(fd, 8, vsize, bucket, layout.MAX_SOCKETS)


def encode_token(bucket: int) -> str:
    return base64.urlsafe_b64encode(f"b{bucket}".encode()).decode()


def decode_token(token: str) -> int | None:
    """The bucket a page token resumes at (0 for none), or None when it is not ours."""
    if not token:
        return 0
    try:
        m = _TOKEN.fullmatch(base64.urlsafe_b64decode(token.encode()).decode())
    except ValueError:
        return None
    return int(m.group(1)) if m and int(m.group(1)) < 1 << 32 else None


def _state(s: layout.SockState) -> str:
    return s.name.lower()


def addresses_refused(a: Agent) -> int:
    """Addresses a source named that were never enrolled (the sources' own check, then
    the reconciler's, which should never find one)."""
    total = a.state.refused_total if a.state is not None else 0
    return total + (a.reconciler.refused if a.reconciler is not None else 0)


class Inspector(pb_grpc.InspectorServicer):
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def _dp(self, context: Any) -> Any:
        if self.agent.dp is None:
            context.set_code(grpc.StatusCode.UNAVAILABLE)
            context.set_details("data plane not loaded yet")
        return self.agent.dp

    async def _read(self, context: Any, fn: Callable[..., _T], *args: Any) -> _T:
        try:
            return await self.agent.reader.run(fn, *args)
        except ReaderBusy as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{e}; retry later")
            raise AssertionError("abort() raises") from e

    async def GetStatus(self, request: pb.GetStatusRequest, context: Any) -> pb.Status:
        a = self.agent
        dp = a.dp
        status = pb.Status(
            version=a.version,
            node=a.cfg.node_name,
            kernel=a.kernel,
            bpffs=str(a.cfg.bpffs),
            cgroup=str(a.cfg.cgroup),
            ready=a.ready,
            endpoint_source=a.source,
            uptime_seconds=round(time.time() - a.started, 3),
        )
        if dp is not None:
            cfg, ports = await self._read(context, lambda: (dp.config(), dp.capture_ports()))
            status.enabled = bool(cfg.enabled)
            status.reused_pins = dp.reused
            status.programs_attached.extend(sorted(dp.links))
            status.backlog_limit_bytes = cfg.backlog_limit
            status.capture_ports.extend(ports)
        if a.xds is not None and a.state is not None:
            st = a.xds.stats
            status.xds.address = a.xds.config.address
            status.xds.connected = st.connected
            status.xds.nacks = st.nacks
            status.xds.last_error = st.last_error
            status.xds.complete = a.state.complete
            status.xds.stale = a.stale
            status.xds.reconnects = max(0, st.streams - 1)
            for type_url in a.xds.config.types:
                status.xds.types.add(
                    type_url=type_url,
                    last_acked_nonce=st.acked_nonce.get(type_url, ""),
                    resources=len(a.state.held(type_url)),
                )
        if a.static is not None:
            status.source_error = a.static.last_error
        status.addresses_refused = addresses_refused(a)
        return status

    async def ListEndpoints(
        self, request: pb.ListEndpointsRequest, context: Any
    ) -> pb.ListEndpointsResponse:
        dp = self._dp(context)
        if dp is None:
            return pb.ListEndpointsResponse()
        in_map = await self._read(context, dp.endpoints.read_all)
        owners = self.agent.owners()
        resp = pb.ListEndpointsResponse()
        for ip in sorted(owners):
            o = owners[ip]
            resp.endpoints.add(
                ip=ip,
                workload_uid=o.uid,
                name=o.name,
                namespace=o.namespace,
                in_map=ip in in_map,
                flags=in_map.get(ip, 0),
            )
        resp.unexpected_in_map.extend(sorted(set(in_map) - set(owners)))
        return resp

    async def ListFlows(self, request: pb.ListFlowsRequest, context: Any) -> pb.ListFlowsResponse:
        dp = self._dp(context)
        if dp is None:
            return pb.ListFlowsResponse()
        size = min(request.page_size or DEFAULT_PAGE, MAX_PAGE)
        bucket = decode_token(request.page_token)
        if bucket is None:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "bad page_token: pass the previous page's next_page_token, or none",
            )
        assert bucket is not None
        page, after = await self._read(context, read_flow_page, dp, bucket, size)
        resp = pb.ListFlowsResponse()
        for f in page:
            resp.flows.add(
                client=f.local,
                server=f.remote,
                client_netns_cookie=f.active_netns,
                server_netns_cookie=f.passive_netns,
                rule=f.rule.name.lower(),
                bytes_client_to_server=f.bytes_active_to_passive,
                bytes_server_to_client=f.bytes_passive_to_active,
                client_socket_cookie=f.active_cookie,
                server_socket_cookie=f.passive_cookie,
                client_state=_state(f.state_active),
                server_state=_state(f.state_passive),
            )
        if after is not None:
            resp.next_page_token = encode_token(after)
        return resp

    async def GetStats(self, request: pb.GetStatsRequest, context: Any) -> pb.Stats:
        dp = self._dp(context)
        if dp is None:
            return pb.Stats()
        stats = pb.Stats()
        for name, value in (await self._read(context, dp.counters)).items():
            stats.counters[name] = value
            if name.startswith("np_"):
                stats.not_paired_reasons[name[3:]] = value
        return stats

    async def WatchEvents(self, request: pb.WatchEventsRequest, context: Any) -> Any:
        async with self.agent.events.subscribe() as queue:
            # Tells the client the stream is live: nothing published from here on is missed.
            yield pb.Event(time=time.time(), kind="watch.started")
            while True:
                event = await queue.get()
                yield pb.Event(time=event.time, kind=event.kind, fields=event.fields)


class RefuseStateChanges(grpc.GenericRpcHandler):
    """State changes asked on the TCP port (the old Inspector/SetEnabled, or Admin):
    refused with a pointer to the admin socket, where the caller can be identified."""

    METHODS = frozenset({"/eztunnel.v1.Inspector/SetEnabled"})

    def __init__(self, admin_socket: str) -> None:
        self.admin_socket = admin_socket

    def service(self, details: Any) -> Any:
        method = str(details.method)
        if method not in self.METHODS and not method.startswith(f"/{ADMIN_SERVICE}/"):
            return None

        async def refuse(request: bytes, context: Any) -> None:
            _log.warning("admin.refused_on_tcp", method=method, peer=context.peer())
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{method.rsplit('/', 1)[-1]} changes state: it is served only on the admin "
                f"socket {self.admin_socket} ({ADMIN_SERVICE}, root only), not on this port",
            )

        return grpc.unary_unary_rpc_method_handler(refuse)


class ApiServer:
    """The gRPC server with Inspector, health and reflection."""

    def __init__(self, server: grpc.aio.Server, health_servicer: Any) -> None:
        self.server = server
        self.health = health_servicer

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", SERVICE):
            await self.health.set(service, status)

    async def stop(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def start(agent: Agent, listen: Listen) -> ApiServer:
    server = grpc.aio.server()
    pb_grpc.add_InspectorServicer_to_server(Inspector(agent), server)
    server.add_generic_rpc_handlers((RefuseStateChanges(str(agent.cfg.admin_socket)),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            SERVICE,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    try:
        server.add_insecure_port(str(listen))
    except RuntimeError as e:
        raise OSError(f"cannot listen on {listen}: {e}") from e
    if not listen.loopback:
        _log.warning(
            "api.exposed",
            listen=str(listen),
            note="the inspection API is reachable from the network",
        )
    api = ApiServer(server, health_servicer)
    await api.set_serving(False)
    await server.start()
    _log.info("api.listening", listen=str(listen))
    return api
