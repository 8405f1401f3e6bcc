"""The gRPC inspection API `eztunnel.v1.Inspector`, with health and server reflection.

It reads what the agent holds (and the BPF maps themselves); the only thing it
changes is the kill switch, on request.
"""

from __future__ import annotations

import base64
import time
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from eztunnel_plugin import layout, log
from eztunnel_plugin.config import Listen
from eztunnel_plugin.pb.eztunnel.v1 import inspector_pb2 as pb
from eztunnel_plugin.pb.eztunnel.v1 import inspector_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from eztunnel_plugin.agent import Agent

SERVICE = "eztunnel.v1.Inspector"
DEFAULT_PAGE = 100
MAX_PAGE = 1000

_log = log.get(__name__)


def _state(s: layout.SockState) -> str:
    return s.name.lower()


class Inspector(pb_grpc.InspectorServicer):  # type: ignore[misc]
    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def _dp(self, context: grpc.aio.ServicerContext) -> Any:
        if self.agent.dp is None:
            context.set_code(grpc.StatusCode.UNAVAILABLE)
            context.set_details("data plane not loaded yet")
        return self.agent.dp

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
            status.enabled = dp.enabled
            status.reused_pins = dp.reused
            status.programs_attached.extend(sorted(dp.links))
            status.backlog_limit_bytes = dp.config().backlog_limit
            status.capture_ports.extend(dp.capture_ports())
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
        return status

    async def ListEndpoints(
        self, request: pb.ListEndpointsRequest, context: Any
    ) -> pb.ListEndpointsResponse:
        dp = self._dp(context)
        if dp is None:
            return pb.ListEndpointsResponse()
        in_map = dp.endpoints.read_all()
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
        try:
            start = int(base64.urlsafe_b64decode(request.page_token).decode() or 0)
        except ValueError:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad page_token")
        flows = sorted(dp.flows(), key=lambda f: f.active_cookie)
        page = flows[start : start + size]
        resp = pb.ListFlowsResponse(total=len(flows))
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
        if start + size < len(flows):
            resp.next_page_token = base64.urlsafe_b64encode(str(start + size).encode()).decode()
        return resp

    async def GetStats(self, request: pb.GetStatsRequest, context: Any) -> pb.Stats:
        dp = self._dp(context)
        if dp is None:
            return pb.Stats()
        stats = pb.Stats()
        for name, value in dp.counters().items():
            stats.counters[name] = value
            if name.startswith("np_"):
                stats.not_paired_reasons[name[3:]] = value
        return stats

    async def SetEnabled(
        self, request: pb.SetEnabledRequest, context: Any
    ) -> pb.SetEnabledResponse:
        dp = self._dp(context)
        if dp is None:
            return pb.SetEnabledResponse()
        dp.set_enabled(request.enabled)
        _log.warning("killswitch.set", enabled=request.enabled)
        self.agent.events.publish("dataplane.enabled" if request.enabled else "dataplane.disabled")
        return pb.SetEnabledResponse(enabled=dp.enabled)

    async def WatchEvents(self, request: pb.WatchEventsRequest, context: Any) -> Any:
        async with self.agent.events.subscribe() as queue:
            # Tells the client the stream is live: nothing published from here on is missed.
            yield pb.Event(time=time.time(), kind="watch.started")
            while True:
                event = await queue.get()
                yield pb.Event(time=event.time, kind=event.kind, fields=event.fields)


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
