"""The CLI against fake agents: clear one-line errors, every page of flows, the live view
(in a pseudo-terminal and without one) and the endpoints table."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import pty
import select
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import termios
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pyte
import pytest

from eztunnel_plugin import client
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


# ---- a fake agent: the Inspector servicer on an in-process grpc.aio server ---------------

MIB = 1 << 20
FAST, SLOW, NEW = ("10.1.0.1:40001", "10.1.0.2:80"), ("10.1.0.3:40003", "10.1.0.4:8080"), (
    "10.1.0.5:40005", "10.1.0.6:443")  # fmt: skip


class FakeInspector(pb_grpc.InspectorServicer):
    """Canned answers that move on with every poll (a poll starts with GetStats): a fast
    and a slow flow on two pages, a third, faster still, from the third poll on, and
    counters growing by a fixed step per poll."""

    def __init__(self, resumes: bool = True) -> None:
        self.polls = 0
        self.resumes = resumes
        self.endpoints: list[pb.Endpoint] = []

    async def GetStats(self, request: pb.GetStatsRequest, context: Any) -> pb.Stats:
        self.polls += 1
        n = self.polls
        counters = {"pairs": 3 * n, "pairs_capture": 2 * n, "pairs_netns_mirror": n,
                    "pairs_cross_mirror": 0, "backlog_fallbacks": 5 * n, "unspliced": n,
                    "bytes_redirected": n * 100 * MIB, "np_no_peer": 7}  # fmt: skip
        if self.resumes:
            counters["resumes"] = 4 * n
        return pb.Stats(counters=counters)

    async def ListFlows(self, request: pb.ListFlowsRequest, context: Any) -> pb.ListFlowsResponse:
        n = self.polls
        resp = pb.ListFlowsResponse()
        if request.page_token == "":
            resp.next_page_token = "p2"
            resp.flows.add(client=FAST[0], server=FAST[1], rule="capture",
                           bytes_client_to_server=n * 50 * MIB, bytes_server_to_client=n * MIB,
                           client_socket_cookie=1, server_socket_cookie=2,
                           client_state="paired", server_state="paired")  # fmt: skip
        else:
            resp.flows.add(client=SLOW[0], server=SLOW[1], rule="netns_mirror",
                           bytes_client_to_server=n * 1024, client_socket_cookie=3,
                           server_socket_cookie=4, client_state="paired",
                           server_state="tainted")  # fmt: skip
            if n >= 3:
                resp.flows.add(client=NEW[0], server=NEW[1], rule="capture",
                               bytes_client_to_server=(n - 2) * 900 * MIB,
                               client_socket_cookie=5, server_socket_cookie=6,
                               client_state="paired", server_state="paired")  # fmt: skip
        return resp

    async def ListEndpoints(
        self, request: pb.ListEndpointsRequest, context: Any
    ) -> pb.ListEndpointsResponse:
        return pb.ListEndpointsResponse(endpoints=self.endpoints, unexpected_in_map=["10.9.9.9"])

    async def GetStatus(self, request: pb.GetStatusRequest, context: Any) -> pb.Status:
        return pb.Status(version="fake")

    async def WatchEvents(
        self, request: pb.WatchEventsRequest, context: Any
    ) -> AsyncIterator[pb.Event]:
        yield pb.Event(kind="watch.started")


@pytest.fixture
def fake_agent() -> Iterator[tuple[str, FakeInspector]]:
    """(address, servicer): the fake served on its own event loop in a thread."""
    fake = FakeInspector()
    addr = f"127.0.0.1:{free_port()}"
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def serve() -> grpc.aio.Server:
        srv = grpc.aio.server()
        pb_grpc.add_InspectorServicer_to_server(fake, srv)
        srv.add_insecure_port(addr)
        await srv.start()
        return srv

    srv = asyncio.run_coroutine_threadsafe(serve(), loop).result(10)
    try:
        yield addr, fake
    finally:
        asyncio.run_coroutine_threadsafe(srv.stop(0), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


# ---- flows --watch: the rates, the terminal view, the plain lines --------------------------


def flow_msg(cookie: int, c2s: int, s2c: int = 0, rule: str = "capture") -> pb.Flow:
    return pb.Flow(client=f"10.0.0.1:{cookie}", server="10.0.0.2:80", rule=rule,
                   bytes_client_to_server=c2s, bytes_server_to_client=s2c,
                   client_socket_cookie=cookie, server_socket_cookie=cookie + 1)  # fmt: skip


def test_rates_come_from_successive_polls() -> None:
    first = client.Poll(10.0, [flow_msg(1, 1000, 10), flow_msg(3, 5000)],
                        {"pairs": 10, "pairs_capture": 10, "backlog_fallbacks": 4})  # fmt: skip
    v1 = client.compare(None, first, 1)
    assert [r.rate for r in v1.flows] == [None, None]  # nothing to compare with yet
    assert [r.flow.client_socket_cookie for r in v1.flows] == [3, 1]  # by total meanwhile
    second = client.Poll(12.0, [flow_msg(1, 9000, 30), flow_msg(3, 5000), flow_msg(7, 600)],
                         {"pairs": 16, "pairs_capture": 14, "backlog_fallbacks": 2})  # fmt: skip
    v2 = client.compare(first, second, 2)
    got = {r.flow.client_socket_cookie: (r.c2s, r.s2c) for r in v2.flows}
    assert got == {1: (4000.0, 10.0), 3: (0.0, 0.0), 7: (300.0, 0.0)}  # 7 is new: from 0
    assert [r.flow.client_socket_cookie for r in v2.flows] == [1, 7, 3]
    assert v2.rules == [("capture", 3, 2.0)]
    # backlog_fallbacks went down (the maps were recreated): no rate rather than a wrong one
    assert v2.rates == [
        ("pairs", "new pairs", 3.0),
        ("backlog_fallbacks", "fallbacks to TCP", None),
    ]


def test_resume_rates_are_shown_once_the_agent_counts_them() -> None:
    old = client.Poll(0.0, [], {"backlog_fallbacks": 1})
    assert [n for n, _, _ in client.compare(old, client.Poll(1.0, [], {"backlog_fallbacks": 1}),
                                             2).rates] == ["backlog_fallbacks"]  # fmt: skip
    cur = client.Poll(1.0, [], {"backlog_fallbacks": 1, "resumes": 0})
    line = client.plain_line(client.compare(old, cur, 2, "12:00:00"))
    assert "resumes from TCP -" in line  # counted from now on: no rate before two polls


def test_every_byte_field_of_a_direction_counts() -> None:
    assert client.C2S_FIELDS[0] == "bytes_client_to_server"
    assert client.S2C_FIELDS[0] == "bytes_server_to_client"
    assert not set(client.C2S_FIELDS) & set(client.S2C_FIELDS)


def test_watch_without_a_terminal_prints_one_plain_line_per_refresh(
    fake_agent: tuple[str, FakeInspector],
) -> None:
    addr, fake = fake_agent
    r = run_cli("flows", "--watch", "--interval", "0.1", "--limit", "3", "--grpc-addr", addr)
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout
    lines = r.stdout.splitlines()
    assert len(lines) == 3 and fake.polls == 3
    assert lines[0].endswith(f"top {FAST[0]} -> {FAST[1]} capture -")  # no rate on the first
    assert "2 spliced flows (capture 1, cross_mirror 0, netns_mirror 1)" in lines[0]
    assert "3 spliced flows (capture 2, cross_mirror 0, netns_mirror 1)" in lines[2]
    assert "resumes from TCP" in lines[2] and "fallbacks to TCP" in lines[2]
    assert f"top {NEW[0]} -> {NEW[1]} capture" in lines[2]
    assert not lines[2].endswith(" -")


def test_watch_of_a_down_agent_is_one_error_line() -> None:
    addr = f"127.0.0.1:{free_port()}"
    line = one_error_line(run_cli("flows", "--watch", "--limit", "2", "--grpc-addr", addr))
    assert line.startswith(f"eztunnel-plugin: cannot reach the agent at {addr}: UNAVAILABLE")


class Terminal:
    """The CLI on a pseudo-terminal of 120x40, its output read by a terminal emulator."""

    def __init__(self, *args: str) -> None:
        self.screen = pyte.Screen(120, 40)
        self.stream = pyte.ByteStream(self.screen)
        self.raw = b""
        self.pending = b""  # read, not fed to the emulator yet
        pid, fd = pty.fork()
        if pid == 0:  # the child: its stdio is the terminal
            try:
                fcntl.ioctl(1, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
                env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
                env.update(TERM="xterm-256color")
                env.pop("NO_COLOR", None)
                os.execve(CLI[0], [*CLI, *args, "--timeout", "5"], env)
            finally:
                os._exit(127)
        self.pid, self.fd = pid, fd
        self.status: int | None = None

    def text(self) -> str:
        return "\n".join(line.rstrip() for line in self.screen.display)

    def read_until(self, cond: Callable[[str], bool], timeout: float = 30) -> str:
        """Feed the emulator until cond(screen) holds or the child is gone (bounded). It is fed
        in small slices, so a slow reader still sees each refresh, not only the last one."""
        deadline = time.monotonic() + timeout
        while not cond(self.text()) and time.monotonic() < deadline:
            if self.pending:
                self.stream.feed(self.pending[:64])
                self.pending = self.pending[64:]
                continue
            ready, _, _ = select.select([self.fd], [], [], 0.1)
            if not ready:
                continue
            try:
                data = os.read(self.fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                data = b""
            if not data:
                break
            self.raw += data
            self.pending = data
        return self.text()

    def wait(self, timeout: float = 30) -> int:
        self.read_until(lambda _: False, timeout)
        self.stream.feed(self.pending)
        self.pending = b""
        deadline = time.monotonic() + timeout
        while self.status is None and time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
            else:
                time.sleep(0.05)
        assert self.status is not None, "the CLI did not exit"
        return self.status

    def close(self) -> None:
        if self.status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.pid, 0)
        os.close(self.fd)


@pytest.fixture
def terminal() -> Iterator[Callable[..., Terminal]]:
    made: list[Terminal] = []

    def make(*args: str) -> Terminal:
        made.append(Terminal(*args))
        return made[-1]

    yield make
    for t in made:
        t.close()


def rows_of(screen: str, *clients: str) -> list[int]:
    """The screen line of each client's row."""
    lines = screen.splitlines()
    return [next(i for i, line in enumerate(lines) if line.lstrip().startswith(c))
            for c in clients]  # fmt: skip


def test_watch_on_a_terminal_updates_in_place(
    fake_agent: tuple[str, FakeInspector], terminal: Callable[..., Terminal]
) -> None:
    addr, fake = fake_agent
    term = terminal("flows", "--watch", "--interval", "0.2", "--limit", "6", "--grpc-addr", addr)
    second = term.read_until(lambda s: "refresh 2," in s and "Ctrl-C quits." in s)
    assert "refresh 2," in second, term.raw[-2000:]
    assert FAST[0] in second and SLOW[0] in second and NEW[0] not in second
    assert rows_of(second, FAST[0], SLOW[0]) == sorted(rows_of(second, FAST[0], SLOW[0]))
    assert term.wait() == 0
    final = term.text()
    # One view, redrawn: the last refresh replaced the earlier ones on the screen.
    assert final.count("eztunnel-plugin flows") == 1 and "refresh 6," in final, final
    assert "3 spliced flows" in final and "3 of 3 flows, fastest first" in final
    # The newest flow moves fastest and heads the table, the slow one ends it.
    new, fast, slow = rows_of(final, NEW[0], FAST[0], SLOW[0])
    assert new < fast < slow, final
    for label in ("new pairs", "fallbacks to TCP", "resumes from TCP", "bytes spliced"):
        assert label in final
    capture = next(line for line in final.splitlines() if line.lstrip().startswith("capture"))
    assert capture.split()[:2] == ["capture", "2"]  # active pairs by rule
    assert not term.screen.cursor.hidden  # the cursor is given back
    assert fake.polls == 6


def test_watch_on_a_terminal_ends_cleanly_on_ctrl_c(
    fake_agent: tuple[str, FakeInspector], terminal: Callable[..., Terminal]
) -> None:
    addr, _ = fake_agent
    term = terminal("flows", "--watch", "--interval", "0.2", "--grpc-addr", addr)
    assert "refresh 2," in term.read_until(lambda s: "refresh 2," in s)
    os.write(term.fd, b"\x03")  # the terminal turns it into SIGINT
    assert term.wait() == 130
    assert b"Traceback" not in term.raw
    assert not term.screen.cursor.hidden
    assert "eztunnel-plugin flows" in term.text()  # the last view stays on the screen


def test_endpoints_like_istioctl_workloads(fake_agent: tuple[str, FakeInspector]) -> None:
    addr, fake = fake_agent
    fake.endpoints = [
        pb.Endpoint(ip="10.1.0.9", name="web-0", namespace="shop", node="node-1",
                    protocol="HBONE", in_map=True, workload_uid="uid-w"),
        pb.Endpoint(ip="10.1.0.7", name="api-1", namespace="shop", node="node-1",
                    protocol="HBONE", in_map=False),
        pb.Endpoint(ip="10.1.0.8"),  # from a static file: nobody's
    ]  # fmt: skip
    r = run_cli("endpoints", "--grpc-addr", addr)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert [c.strip() for c in lines[0].split("  ") if c] == [
        "NAMESPACE", "POD NAME", "ADDRESS", "NODE", "PROTOCOL", "IN MAP"]  # fmt: skip
    assert [line.split() for line in lines[2:5]] == [
        ["-", "-", "10.1.0.8", "-", "-", "NO"],
        ["shop", "api-1", "10.1.0.7", "node-1", "HBONE", "NO"],
        ["shop", "web-0", "10.1.0.9", "node-1", "HBONE", "yes"],
    ]
    assert lines[5] == "in the map but not desired: 10.9.9.9"
    got = json.loads(run_cli("endpoints", "--json", "--grpc-addr", addr).stdout)
    web = next(e for e in got["endpoints"] if e["name"] == "web-0")
    assert (web["namespace"], web["node"], web["protocol"], web["in_map"]) == (
        "shop", "node-1", "HBONE", True)  # fmt: skip


def test_status_shows_the_self_test_decision_and_each_check() -> None:
    s = pb.Status()
    assert client.selftest_rows(s) == [("self-test", "not decided yet")]
    t = s.selftest
    t.decision, t.reason, t.kernel, t.kernel_listed = "no_splice", "both failed", "6.12.80", True
    t.environment, t.duration_seconds = "a private netns (127.1.2.3)", 0.5
    t.checks.add(name="splice/plain", passed=False, detail="not spliced")
    t.checks.add(name="splice/skb_verdict", passed=True)
    rows = dict(client.selftest_rows(s))
    assert rows["self-test"] == "no_splice" and rows["self-test reason"] == "both failed"
    assert rows["self-test kernel"] == (
        "6.12.80 (known to lose epoll wakeups without the workaround)"
    )
    assert rows["self-test ran in"] == "a private netns (127.1.2.3) (0.50 s)"
    assert rows["  splice"] == "without workaround: FAIL: not spliced; with it: pass"
    assert rows["  epoll"] == "without workaround: -; with it: -"  # not run
