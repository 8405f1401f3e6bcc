"""The inspection API against a real data plane: bounded pages read off the event loop.

The socket map is filled directly through the data plane's map fd (a private bpffs),
with pairs of sockets as the programs record them.
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
from eztunnel_plugin.bpf import dataplane, layout, syscalls
from eztunnel_plugin.pb.eztunnel.v1 import inspector_pb2 as pb
from eztunnel_plugin.pb.eztunnel.v1 import inspector_pb2_grpc as pb_grpc

from .test_agent import AgentProc, endpoints_file, free_port

pytestmark = pytest.mark.kernel


def put_pair(dp: dataplane.Dataplane, active: int) -> None:
    """A spliced pair: `active` (the connect() side) and its peer `active + 1`."""
    fd = dp.maps["ez_sockinfo"]
    for cookie, peer, is_active in ((active, active + 1, 1), (active + 1, active, 0)):
        info = layout.SockInfo(
            state=layout.SockState.PAIRED, rule=layout.Rule.CROSS_MIRROR, peer_cookie=peer,
            active=is_active, local=layout.Addr.of("10.1.0.1"), remote=layout.Addr.of("10.1.0.2"),
            local_port=1024 + cookie % 60000, remote_port=80,
        )  # fmt: skip
        syscalls.map_update(fd, struct.pack("=Q", cookie), bytes(info))


def put_lone(dp: dataplane.Dataplane, cookie: int) -> None:
    """A socket that never paired: in the map, but no flow."""
    info = layout.SockInfo(state=layout.SockState.TAINTED, local=layout.Addr.of("10.1.0.1"))
    syscalls.map_update(dp.maps["ez_sockinfo"], struct.pack("=Q", cookie), bytes(info))


def delete_pair(dp: dataplane.Dataplane, active: int) -> None:
    for cookie in (active, active + 1):
        syscalls.map_delete(dp.maps["ez_sockinfo"], struct.pack("=Q", cookie))


def fill(dp: dataplane.Dataplane, pairs: int, first: int = 1_000_001) -> set[int]:
    actives = {first + 2 * i for i in range(pairs)}
    for c in actives:
        put_pair(dp, c)
    return actives


def walk(
    dp: dataplane.Dataplane, size: int, between: Callable[[list[int]], None] | None = None
) -> list[int]:
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


@pytest.mark.parametrize("size", [1, 7, 100, 1000])
def test_pages_list_every_flow_exactly_once(dp: dataplane.Dataplane, size: int) -> None:
    want = fill(dp, 3000)
    for c in range(5_000_001, 5_002_001):
        put_lone(dp, c)  # not flows: never listed
    seen = walk(dp, size)
    assert len(seen) == len(want) and set(seen) == want


def test_pages_stay_exact_while_the_map_changes(dp: dataplane.Dataplane) -> None:
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


def test_a_page_reads_a_bounded_number_of_sockets(dp: dataplane.Dataplane) -> None:
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
def make_agent(lab: Lab, dp: dataplane.Dataplane, tmp_path: Path) -> Iterator[Agent]:
    argv = ["run", "--bpffs", str(lab.bpffs), "--cgroup", str(lab.cgroup),
            "--endpoints-file", str(endpoints_file(tmp_path / "e"))]  # fmt: skip
    agent = Agent(config.from_args(cli.build_parser().parse_args(argv), {}, False))
    agent.dp = dp
    yield agent
    agent.reader.close()


async def serve(agent: Agent) -> Served:
    addr = f"127.0.0.1:{free_port()}"
    host, port = addr.split(":")
    server = await inspector.start(agent, config.Listen(host, int(port)))
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


def test_a_slow_map_read_does_not_stall_health_or_the_loop(
    make_agent: Agent, dp: dataplane.Dataplane, monkeypatch: pytest.MonkeyPatch
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


def test_reads_past_the_queue_limit_are_refused(
    make_agent: Agent, dp: dataplane.Dataplane, monkeypatch: pytest.MonkeyPatch
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
                    for _ in range(inspector.MAX_WAITING_READS)
                ]
                for _ in range(3000):  # bounded: until every call waits on the reader
                    if make_agent.reader.waiting == inspector.MAX_WAITING_READS:
                        break
                    await asyncio.sleep(0.01)
                assert make_agent.reader.waiting == inspector.MAX_WAITING_READS
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


def test_page_tokens_over_grpc(make_agent: Agent, dp: dataplane.Dataplane) -> None:
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


def test_full_map_through_the_cli_while_health_answers(lab: Lab, tmp_path: Path) -> None:
    agent = AgentProc(lab, "--endpoints-file", str(endpoints_file(tmp_path / "e")))
    try:
        agent.wait_serving()
        with dataplane.Dataplane.open(lab.bpffs) as plane:
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
