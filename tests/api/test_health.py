"""The HTTP probes (readiness and liveness), probed the way kubelet's httpGet does: an
HTTP/1.1 GET with kubelet's headers and `Connection: close`, a 1 s timeout, success for a
status from 200 to 399. In process against a fake view (every readiness state, nothing but
health served), then the agent process on the real kernel."""

from __future__ import annotations

import asyncio
import http.client
import socket
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from eztunnel_lab.netlab import Lab
from eztunnel_plugin.api import health
from eztunnel_plugin.api.view import SelftestStatus
from eztunnel_plugin.config import Listen

from ..test_agent import AgentProc, endpoints_file, free_port
from .fake_view import FakeView

DECIDED = SelftestStatus("attach", "every check passed", ())
PROBE_TIMEOUT_S = 1.0  # kubelet's default timeoutSeconds


@dataclass(frozen=True)
class ProbeResult:
    success: bool
    status: int
    body: str


def kubelet_probe(port: int, path: str, host: str = "127.0.0.1") -> ProbeResult:
    """What kubelet's httpGet prober sends and how it judges the answer (a real HTTP
    parser reads the response: status line, headers, Content-Length body)."""
    conn = http.client.HTTPConnection(host, port, timeout=PROBE_TIMEOUT_S)
    try:
        conn.putrequest("GET", path, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", f"{host}:{port}")
        conn.putheader("User-Agent", "kube-probe/1.31")
        conn.putheader("Accept", "*/*")
        conn.putheader("Connection", "close")
        conn.putheader("Accept-Encoding", "gzip")
        conn.endheaders()
        resp = conn.getresponse()
        body = resp.read(10 << 10).decode()  # kubelet keeps at most 10 KiB of the body
        assert resp.getheader("Content-Length") == str(len(body.encode()))
        return ProbeResult(200 <= resp.status < 400, resp.status, body)
    finally:
        conn.close()


def on_health(fake: FakeView, test: Callable[[int], Awaitable[None]]) -> None:
    async def main() -> None:
        server = await health.start(fake, Listen("127.0.0.1", 0))
        try:
            await test(server.sockets[0].getsockname()[1])
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())


async def probe(port: int, path: str) -> ProbeResult:
    return await asyncio.to_thread(kubelet_probe, port, path)


def test_readiness_follows_the_self_test_the_snapshot_and_the_feed() -> None:
    fake = FakeView(ready=False, selftest=None)

    async def test(port: int) -> None:
        got = await probe(port, health.READY)
        assert got == ProbeResult(
            False, 503, "starting: the kernel self-test has not decided yet\n"
        )
        fake.selftest = DECIDED
        got = await probe(port, health.READY)
        assert got == ProbeResult(
            False, 503, "starting: the first complete snapshot is not applied yet\n"
        )
        fake.ready = True
        assert await probe(port, health.READY) == ProbeResult(True, 200, "ready\n")
        fake.stale = True
        assert await probe(port, health.READY) == ProbeResult(False, 503, "the xDS feed is stale\n")
        fake.stale = False
        assert (await probe(port, health.READY + "?verbose=1")).success

    on_health(fake, test)


def test_a_deliberate_no_splice_decision_is_ready() -> None:
    # Nothing attached, by the self-test's decision: pods are on plain TCP, as they should.
    no_splice = SelftestStatus("no_splice", "fionread: FIONREAD says 0", ())
    fake = FakeView(ready=True, selftest=no_splice, plane=None)

    async def test(port: int) -> None:
        assert await probe(port, health.READY) == ProbeResult(True, 200, "ready\n")

    on_health(fake, test)


def test_liveness_answers_whatever_readiness_says() -> None:
    # A stale feed or a start in progress is no reason for kubelet to restart the agent.
    fake = FakeView(ready=False, stale=True, selftest=None)

    async def test(port: int) -> None:
        assert await probe(port, health.LIVE) == ProbeResult(True, 200, "alive\n")

    on_health(fake, test)


@pytest.mark.parametrize(
    "path",
    ["/", "/healthz", "/healthz/", "/healthz/ready/x", "/healthz/readyz", "/metrics",
     "/stats/prometheus", "/debug/pprof", "/app-health/x/readyz", "//healthz/ready"],
)  # fmt: skip
def test_nothing_but_health_is_served(path: str) -> None:
    async def test(port: int) -> None:
        assert await probe(port, path) == ProbeResult(False, 404, "not found\n")

    on_health(FakeView(selftest=DECIDED), test)


def test_other_methods_and_garbage_are_refused_without_a_traceback() -> None:
    def raw(port: int, request: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(request)
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)

    async def test(port: int) -> None:
        post = await asyncio.to_thread(raw, port, b"POST /healthz/ready HTTP/1.1\r\n\r\n")
        assert post.startswith(b"HTTP/1.0 405 ") and post.endswith(b"\r\n\r\nmethod not allowed\n")
        junk = await asyncio.to_thread(raw, port, b"\x16\x03\x01\x02\x00\r\n\r\n")
        assert junk.startswith(b"HTTP/1.0 400 ") and b"Traceback" not in junk

    on_health(FakeView(selftest=DECIDED), test)


# ---- the agent process, on the real kernel --------------------------------------------------


@pytest.fixture
def agents() -> Iterator[list[AgentProc]]:
    started: list[AgentProc] = []
    yield started
    for a in started:
        a.stop()


@pytest.mark.kernel
def test_the_agent_serves_probes_without_starting_a_process(
    lab: Lab, agents: list[AgentProc], tmp_path: Path
) -> None:
    a = lab.add_pod()
    port = free_port()
    agent = AgentProc(lab, "--endpoints-file", str(endpoints_file(tmp_path / "e", a.ip4)),
                      "--health-listen", f"127.0.0.1:{port}")  # fmt: skip
    agents.append(agent)
    agent.wait_serving()
    assert kubelet_probe(port, health.READY) == ProbeResult(True, 200, "ready\n")
    assert kubelet_probe(port, health.LIVE) == ProbeResult(True, 200, "alive\n")
    assert kubelet_probe(port, "/metrics").status == 404
    # The probes and gRPC health agree, and the status says why the agent splices as it does.
    status = agent.cli_json("status")
    assert status["ready"] is True
    assert status["selftest"]["decision"] in ("attach", "attach_with_workaround")
    log = agent.terminate()
    assert "Traceback" not in log and "health.error" not in log, log
