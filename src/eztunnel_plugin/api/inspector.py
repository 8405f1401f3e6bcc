"""The gRPC inspection API `eztunnel.v1.Inspector`, with health and server reflection.

It reads the agent through its view (view.py) and changes nothing: state changes
are `eztunnel.v1.Admin`, served only on the admin socket (admin.py). Map reads run
on the reader's one worker thread (reader.py), never on the event loop, so a large
map can't stall xDS or health; ListFlows reads one bounded page per call.
"""

from __future__ import annotations

import base64
import ctypes
import errno
import re
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from eztunnel_plugin import log
from eztunnel_plugin.api.reader import Reader
from eztunnel_plugin.api.view import AgentView, Flow
from eztunnel_plugin.bpf import layout, maps, syscalls
from eztunnel_plugin.config import Listen
from eztunnel_plugin.errors import BpfError, ReaderBusy
from eztunnel_plugin.pb.eztunnel.v1 import inspector_pb2 as pb
from eztunnel_plugin.pb.eztunnel.v1 import inspector_pb2_grpc as pb_grpc
from eztunnel_plugin.selftest import NO_SPLICE

SERVICE = "eztunnel.v1.Inspector"
ADMIN_SERVICE = "eztunnel.v1.Admin"
DEFAULT_PAGE = 100
MAX_PAGE = 1000
MAX_SCAN = 8 * MAX_PAGE  # sockets one ListFlows page reads at most, flows or not

_log = log.get(__name__)
_T = TypeVar("_T")
_TOKEN = re.compile(r"b(\d{1,10})")


def read_flow_page(dp: maps.Dataplane, bucket: int, size: int) -> tuple[list[Flow], int | None]:
    """Flows from hash bucket `bucket` of the socket map on, and where to resume.

    Whole buckets are read, so a cursor stays valid whatever changes meanwhile. Each
    batch asks for no more sockets than flows are still missing, so the page stays
    within `size` unless one bucket alone holds more.
    """
    fd = dp.maps["ez_sockinfo"]
    vsize = ctypes.sizeof(layout.SockInfo)
    flows: list[Flow] = []
    cursor: int | None = bucket
    scanned = 0
    while cursor is not None and len(flows) < size and scanned < MAX_SCAN:
        want = size - len(flows)
        try:
            entries, after = syscalls.map_lookup_batch(fd, 8, vsize, cursor, want)
        except BpfError as e:
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
            flows.extend(f for f in maps.pairs(pair) if f.active_cookie == cookie)
    return flows, cursor


def _whole_bucket(
    fd: int, vsize: int, bucket: int, count: int
) -> tuple[list[tuple[bytes, bytes]], int | None]:
    """A first bucket larger than `count`: read it whole (the page may grow past size)."""
    while count < layout.MAX_SOCKETS:
        count *= 2
        try:
            return syscalls.map_lookup_batch(fd, 8, vsize, bucket, count)
        except BpfError as e:
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


class Inspector(pb_grpc.InspectorServicer):
    def __init__(self, view: AgentView, reader: Reader) -> None:
        self.view = view
        self.reader = reader

    async def _read(self, context: Any, fn: Callable[..., _T], *args: Any) -> _T:
        try:
            return await self.reader.run(fn, *args)
        except ReaderBusy as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{e}; retry later")
            raise AssertionError("abort() raises") from e

    async def _read_maps(self, context: Any, fn: Callable[..., _T | None], *args: Any) -> _T:
        """A map read; UNAVAILABLE (the call ends) while the data plane is not loaded."""
        got = await self._read(context, fn, *args)
        if got is None:
            st = self.view.selftest
            why = "data plane not loaded yet"
            if st is not None and st.decision == NO_SPLICE:
                why = f"no data plane: the kernel self-test decided not to splice ({st.reason})"
            await context.abort(grpc.StatusCode.UNAVAILABLE, why)
            raise AssertionError("abort() raises")
        return got

    async def GetStatus(self, request: pb.GetStatusRequest, context: Any) -> pb.Status:
        v = self.view
        status = pb.Status(
            version=v.version,
            node=v.node,
            kernel=v.kernel,
            bpffs=v.bpffs,
            cgroup=v.cgroup,
            ready=v.ready,
            endpoint_source=v.endpoint_source,
            uptime_seconds=round(time.time() - v.started, 3),
        )
        dp = await self._read(context, v.dataplane)
        if dp is not None:
            status.enabled = dp.enabled
            status.reused_pins = dp.reused
            status.programs_attached.extend(sorted(dp.programs))
            status.backlog_limit_bytes = dp.backlog_limit
            status.capture_ports.extend(dp.capture_ports)
        xds = v.xds()
        if xds is not None:
            status.xds.address = xds.address
            status.xds.connected = xds.connected
            status.xds.nacks = xds.nacks
            status.xds.last_error = xds.last_error
            status.xds.complete = xds.complete
            status.xds.stale = xds.stale
            status.xds.reconnects = max(0, xds.streams - 1)
            for t in xds.types:
                status.xds.types.add(
                    type_url=t.type_url, last_acked_nonce=t.last_acked_nonce, resources=t.resources
                )
        source_file = v.endpoints_file()
        if source_file is not None:
            status.source_error = source_file.last_error
        status.addresses_refused = v.addresses_refused
        st = v.selftest
        if st is not None:
            status.selftest.decision = st.decision
            status.selftest.reason = st.reason
            status.selftest.kernel = st.kernel
            status.selftest.kernel_listed = st.kernel_listed
            status.selftest.environment = st.environment
            status.selftest.duration_seconds = st.duration_s
            for c in st.checks:
                status.selftest.checks.add(name=c.name, passed=c.passed, detail=c.detail)
        return status

    async def ListEndpoints(
        self, request: pb.ListEndpointsRequest, context: Any
    ) -> pb.ListEndpointsResponse:
        in_map = await self._read_maps(context, self.view.endpoints_in_map)
        owners = self.view.owners()
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
                node=o.node,
                protocol=o.protocol,
            )
        resp.unexpected_in_map.extend(sorted(set(in_map) - set(owners)))
        return resp

    async def ListFlows(self, request: pb.ListFlowsRequest, context: Any) -> pb.ListFlowsResponse:
        size = min(request.page_size or DEFAULT_PAGE, MAX_PAGE)
        bucket = decode_token(request.page_token)
        if bucket is None:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "bad page_token: pass the previous page's next_page_token, or none",
            )
        assert bucket is not None
        page = await self._read_maps(context, self.view.flow_page, bucket, size)
        resp = pb.ListFlowsResponse()
        for f in page.flows:
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
                tcp_bytes_client_to_server=f.tcp_active_to_passive,
                tcp_bytes_server_to_client=f.tcp_passive_to_active,
            )
        if page.after is not None:
            resp.next_page_token = encode_token(page.after)
        return resp

    async def GetStats(self, request: pb.GetStatsRequest, context: Any) -> pb.Stats:
        stats = pb.Stats()
        for name, value in (await self._read_maps(context, self.view.counters)).items():
            stats.counters[name] = value
            if name.startswith("np_"):
                stats.not_paired_reasons[name[3:]] = value
        return stats

    async def WatchEvents(self, request: pb.WatchEventsRequest, context: Any) -> Any:
        async with self.view.subscribe() as queue:
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


async def start(view: AgentView, listen: Listen, reader: Reader, admin_socket: Path) -> ApiServer:
    """Serve `view` on `listen`; map reads run on `reader`; state changes asked here are
    refused with a pointer to `admin_socket`."""
    server = grpc.aio.server()
    pb_grpc.add_InspectorServicer_to_server(Inspector(view, reader), server)
    server.add_generic_rpc_handlers((RefuseStateChanges(str(admin_socket)),))
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
