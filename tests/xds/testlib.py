"""Helpers shared by the xDS tests: message builders and a client+state+reconciler stack."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from google.protobuf import any_pb2

from eztunnel_lab.fake_istiod import FakeIstiod, make_resource
from eztunnel_plugin.aio import cancel_all
from eztunnel_plugin.pb.envoy.service.discovery.v3 import discovery_pb2
from eztunnel_plugin.pb.istio.security import authorization_pb2 as authz_pb
from eztunnel_plugin.pb.istio.workload import workload_pb2 as wl_pb
from eztunnel_plugin.reconciler import MemorySink, Reconciler
from eztunnel_plugin.state.workloads import WorkloadState
from eztunnel_plugin.xds.client import XdsClient, XdsConfig
from eztunnel_plugin.xds.types import ADDRESS_TYPE, AUTHORIZATION_TYPE
from eztunnel_plugin.xds.updater import state_watches
from tests.state.testlib import NODE

NODE_ID = "ztunnel~10.1.2.3~ztunnel-abc.istio-system~istio-system.svc.cluster.local"
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], timeout: float = 20.0) -> T:
    """Run one async test body with a hard bound."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def packed(ip: str) -> bytes:
    return ipaddress.ip_address(ip).packed


def workload(
    uid: str,
    *ips: str,
    node: str = NODE,
    tunnel: int = wl_pb.HBONE,
    **kw: Any,
) -> Any:
    kw.setdefault("name", uid.rsplit("/", 1)[-1])
    kw.setdefault("namespace", "default")
    return wl_pb.Workload(
        uid=uid,
        addresses=[packed(ip) for ip in ips],
        node=node,
        tunnel_protocol=tunnel,  # type: ignore[arg-type]
        **kw,
    )


def wl_res(uid: str, *ips: str, **kw: Any) -> Any:
    return make_resource(uid, ADDRESS_TYPE, wl_pb.Address(workload=workload(uid, *ips, **kw)))


def raw_res(name: str, value: bytes, type_url: str = ADDRESS_TYPE, version: str = "v") -> Any:
    """A Resource whose body is arbitrary bytes (malformed on purpose)."""
    return discovery_pb2.Resource(
        name=name, version=version, resource=any_pb2.Any(type_url=type_url, value=value)
    )


def bad_addr_res(uid: str, raw: bytes) -> Any:
    w = workload(uid)
    w.addresses.append(raw)
    return make_resource(uid, ADDRESS_TYPE, wl_pb.Address(workload=w))


def authz_res(ns: str, name: str, **kw: Any) -> Any:
    a = authz_pb.Authorization(name=name, namespace=ns, **kw)
    return make_resource(f"{ns}/{name}", AUTHORIZATION_TYPE, a)


def resources(*items: Any, authz: Iterable[Any] = ()) -> dict[str, dict[str, Any]]:
    return {
        ADDRESS_TYPE: {r.name: r for r in items},
        AUTHORIZATION_TYPE: {r.name: r for r in authz},
    }


def plain_config(port: int, **kw: Any) -> XdsConfig:
    base: dict[str, Any] = {
        "node_id": NODE_ID,
        "node_metadata": {"NAME": "ztunnel-abc", "NODE_NAME": NODE},
        "address": f"127.0.0.1:{port}",
        "plaintext": True,
        "token_file": None,
        "backoff_initial_s": 0.02,
        "backoff_max_s": 0.2,
        "connect_timeout_s": 2.0,
    }
    base.update(kw)
    return XdsConfig(**base)


@dataclass
class Stack:
    fake: FakeIstiod
    client: XdsClient
    state: WorkloadState
    reconciler: Reconciler
    sink: MemorySink

    async def settled(self, predicate: Callable[[], bool] | None = None) -> None:
        """Wait until the sink reflects the state (and predicate holds, if given)."""

        def done() -> bool:
            return self.reconciler.applied_version == self.state.version and (
                predicate is None or predicate()
            )

        for _ in range(2000):  # bounded: 2000 * 5 ms
            if done():
                return
            await asyncio.sleep(0.005)
        raise AssertionError("state never settled")


@contextlib.asynccontextmanager
async def stack(
    fake: FakeIstiod,
    config: XdsConfig | None = None,
    sink: MemorySink | None = None,
    node: str = NODE,
    start: bool = True,
) -> AsyncIterator[Stack]:
    if start:
        await fake.start()
    state = WorkloadState(node)
    client = XdsClient(config or plain_config(fake.port), state_watches(state))
    sink = sink if sink is not None else MemorySink()
    rec = Reconciler(state, sink)
    tasks = [asyncio.create_task(client.run()), asyncio.create_task(rec.run())]
    try:
        yield Stack(fake, client, state, rec, sink)
    finally:
        await cancel_all(tasks)
        await fake.stop()


async def eventually(check: Callable[[], Awaitable[bool] | bool], what: str) -> None:
    """Poll a condition that has no event to await (bounded)."""
    for _ in range(1000):
        got = check()
        if not isinstance(got, bool):
            got = await got
        if got:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")
