"""The CLI against fake agents: clear one-line errors, and every page of flows."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from eztunnel_plugin.pb.eztunnel.v1 import inspector_pb2 as pb
from eztunnel_plugin.pb.eztunnel.v1 import inspector_pb2_grpc as pb_grpc

from .test_agent import CLI, free_port


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args, "--timeout", "5"], capture_output=True, text=True,
                          timeout=30, check=False)  # fmt: skip


@pytest.fixture
def short_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ezc-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 1 and r.stdout == "", (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_switch_without_an_agent(short_dir: Path) -> None:
    missing = short_dir / "admin.sock"
    assert one_error_line(run_cli("disable", "--admin-socket", str(missing))) == (
        f"eztunnel-plugin: no admin socket at {missing}: is the agent running on this node?"
    )
    with socket.socket(socket.AF_UNIX) as s:  # a dead agent's socket file
        s.bind(str(missing))
    assert one_error_line(run_cli("enable", "--admin-socket", str(missing))) == (
        f"eztunnel-plugin: nothing serves {missing}: is the agent running on this node?"
    )


class Refusing(pb_grpc.AdminServicer):
    def SetEnabled(self, request: pb.SetEnabledRequest, context: Any) -> pb.SetEnabledResponse:
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "uid 0 may not change it today")
        raise AssertionError("abort() raises")


# Pages may be empty while more follow, as a bounded page read returns them.
PAGES = {"": ([], "a"), "a": ([7, 9], "b"), "b": ([], "c"), "c": ([11], "")}


def list_flows(request: pb.ListFlowsRequest, context: Any) -> pb.ListFlowsResponse:
    cookies, token = PAGES[request.page_token]
    resp = pb.ListFlowsResponse(next_page_token=token)
    for c in cookies:
        resp.flows.add(client=f"10.0.0.1:{c}", server="10.0.0.2:80", client_socket_cookie=c)
    return resp


@pytest.fixture
def server() -> Iterator[grpc.Server]:
    srv = grpc.server(ThreadPoolExecutor(max_workers=2))
    yield srv
    srv.stop(0)


def test_switch_refused_by_the_agent(server: grpc.Server, short_dir: Path) -> None:
    path = short_dir / "admin.sock"
    pb_grpc.add_AdminServicer_to_server(Refusing(), server)
    server.add_insecure_port(f"unix:{path}")
    server.start()
    assert one_error_line(run_cli("disable", "--admin-socket", str(path))) == (
        "eztunnel-plugin: the agent refused: uid 0 may not change it today"
    )


def test_flows_follows_every_page(server: grpc.Server) -> None:
    addr = f"127.0.0.1:{free_port()}"
    handler = grpc.unary_unary_rpc_method_handler(
        list_flows,
        request_deserializer=pb.ListFlowsRequest.FromString,
        response_serializer=pb.ListFlowsResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("eztunnel.v1.Inspector", {"ListFlows": handler}),)
    )
    server.add_insecure_port(addr)
    server.start()
    r = run_cli("flows", "--json", "--grpc-addr", addr)
    assert r.returncode == 0, r.stderr
    assert [int(f["client_socket_cookie"]) for f in json.loads(r.stdout)] == [7, 9, 11]
