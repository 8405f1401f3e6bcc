"""FakeIstiod: the YAML format, istiod's stream behaviour, file watching, the CLI entry."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc.aio
import pytest

from eztunnel_lab.fake_istiod import (
    ConfigError,
    FakeIstiod,
    add_arguments,
    load_yaml,
    main,
    watch_file,
)
from eztunnel_plugin.pb.envoy.service.discovery.v3 import discovery_pb2, discovery_pb2_grpc
from eztunnel_plugin.pb.istio.security import authorization_pb2 as az
from eztunnel_plugin.pb.istio.workload import workload_pb2 as wl
from eztunnel_plugin.xds.types import ADDRESS_TYPE, AUTHORIZATION_TYPE
from tests.xds.testlib import packed, run

ISSUE_EXAMPLE = """
workloads:
  - uid: Kubernetes//Pod/default/web-0
    name: web-0
    namespace: default
    addresses: ["10.0.0.10"]
    node: node-1
    tunnel_protocol: HBONE
    service_account: web
services: []
authorizations: []
"""

FULL = """
workloads:
  - uid: Kubernetes//Pod/default/web-0
    name: web-0
    namespace: default
    addresses: ["10.0.0.10", "fd00::10"]
    node: node-1
    tunnel_protocol: HBONE
    network_mode: HOST_NETWORK
    waypoint: {address: {address: 10.0.0.99}, hbone_mtls_port: 15008}
    services:
      default/web.default.svc.cluster.local:
        ports: [{service_port: 80, target_port: 8080, app_protocol: HTTP2}]
    capacity: 3
services:
  - name: web
    namespace: default
    hostname: web.default.svc.cluster.local
    addresses: [{address: 10.96.0.10, length: 32}]
    ports: [{service_port: 80, target_port: 8080}]
    visibility: NAMESPACE
authorizations:
  - name: deny-x
    namespace: default
    scope: WORKLOAD_SELECTOR
    action: DENY
    groups:
      - rules:
          - matches:
              - source_ips: [{address: 10.1.0.0, length: 16}]
                principals: [{exact: cluster.local/ns/x/sa/y}]
                destination_ports: [8080]
"""


def unpack(res: Any, cls: Any) -> Any:
    return cls.FromString(res.resource.value)


def test_issue_example_parses() -> None:
    r = load_yaml(ISSUE_EXAMPLE)
    (res,) = r[ADDRESS_TYPE].values()
    assert res.name == "Kubernetes//Pod/default/web-0"
    assert res.resource.type_url == ADDRESS_TYPE and len(res.version) == 16
    w = unpack(res, wl.Address).workload
    assert list(w.addresses) == [packed("10.0.0.10")]
    assert w.tunnel_protocol == wl.HBONE and w.node == "node-1" and w.service_account == "web"
    assert r[AUTHORIZATION_TYPE] == {}


def test_full_format_and_versions() -> None:
    r = load_yaml(FULL)
    w = unpack(r[ADDRESS_TYPE]["Kubernetes//Pod/default/web-0"], wl.Address).workload
    assert w.network_mode == wl.HOST_NETWORK and w.capacity.value == 3
    assert w.waypoint.address.address == packed("10.0.0.99")
    assert w.services["default/web.default.svc.cluster.local"].ports[0].app_protocol == wl.HTTP2
    svc = unpack(r[ADDRESS_TYPE]["default/web.default.svc.cluster.local"], wl.Address).service
    assert svc.addresses[0].address == packed("10.96.0.10") and svc.addresses[0].length == 32
    assert svc.visibility == wl.Service.NAMESPACE
    a = unpack(r[AUTHORIZATION_TYPE]["default/deny-x"], az.Authorization)
    m = a.groups[0].rules[0].matches[0]
    assert a.action == az.DENY and m.source_ips[0].address == packed("10.1.0.0")
    assert m.principals[0].exact == "cluster.local/ns/x/sa/y" and list(m.destination_ports) == [
        8080
    ]
    # content-hash versions: stable for the same content, different for a change
    again = load_yaml(FULL)
    changed = load_yaml(FULL.replace("10.0.0.10", "10.0.0.11"))
    name = "Kubernetes//Pod/default/web-0"
    assert again[ADDRESS_TYPE][name].version == r[ADDRESS_TYPE][name].version
    assert changed[ADDRESS_TYPE][name].version != r[ADDRESS_TYPE][name].version


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "workloads: [{uid: a, addresses: [not-an-ip]}]",
            "workloads[0].addresses: 'not-an-ip' is not an IP",
        ),
        ("workloads: [{uid: a, colour: red}]", "workloads[0]"),
        ("workloads: [{uid: a, tunnel_protocol: QUIC}]", "workloads[0]"),
        ("workloads: [{name: a}]", "uid is required"),
        ("pods: []", "unknown top-level keys"),
        ("workloads: [{uid: a}, {uid: a}]", "duplicate resource name"),
        ("workloads: [", "invalid YAML"),
    ],
)
def test_yaml_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_yaml(text)


def test_binary_addresses_allow_malformed_input() -> None:
    r = load_yaml("workloads: [{uid: a, addresses: [!!binary AQID]}]")
    assert list(unpack(r[ADDRESS_TYPE]["a"], wl.Address).workload.addresses) == [b"\x01\x02\x03"]


@contextlib.asynccontextmanager
async def raw_stream(fake: FakeIstiod) -> AsyncIterator[Any]:
    async with grpc.aio.insecure_channel(fake.address) as ch:
        call = discovery_pb2_grpc.AggregatedDiscoveryServiceStub(ch).DeltaAggregatedResources()
        try:
            yield call
        finally:
            call.cancel()


def test_istiod_stream_semantics() -> None:
    async def body() -> None:
        fake = FakeIstiod(load_yaml(FULL))
        await fake.start()
        name = "Kubernetes//Pod/default/web-0"
        held_version = fake.resources[ADDRESS_TYPE][name].version
        async with raw_stream(fake) as call:
            req = discovery_pb2.DeltaDiscoveryRequest(type_url=ADDRESS_TYPE)
            req.initial_resource_versions.update({name: held_version, "gone/x": ""})
            await call.write(req)
            resp = await call.read()
            # 1.31: the held, unchanged resource is skipped; unknown names are removed
            assert [r.name for r in resp.resources] == ["default/web.default.svc.cluster.local"]
            assert list(resp.removed_resources) == ["gone/x"] and resp.nonce
            assert resp.control_plane.identifier == "fake-istiod"
            # a stale nonce is ignored, the right one is an ACK; no re-push on NACK
            await call.write(
                discovery_pb2.DeltaDiscoveryRequest(type_url=ADDRESS_TYPE, response_nonce="old")
            )
            nack = discovery_pb2.DeltaDiscoveryRequest(
                type_url=ADDRESS_TYPE, response_nonce=resp.nonce
            )
            nack.error_detail.message = "no"
            await call.write(nack)
            rec = fake.records[0]
            await fake.wait_for(lambda: len(rec.requests) == 3)
            assert rec.ignored_nonces == ["old"] and len(rec.nacks) == 1
            # a change pushes only the difference
            fake.set_resources(load_yaml(FULL.replace("10.0.0.10", "10.0.0.12")))
            push = await asyncio.wait_for(call.read(), 5)
            assert [r.name for r in push.resources] == [name] and not push.removed_resources
            pushed = unpack(push.resources[0], wl.Address).workload
            assert list(pushed.addresses) == [packed("10.0.0.12"), packed("fd00::10")]
            fake.set_resources(load_yaml(ISSUE_EXAMPLE))
            push = await asyncio.wait_for(call.read(), 5)
            assert [r.name for r in push.resources] == [name]  # its content changed too
            assert list(push.removed_resources) == ["default/web.default.svc.cluster.local"]
            assert len(rec.responses) == 3
        await fake.stop()

    run(body())


def test_watch_file_pushes_changes_and_keeps_last_good(tmp_path: Path) -> None:
    path = tmp_path / "w.yaml"
    path.write_text(ISSUE_EXAMPLE)

    async def body() -> None:
        fake = FakeIstiod(load_yaml(path.read_text()))
        await fake.start()
        stop = asyncio.Event()
        watcher = asyncio.create_task(watch_file(fake, path, 0.02, stop))
        async with raw_stream(fake) as call:
            await call.write(discovery_pb2.DeltaDiscoveryRequest(type_url=ADDRESS_TYPE))
            first = await call.read()
            assert len(first.resources) == 1
            path.write_text(ISSUE_EXAMPLE.replace("web-0", "web-1"))
            push = await asyncio.wait_for(call.read(), 5)
            assert [r.name for r in push.resources] == ["Kubernetes//Pod/default/web-1"]
            assert list(push.removed_resources) == ["Kubernetes//Pod/default/web-0"]
            path.write_text("workloads: [")  # broken: ignored, last good set stays
            path.write_text("workloads: [ {")
            await asyncio.sleep(0.1)  # several poll periods; nothing may arrive
            assert list(fake.resources[ADDRESS_TYPE]) == ["Kubernetes//Pod/default/web-1"]
            assert len(fake.records[0].responses) == 2
        stop.set()
        await asyncio.wait_for(watcher, 5)
        await fake.stop()

    run(body())


def _listening_port(proc: subprocess.Popen[str], timeout: float = 20.0) -> int:
    """Read the process output (bounded in time) until it logs its listening address."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    seen = ""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            line = proc.stdout.readline()
            seen += line
            m = re.search(r"fake_istiod.listening\s+address=127.0.0.1:(\d+)", line)
            if m:
                return int(m.group(1))
            if not line and proc.poll() is not None:
                break
    raise AssertionError(f"no listening line; output: {seen[-2000:]!r}")


def test_cli_fake_istiod_serves_until_sigterm(tmp_path: Path) -> None:
    path = tmp_path / "w.yaml"
    path.write_text(ISSUE_EXAMPLE)
    argv = [sys.executable, "-m", "eztunnel_lab", "fake-istiod", "--workloads", str(path)]
    proc = subprocess.Popen(
        [*argv, "--listen", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # the log may go to either
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        port = _listening_port(proc)

        async def body() -> None:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = discovery_pb2_grpc.AggregatedDiscoveryServiceStub(ch)
                call = stub.DeltaAggregatedResources()
                await call.write(discovery_pb2.DeltaDiscoveryRequest(type_url=ADDRESS_TYPE))
                resp = await asyncio.wait_for(call.read(), 10)
                assert isinstance(resp, discovery_pb2.DeltaDiscoveryResponse), resp
                assert [r.name for r in resp.resources] == ["Kubernetes//Pod/default/web-0"]
                call.cancel()

        run(body())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_main_rejects_bad_input(tmp_path: Path) -> None:
    p = argparse.ArgumentParser()
    add_arguments(p)
    path = tmp_path / "w.yaml"
    path.write_text("workloads: [{uid: a, addresses: [nope]}]")
    assert main(p.parse_args(["--workloads", str(path)])) == 2
    path.write_text(ISSUE_EXAMPLE)
    assert main(p.parse_args(["--workloads", str(path), "--tls-cert", str(path)])) == 2
    assert main(p.parse_args(["--workloads", str(tmp_path / "missing.yaml")])) == 2
