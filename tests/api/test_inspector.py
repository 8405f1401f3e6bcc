"""The inspection API: every field it serves from the agent's view (a fake one, in
process), and against a real data plane bounded pages read off the event loop.

For the kernel tests the socket map is filled directly through the data plane's map fd
(a private bpffs), with pairs of sockets as the programs record them.
"""

from __future__ import annotations

import asyncio
import json
import random
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from eztunnel_lab.netlab import Lab
from eztunnel_plugin import cli, config
from eztunnel_plugin.agent import Agent
from eztunnel_plugin.api import inspector
from eztunnel_plugin.api.reader import MAX_WAITING_READS, Reader
from eztunnel_plugin.api.view import (
    FileStatus,
    Owner,
    SelftestCheck,
    SelftestStatus,
    XdsStatus,
    XdsTypeStatus,
)
from eztunnel_plugin.bpf import layout, syscalls
from eztunnel_plugin.bpf.maps import Dataplane
from eztunnel_plugin.pb.eztunnel.v1 import inspector_pb2 as pb
from eztunnel_plugin.pb.eztunnel.v1 import inspector_pb2_grpc as pb_grpc

from ..test_agent import AgentProc, endpoints_file, free_port
from .fake_view import FakeView, flow

kernel = pytest.mark.kernel


def put_pair(dp: Dataplane, active: int) -> None:
    """A spliced pair: `active` (the connect() side) and its peer `active + 1`."""
    fd = dp.maps["ez_sockinfo"]
    for cookie, peer, is_active in ((active, active + 1, 1), (active + 1, active, 0)):
        info = layout.SockInfo(
            state=layout.SockState.PAIRED, rule=layout.Rule.CROSS_MIRROR, peer_cookie=peer,
            active=is_active, local=layout.Addr.of("10.1.0.1"), remote=layout.Addr.of("10.1.0.2"),
            local_port=1024 + cookie % 60000, remote_port=80,
        )  # fmt: skip
        syscalls.map_update(fd, struct.pack("=Q", cookie), bytes(info))


def put_lone(dp: Dataplane, cookie: int) -> None:
    """A socket that never paired: in the map, but no flow."""
    info = layout.SockInfo(state=layout.SockState.TAINTED, local=layout.Addr.of("10.1.0.1"))
    syscalls.map_update(dp.maps["ez_sockinfo"], struct.pack("=Q", cookie), bytes(info))


def delete_pair(dp: Dataplane, active: int) -> None:
    for cookie in (active, active + 1):
        syscalls.map_delete(dp.maps["ez_sockinfo"], struct.pack("=Q", cookie))


def fill(dp: Dataplane, pairs: int, first: int = 1_000_001) -> set[int]:
    actives = {first + 2 * i for i in range(pairs)}
    for c in actives:
        put_pair(dp, c)
    return actives


def walk(dp: Dataplane, size: int, between: Callable[[list[int]], None] | None = None) -> list[int]:
    """Every page from the first on; `between` runs after each page but the last."""
    seen: list[int] = []
    cursor: int | None = 0
    for _ in range(100_000):
        assert cursor is not None
        page, cursor = inspector.read_flow_page(dp, cursor, size)
        if size >= 16:  # smaller pages may grow to one whole hash bucket
            assert len(page) <= size
        seen += [f.active_cookie for f in page]
        if cursor is None:
            return seen
        if between is not None:
            between([f.active_cookie for f in page])
    raise AssertionError("the walk did not end")


@kernel
@pytest.mark.parametrize("size", [1, 7, 100, 1000])
def test_pages_list_every_flow_exactly_once(dp: Dataplane, size: int) -> None:
    want = fill(dp, 3000)
    for c in range(5_000_001, 5_002_001):
        put_lone(dp, c)  # not flows: never listed
    seen = walk(dp, size)
    assert len(seen) == len(want) and set(seen) == want


@kernel
def test_pages_stay_exact_while_the_map_changes(dp: Dataplane) -> None:
    # Flows close and open between pages, among them the last one of each page
    # (a cursor made of a key would restart from the beginning there).
    stable = fill(dp, 2000)
    churn = fill(dp, 1000, first=3_000_001)
    rng = random.Random(7)
    gone_unseen: set[int] = set()
    seen_so_far: set[int] = set()
    fresh = iter(range(9_000_001, 9_100_001, 2))

    def between(page: list[int]) -> None:
        seen_so_far.update(page)
        unseen = sorted(churn - seen_so_far)
        for c in [c for c in page if c in churn] + rng.sample(unseen, min(3, len(unseen))):
            delete_pair(dp, c)
            churn.discard(c)
            if c not in seen_so_far:
                gone_unseen.add(c)
        for _ in range(5):
            put_pair(dp, next(fresh))

    seen = walk(dp, 50, between)
    assert len(seen) == len(set(seen)), "a flow was listed twice"
    assert stable <= set(seen), "a flow present all along was missed"
    assert not gone_unseen & set(seen)


@kernel
def test_a_page_reads_a_bounded_number_of_sockets(dp: Dataplane) -> None:
    for c in range(1, 3 * inspector.MAX_SCAN):
        put_lone(dp, c)
    want = fill(dp, 10)
    page, cursor = inspector.read_flow_page(dp, 0, 1000)
    assert cursor is not None and len(page) < 10  # stopped early, with a way on
    assert set(walk(dp, 1000)) == want


# ---- the gRPC server, in process -------------------------------------------------------


class Served:
    def __init__(self, agent: Agent, server: inspector.ApiServer, addr: str) -> None:
        self.agent, self.server, self.addr = agent, server, addr


@pytest.fixture
def make_agent(lab: Lab, dp: Dataplane, tmp_path: Path) -> Iterator[Agent]:
    argv = ["run", "--bpffs", str(lab.bpffs), "--cgroup", str(lab.cgroup),
            "--endpoints-file", str(endpoints_file(tmp_path / "e"))]  # fmt: skip
    agent = Agent(config.from_args(cli.build_parser().parse_args(argv), {}, False))
    agent.dp = dp
    yield agent
    agent.reader.close()


async def serve(agent: Agent) -> Served:
    addr = f"127.0.0.1:{free_port()}"
    host, port = addr.split(":")
    listen = config.Listen(host, int(port))
    server = await inspector.start(agent.view, listen, agent.reader, agent.cfg.admin_socket)
    await server.set_serving(True)
    return Served(agent, server, addr)


class Gate:
    """read_flow_page held on the reader thread until opened (bounded wait)."""

    def __init__(self, real: Callable[..., Any]) -> None:
        self.real = real
        self.opened = threading.Event()
        self.entered = threading.Event()

    def __call__(self, *args: Any) -> Any:
        self.entered.set()
        assert self.opened.wait(timeout=60), "gate never opened"
        return self.real(*args)


@kernel
def test_a_slow_map_read_does_not_stall_health_or_the_loop(
    make_agent: Agent, dp: Dataplane, monkeypatch: pytest.MonkeyPatch
) -> None:
    want = fill(dp, 500)
    gate = Gate(inspector.read_flow_page)
    monkeypatch.setattr(inspector, "read_flow_page", gate)

    async def main() -> None:
        s = await serve(make_agent)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        tick_task = asyncio.create_task(ticker())
        try:
            async with grpc.aio.insecure_channel(s.addr) as channel:
                flows = pb_grpc.InspectorStub(channel).ListFlows(
                    pb.ListFlowsRequest(page_size=1000), timeout=60
                )
                await asyncio.to_thread(gate.entered.wait, 30)
                assert gate.entered.is_set(), "ListFlows never reached the map"
                # The read is stuck on the reader thread; the loop goes on serving.
                before = ticks
                check = health_pb2_grpc.HealthStub(channel).Check  # type: ignore[attr-defined]
                reply = await check(health_pb2.HealthCheckRequest(service=""), timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
                await asyncio.sleep(0.1)
                assert ticks > before
                assert not flows.done()
                gate.opened.set()
                page = await flows
                assert {f.client_socket_cookie for f in page.flows} == want
        finally:
            gate.opened.set()
            tick_task.cancel()
            await s.server.stop(0)

    asyncio.run(main())


@kernel
def test_reads_past_the_queue_limit_are_refused(
    make_agent: Agent, dp: Dataplane, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(dp, 10)
    gate = Gate(inspector.read_flow_page)
    monkeypatch.setattr(inspector, "read_flow_page", gate)

    async def main() -> None:
        s = await serve(make_agent)
        try:
            async with grpc.aio.insecure_channel(s.addr) as channel:
                stub = pb_grpc.InspectorStub(channel)
                calls = [
                    stub.ListFlows(pb.ListFlowsRequest(), timeout=60)
                    for _ in range(MAX_WAITING_READS)
                ]
                for _ in range(3000):  # bounded: until every call waits on the reader
                    if make_agent.reader.waiting == MAX_WAITING_READS:
                        break
                    await asyncio.sleep(0.01)
                assert make_agent.reader.waiting == MAX_WAITING_READS
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.GetStats(pb.GetStatsRequest(), timeout=10)
                assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                gate.opened.set()
                pages = await asyncio.gather(*calls)
                assert all(len(p.flows) == 10 for p in pages)
                assert len((await stub.GetStats(pb.GetStatsRequest(), timeout=10)).counters) > 0
        finally:
            gate.opened.set()
            await s.server.stop(0)

    asyncio.run(main())


@kernel
def test_page_tokens_over_grpc(make_agent: Agent, dp: Dataplane) -> None:
    want = fill(dp, 2500)

    async def main() -> None:
        s = await serve(make_agent)
        try:
            async with grpc.aio.insecure_channel(s.addr) as channel:
                stub = pb_grpc.InspectorStub(channel)
                seen: list[int] = []
                token = ""
                for _ in range(1000):
                    page = await stub.ListFlows(
                        pb.ListFlowsRequest(page_size=1000, page_token=token), timeout=10
                    )
                    assert len(page.flows) <= 1000
                    seen += [f.client_socket_cookie for f in page.flows]
                    token = page.next_page_token
                    if not token:
                        break
                assert len(seen) == len(want) and set(seen) == want
                for bad in ("x", "MTIz", inspector.encode_token(1 << 32)):  # "123": not ours either
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        await stub.ListFlows(pb.ListFlowsRequest(page_token=bad), timeout=10)
                    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        finally:
            await s.server.stop(0)

    asyncio.run(main())


# ---- the agent process with a full map -------------------------------------------------


@kernel
def test_full_map_through_the_cli_while_health_answers(lab: Lab, tmp_path: Path) -> None:
    agent = AgentProc(lab, "--endpoints-file", str(endpoints_file(tmp_path / "e")))
    try:
        agent.wait_serving()
        with Dataplane.open(lab.bpffs) as plane:
            want = fill(plane, (layout.MAX_SOCKETS - 1000) // 2)
        stop = threading.Event()
        answers: list[int] = []
        errors: list[Exception] = []

        def check_health() -> None:
            with grpc.insecure_channel(agent.addr) as channel:
                check = health_pb2_grpc.HealthStub(channel).Check  # type: ignore[attr-defined]
                while not stop.is_set() and len(answers) < 10_000:
                    try:
                        answers.append(check(health_pb2.HealthCheckRequest(), timeout=5).status)
                    except grpc.RpcError as e:
                        errors.append(e)
                        return

        checker = threading.Thread(target=check_health)
        checker.start()
        try:
            out = agent.cli("flows", "--json").stdout
        finally:
            stop.set()
            checker.join(timeout=30)
        assert errors == []
        cookies = [int(f["client_socket_cookie"]) for f in json.loads(out)]
        assert len(cookies) == len(want) and set(cookies) == want
        assert answers and set(answers) == {health_pb2.HealthCheckResponse.SERVING}
        table = agent.cli("flows").stdout
        assert table.startswith(f"{len(want)} spliced flows at ")
    finally:
        agent.stop()


# ---- every field from the view (a fake agent, no kernel) --------------------------------

ADMIN_SOCKET = Path("/run/ez-test/admin.sock")


def on_fake(fake: FakeView, test: Callable[[grpc.aio.Channel], Any]) -> None:
    """Serve `fake` on a free port, run `test(channel)` (a coroutine function), stop."""

    async def main() -> None:
        reader = Reader()
        listen = config.Listen("127.0.0.1", free_port())
        server = await inspector.start(fake, listen, reader, ADMIN_SOCKET)
        await server.set_serving(True)
        try:
            async with grpc.aio.insecure_channel(str(listen)) as channel:
                await test(channel)
        finally:
            await server.stop(0)
            reader.close()

    asyncio.run(main())


XDS_STATUS = XdsStatus(
    address="istiod.istio-system.svc:15012", connected=True, complete=True, stale=False,
    nacks=2, streams=3, protocol_errors=1, last_error="stream reset",
    types=(XdsTypeStatus("type.googleapis.com/istio.workload.Address", "n-7", 12),),
)  # fmt: skip


def test_status_carries_every_field_of_the_view() -> None:
    fake = FakeView(xds_status=XDS_STATUS, addresses_refused=4)

    async def test(channel: grpc.aio.Channel) -> None:
        stub = pb_grpc.InspectorStub(channel)
        s = await stub.GetStatus(pb.GetStatusRequest(), timeout=10)
        assert (s.version, s.node, s.kernel, s.bpffs, s.cgroup) == (
            "9.9.9", "node-1", "6.18.0-test", "/sys/fs/bpf/test", "/sys/fs/cgroup/test",
        )  # fmt: skip
        assert s.ready is True and s.endpoint_source == "xds"
        assert 5 <= s.uptime_seconds < 600
        assert s.enabled is True and s.reused_pins is False
        assert list(s.programs_attached) == ["link_msg", "link_sockops"]
        assert s.backlog_limit_bytes == 4 << 20 and list(s.capture_ports) == [15001]
        x = s.xds
        assert (x.address, x.connected, x.complete, x.stale) == (XDS_STATUS.address, 1, 1, 0)
        assert (x.nacks, x.reconnects, x.last_error) == (2, 2, "stream reset")
        assert [(t.type_url, t.last_acked_nonce, t.resources) for t in x.types] == [
            ("type.googleapis.com/istio.workload.Address", "n-7", 12)
        ]
        assert s.addresses_refused == 4 and s.source_error == ""

    on_fake(fake, test)
    assert fake.read_threads and all(t.startswith("ez-reader") for t in fake.read_threads)


def test_status_of_a_file_source_before_the_data_plane_is_loaded() -> None:
    fake = FakeView(endpoint_source="file:/etc/eps.yaml", file_status=FileStatus("bad: x", 3),
                    plane=None, ready=False)  # fmt: skip

    async def test(channel: grpc.aio.Channel) -> None:
        stub = pb_grpc.InspectorStub(channel)
        s = await stub.GetStatus(pb.GetStatusRequest(), timeout=10)
        assert s.endpoint_source == "file:/etc/eps.yaml" and s.source_error == "bad: x"
        assert s.ready is False and s.enabled is False and list(s.programs_attached) == []
        assert not s.HasField("xds")

    on_fake(fake, test)


def test_endpoints_are_checked_against_the_map() -> None:
    fake = FakeView(
        owner_map={
            "10.0.0.2": Owner("uid-b", "b", "ns", "node-1", "TCP"),
            "10.0.0.1": Owner("uid-a", "a", "ns", "node-1", "HBONE"),
        },
        in_map={"10.0.0.1": 1, "10.9.9.9": 1},
    )

    async def test(channel: grpc.aio.Channel) -> None:
        stub = pb_grpc.InspectorStub(channel)
        r = await stub.ListEndpoints(pb.ListEndpointsRequest(), timeout=10)
        got = [(e.ip, e.workload_uid, e.name, e.namespace, e.node, e.protocol, e.in_map, e.flags)
               for e in r.endpoints]  # fmt: skip
        assert got == [
            ("10.0.0.1", "uid-a", "a", "ns", "node-1", "HBONE", True, 1),
            ("10.0.0.2", "uid-b", "b", "ns", "node-1", "TCP", False, 0),
        ]
        assert list(r.unexpected_in_map) == ["10.9.9.9"]

    on_fake(fake, test)


def test_flows_page_through_the_view_with_every_field() -> None:
    fake = FakeView(flows=[flow(100 + 2 * i) for i in range(10)])

    async def test(channel: grpc.aio.Channel) -> None:
        stub = pb_grpc.InspectorStub(channel)
        seen: list[Any] = []
        token = ""
        for _ in range(10):  # bounded: 4 pages of 3 cover 10 flows
            page = await stub.ListFlows(pb.ListFlowsRequest(page_size=3, page_token=token),
                                        timeout=10)  # fmt: skip
            assert len(page.flows) <= 3
            seen += page.flows
            token = page.next_page_token
            if not token:
                break
        assert [f.client_socket_cookie for f in seen] == [100 + 2 * i for i in range(10)]
        f = seen[0]
        assert (f.client, f.server, f.rule) == ("10.1.0.1:40000", "10.1.0.2:80", "cross_mirror")
        assert (f.server_socket_cookie, f.client_netns_cookie, f.server_netns_cookie) == (
            101, 11, 22,
        )  # fmt: skip
        assert (f.bytes_client_to_server, f.bytes_server_to_client) == (1100, 2100)
        assert (f.client_state, f.server_state) == ("paired", "tainted")

    on_fake(fake, test)


def test_stats_split_the_not_paired_reasons() -> None:
    fake = FakeView(counter_values={"pairs": 7, "np_no_peer": 3, "np_out_of_scope": 5})

    async def test(channel: grpc.aio.Channel) -> None:
        stub = pb_grpc.InspectorStub(channel)
        s = await stub.GetStats(pb.GetStatsRequest(), timeout=10)
        assert dict(s.counters) == {"pairs": 7, "np_no_peer": 3, "np_out_of_scope": 5}
        assert dict(s.not_paired_reasons) == {"no_peer": 3, "out_of_scope": 5}

    on_fake(fake, test)


def test_map_reads_are_unavailable_until_the_data_plane_is_loaded() -> None:
    fake = FakeView(plane=None)

    async def test(channel: grpc.aio.Channel) -> None:
        stub = pb_grpc.InspectorStub(channel)
        for call in (
            stub.ListEndpoints(pb.ListEndpointsRequest(), timeout=10),
            stub.ListFlows(pb.ListFlowsRequest(), timeout=10),
            stub.GetStats(pb.GetStatsRequest(), timeout=10),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await call
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
            assert e.value.details() == "data plane not loaded yet"

    on_fake(fake, test)


SELFTEST = SelftestStatus(
    decision="attach_with_workaround", reason="kernel 6.18.44 is known to lose epoll wakeups",
    checks=(SelftestCheck("epoll/plain", True, ""),
            SelftestCheck("fionread/plain", False, "FIONREAD says 0 of 16384"),
            SelftestCheck("fionread/skb_verdict", True, "")),
    kernel="6.18.44", kernel_listed=True, environment="a private netns", duration_s=0.41,
)  # fmt: skip


def test_status_carries_the_self_test() -> None:
    async def test(channel: grpc.aio.Channel) -> None:
        s = await pb_grpc.InspectorStub(channel).GetStatus(pb.GetStatusRequest(), timeout=10)
        t = s.selftest
        assert (t.decision, t.reason, t.kernel, t.kernel_listed, t.environment) == (
            SELFTEST.decision, SELFTEST.reason, "6.18.44", True, "a private netns",
        )  # fmt: skip
        assert t.duration_seconds == pytest.approx(0.41)
        assert [(c.name, c.passed, c.detail) for c in t.checks] == [
            ("epoll/plain", True, ""), ("fionread/plain", False, "FIONREAD says 0 of 16384"),
            ("fionread/skb_verdict", True, ""),
        ]  # fmt: skip

    on_fake(FakeView(selftest=SELFTEST), test)

    async def before(channel: grpc.aio.Channel) -> None:
        s = await pb_grpc.InspectorStub(channel).GetStatus(pb.GetStatusRequest(), timeout=10)
        assert not s.HasField("selftest")  # not decided yet

    on_fake(FakeView(selftest=None), before)


def test_map_reads_after_a_no_splice_decision_say_why() -> None:
    refused = SelftestStatus("no_splice", "epoll: lost EPOLLIN", ())

    async def test(channel: grpc.aio.Channel) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await pb_grpc.InspectorStub(channel).GetStats(pb.GetStatsRequest(), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert e.value.details() == (
            "no data plane: the kernel self-test decided not to splice (epoll: lost EPOLLIN)"
        )

    on_fake(FakeView(plane=None, selftest=refused), test)


def test_watch_events_streams_what_the_agent_publishes() -> None:
    fake = FakeView()

    async def test(channel: grpc.aio.Channel) -> None:
        stub = pb_grpc.InspectorStub(channel)
        stream = stub.WatchEvents(pb.WatchEventsRequest(), timeout=10)
        first = await stream.read()
        assert isinstance(first, pb.Event) and first.kind == "watch.started"
        fake.events.publish("endpoint.enrolled", ip="10.0.0.1", flags=1)
        event = await stream.read()
        assert isinstance(event, pb.Event)
        assert event.kind == "endpoint.enrolled"
        assert dict(event.fields) == {"ip": "10.0.0.1", "flags": "1"}
        stream.cancel()

    on_fake(fake, test)


def test_state_changes_on_the_tcp_port_are_refused_and_change_nothing() -> None:
    fake = FakeView()

    async def test(channel: grpc.aio.Channel) -> None:
        for method in ("/eztunnel.v1.Inspector/SetEnabled", "/eztunnel.v1.Admin/SetEnabled"):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                call = channel.unary_unary(
                    method,
                    request_serializer=pb.SetEnabledRequest.SerializeToString,
                    response_deserializer=pb.SetEnabledResponse.FromString,
                )
                await call(pb.SetEnabledRequest(enabled=False), timeout=10)
            assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert str(ADMIN_SOCKET) in str(e.value.details())

    on_fake(fake, test)
    assert fake.switched == [] and fake.plane is not None and fake.plane.enabled


def test_page_tokens_round_trip_and_foreign_ones_are_refused() -> None:
    for bucket in (0, 1, 4095, (1 << 32) - 1):
        assert inspector.decode_token(inspector.encode_token(bucket)) == bucket
    assert inspector.decode_token("") == 0
    for bad in ("x", "MTIz", "!!", inspector.encode_token(1 << 32)):  # "MTIz": b"123"
        assert inspector.decode_token(bad) is None, bad
