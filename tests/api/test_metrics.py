"""Prometheus metrics: every series from the agent's view (a fake one, in process) parsed
by prometheus_client's own parser, and the HTTP endpoint of the agent process on the real
kernel: the series of a live spliced flow, and the bounds any client gets."""

from __future__ import annotations

import asyncio
import socket
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from eztunnel_lab.netlab import Lab, Pod
from eztunnel_plugin.api import httpd
from eztunnel_plugin.api import metrics as metrics_module
from eztunnel_plugin.api.metrics import BPF_FAMILIES, UNEXPORTED_COUNTERS, render
from eztunnel_plugin.api.reader import Reader
from eztunnel_plugin.api.readings import LatencyRecorder
from eztunnel_plugin.api.view import (
    FileStatus,
    SelftestCheck,
    SelftestStatus,
    XdsStatus,
    XdsTypeStatus,
)
from eztunnel_plugin.bpf import layout
from eztunnel_plugin.config import Listen

from ..conftest import finish_hold, hold_client, hold_server, wait_for
from ..test_agent import AgentProc, endpoints_file, free_port
from .fake_view import FakeView

Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str | bytes) -> tuple[Series, dict[str, str]]:
    """(sample name, sorted labels) -> value, and family name -> type, by the real parser."""
    if isinstance(text, bytes):
        text = text.decode()
    series: Series = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in series, f"{key} twice"
            series[key] = s.value
    return series, types


def value(series: Series, name: str, **labels: str) -> float:
    return series[(name, tuple(sorted(labels.items())))]


def eztunnel(series: Series) -> Series:
    return {k: v for k, v in series.items() if k[0].startswith("eztunnel_")}


# ---- what is rendered, from the view -----------------------------------------------------

ADDRESS = "type.googleapis.com/istio.workload.Address"
AUTHZ = "type.googleapis.com/istio.security.Authorization"
XDS = XdsStatus("istiod:15012", True, True, False, nacks=2, streams=3, protocol_errors=1,
                last_error="", types=(XdsTypeStatus(ADDRESS, "n1", 120),
                                      XdsTypeStatus(AUTHZ, "n2", 4)))  # fmt: skip
EVERY_COUNTER = {c.name.lower(): 10 + c.value for c in layout.Counter}


def test_every_series_of_an_xds_agent() -> None:
    recorder = LatencyRecorder((0.001, 0.01))
    for seconds in (0.0004, 0.001, 0.003, 7.0):
        recorder.observe(seconds)
    fake = FakeView(stale=True, xds_status=XDS, addresses_refused=4,
                    in_map={"10.0.0.1": 1, "10.0.0.2": 1}, counter_values=EVERY_COUNTER,
                    pairs_now={"netns_mirror": 0, "capture": 2, "cross_mirror": 5},
                    push_latency=recorder.snapshot(),
                    selftest=SelftestStatus("attach_with_workaround", "the kernel loses wakeups",
                                            (SelftestCheck("splice", True, ""),
                                             SelftestCheck("epoll", False, "no EPOLLIN")))
                    )  # fmt: skip
    series, types = parse(render(fake))
    info = [k for k in series if k[0] == "eztunnel_agent_info"]
    assert info == [("eztunnel_agent_info", (("kernel", "6.18.0-test"), ("node", "node-1"),
                                             ("source", "xds"), ("version", "9.9.9")))]  # fmt: skip
    counter = EVERY_COUNTER.__getitem__
    expected = {
        ("eztunnel_ready", ()): 1,
        ("eztunnel_xds_connected", ()): 1,
        ("eztunnel_xds_stale", ()): 0,  # the feed's own flag (the fake's `stale` is the agent's)
        ("eztunnel_xds_nacks_total", ()): 2,
        ("eztunnel_xds_streams_total", ()): 3,
        ("eztunnel_xds_reconnects_total", ()): 2,
        ("eztunnel_xds_protocol_errors_total", ()): 1,
        ("eztunnel_xds_resources", (("type", "Address"),)): 120,
        ("eztunnel_xds_resources", (("type", "Authorization"),)): 4,
        ("eztunnel_addresses_refused_total", ()): 4,
        ("eztunnel_selftest_decision", (("decision", "attach_with_workaround"),)): 1,
        ("eztunnel_selftest_check_passed", (("check", "splice"),)): 1,
        ("eztunnel_selftest_check_passed", (("check", "epoll"),)): 0,
        ("eztunnel_splicing_enabled", ()): 1,
        ("eztunnel_endpoints_enrolled", ()): 2,
        ("eztunnel_active_pairs", (("rule", "netns_mirror"),)): 0,
        ("eztunnel_active_pairs", (("rule", "capture"),)): 2,
        ("eztunnel_active_pairs", (("rule", "cross_mirror"),)): 5,
        # Cumulative buckets; an observation equal to a bound falls in that bucket.
        ("eztunnel_push_to_map_duration_seconds_bucket", (("le", "0.001"),)): 2,
        ("eztunnel_push_to_map_duration_seconds_bucket", (("le", "0.01"),)): 3,
        ("eztunnel_push_to_map_duration_seconds_bucket", (("le", "+Inf"),)): 4,
        ("eztunnel_push_to_map_duration_seconds_count", ()): 4,
        ("eztunnel_push_to_map_duration_seconds_sum", ()): pytest.approx(7.0044),
        ("eztunnel_sockets_seen_total", ()): counter("sockets_seen"),
        ("eztunnel_sockets_registered_total", ()): counter("active_registered"),
        ("eztunnel_pairs_total", (("rule", "netns_mirror"),)): counter("pairs_netns_mirror"),
        ("eztunnel_pairs_total", (("rule", "capture"),)): counter("pairs_capture"),
        ("eztunnel_pairs_total", (("rule", "cross_mirror"),)): counter("pairs_cross_mirror"),
        ("eztunnel_paired_sent_bytes_total", (("path", "redirected"),)): counter(
            "bytes_redirected"
        ),
        ("eztunnel_paired_sent_bytes_total", (("path", "tcp"),)): counter("bytes_tcp_paired"),
        ("eztunnel_messages_total", (("path", "redirected"),)): counter("msgs_redirected"),
        ("eztunnel_messages_total", (("path", "tcp"),)): counter("msgs_passed"),
        ("eztunnel_backlog_fallbacks_total", ()): counter("backlog_fallbacks"),
        ("eztunnel_resumes_total", ()): counter("resumes"),
        ("eztunnel_resume_waits_total", (("reason", "drain"),)): counter("resume_wait_drain"),
        ("eztunnel_resume_waits_total", (("reason", "quiet"),)): counter("resume_wait_quiet"),
        ("eztunnel_bypass_readers_total", ()): counter("bypass_readers"),
        ("eztunnel_redirect_misses_total", ()): counter("redirect_misses"),
        ("eztunnel_sockets_tainted_total", ()): counter("tainted"),
        ("eztunnel_sockets_unspliced_total", ()): counter("unspliced"),
        ("eztunnel_sockets_closed_total", ()): counter("sockets_closed"),
        ("eztunnel_ack_callbacks_total", ()): counter("ack_callbacks"),
    }
    for c in layout.Counter:
        if c.name.startswith("NP_"):
            reason = c.name.lower()[3:]
            expected[("eztunnel_not_paired_total", (("reason", reason),))] = counter(c.name.lower())
    got = eztunnel(series)
    del got[info[0]]
    assert got == expected
    # Istio's conventions: counters end in _total, durations are in seconds.
    for name, kind in types.items():
        assert name.startswith(("eztunnel_", "process_")), name
        if kind == "counter":
            assert all(k[0] in (f"{name}_total", f"{name}_created") for k in series if
                       k[0].startswith(name + "_t"))  # fmt: skip
    assert types["eztunnel_push_to_map_duration_seconds"] == "histogram"
    assert types["eztunnel_pairs"] == "counter" and types["eztunnel_active_pairs"] == "gauge"
    # And the process's own, for memory and CPU per node.
    assert value(series, "process_resident_memory_bytes") > 0
    assert ("process_cpu_seconds_total", ()) in series


def test_every_bpf_counter_has_a_family() -> None:
    named = {counter for f in BPF_FAMILIES for counter, _ in f.members} | UNEXPORTED_COUNTERS
    missing = {c.name.lower() for c in layout.Counter} - named
    assert not missing, f"name a family for the new BPF counters {missing} in BPF_FAMILIES"
    for f in BPF_FAMILIES:
        assert f.name.startswith("eztunnel_") and f.name.endswith("_total"), f.name
        assert bool(f.label) == (len(f.members) > 1 or f.name == "eztunnel_pairs_total")


def test_a_counter_no_family_names_is_still_exported() -> None:
    fake = FakeView(counter_values={"pairs": 1, "some_new_counter": 5})
    series, types = parse(render(fake))
    assert value(series, "eztunnel_bpf_some_new_counter_total") == 5
    assert types["eztunnel_bpf_some_new_counter"] == "counter"
    assert not [k for k in series if k[0] == "eztunnel_pairs_total"], "only per rule"


def test_a_file_source_before_the_data_plane_is_loaded() -> None:
    fake = FakeView(ready=False, plane=None, endpoint_source="file:/e.yaml",
                    file_status=FileStatus("bad", 3))  # fmt: skip
    series, _ = parse(render(fake))
    got = eztunnel(series)
    assert value(got, "eztunnel_ready") == 0
    assert value(got, "eztunnel_endpoints_file_errors_total") == 3
    assert value(got, "eztunnel_selftest_decision", decision="not_run") == 1
    assert ("eztunnel_agent_info", (("kernel", "6.18.0-test"), ("node", "node-1"),
                                    ("source", "file"), ("version", "9.9.9"))) in got  # fmt: skip
    # Nothing from the maps, and no xDS series for a file source.
    names = {k[0] for k in got}
    assert not names & {"eztunnel_endpoints_enrolled", "eztunnel_splicing_enabled",
                        "eztunnel_active_pairs", "eztunnel_pairs_total",
                        "eztunnel_xds_connected"}  # fmt: skip


def get(listen: Listen, path: str) -> bytes:
    with socket.create_connection((listen.host, listen.port), timeout=15) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_the_page_is_read_on_the_reader_and_a_busy_reader_is_503() -> None:
    gate = threading.Event()
    fake = FakeView(counter_values={"pairs_capture": 1})

    def hold(_: str) -> None:
        gate.wait(30)

    async def main() -> None:
        reader = Reader(max_waiting=1)
        listen = Listen("127.0.0.1", free_port())
        server = await metrics_module.start(fake, listen, reader)
        try:
            pages = [await asyncio.to_thread(get, listen, p) for p in metrics_module.PATHS]
            assert fake.read_threads and all(t.startswith("ez-reader") for t in fake.read_threads)
            for page in pages:
                head, body = page.split(b"\r\n\r\n", 1)
                assert head.startswith(b"HTTP/1.0 200 ")
                assert b"Content-Type: text/plain; version=0.0.4" in head
                assert eztunnel(parse(body)[0]) == eztunnel(parse(render(fake))[0])
            # The one read slot held: the next request is told the reader is busy.
            fake.on_read = hold
            held = asyncio.create_task(asyncio.to_thread(get, listen, "/metrics"))
            for _ in range(1000):  # bounded: until the held read occupies the reader
                if reader.waiting == 1:
                    break
                await asyncio.sleep(0.01)
            busy = await asyncio.to_thread(get, listen, "/stats/prometheus")
            assert busy.startswith(b"HTTP/1.0 503 ") and busy.endswith(b"\r\n\r\nbusy\n")
            gate.set()
            assert (await held).startswith(b"HTTP/1.0 200 ")
        finally:
            gate.set()
            server.close()
            await server.wait_closed()
            reader.close()

    asyncio.run(main())


# ---- the agent process, on the real kernel --------------------------------------------------


@pytest.fixture
def agents() -> Iterator[list[AgentProc]]:
    started: list[AgentProc] = []
    yield started
    for a in started:
        a.stop()


def http(addr: str, request: bytes) -> bytes:
    """Send raw bytes, return everything the server answers before it closes."""
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=15) as s:
        s.sendall(request)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def scrape(addr: str, path: str = "/stats/prometheus") -> Series:
    with urllib.request.urlopen(f"http://{addr}{path}", timeout=10) as r:
        assert r.status == 200
        return parse(r.read())[0]


def metrics_agent(
    lab: Lab, agents: list[AgentProc], tmp_path: Path, pod: Pod
) -> tuple[AgentProc, str]:
    """An agent enrolling `pod` from a file, serving metrics on a free loopback port."""
    metrics = f"127.0.0.1:{free_port()}"
    agent = AgentProc(lab, "--endpoints-file", str(endpoints_file(tmp_path / "e", pod.ip4)),
                      "--metrics-listen", metrics)  # fmt: skip
    agents.append(agent)
    agent.wait_serving()
    return agent, metrics


@pytest.mark.kernel
def test_a_live_spliced_flow_in_the_agents_metrics(
    lab: Lab, agents: list[AgentProc], tmp_path: Path
) -> None:
    a, b = lab.add_pod(), lab.add_pod()
    agent, metrics = metrics_agent(lab, agents, tmp_path, a)
    first = scrape(metrics)
    assert value(first, "eztunnel_ready") == 1
    assert value(first, "eztunnel_endpoints_enrolled") == 1
    assert value(first, "eztunnel_push_to_map_duration_seconds_count") == 0  # the start's load

    # A change of the file is a push: one latency observed once the map holds it.
    endpoints_file(tmp_path / "e", a.ip4, b.ip4)
    wait_for(lambda: value(scrape(metrics), "eztunnel_endpoints_enrolled") == 2,
             what="the second endpoint enrolled")  # fmt: skip
    wait_for(lambda: value(scrape(metrics), "eztunnel_push_to_map_duration_seconds_count") == 1,
             what="the push observed")  # fmt: skip

    hold_server(lab, b, "0.0.0.0", 9000)
    flow = hold_client(lab, a, b.ip4, 9000)
    live = scrape(metrics)
    assert value(live, "eztunnel_active_pairs", rule="cross_mirror") == 1
    assert value(live, "eztunnel_active_pairs", rule="capture") == 0
    assert value(live, "eztunnel_pairs_total", rule="cross_mirror") == 1
    assert value(live, "eztunnel_paired_sent_bytes_total", path="redirected") > 0
    assert value(live, "eztunnel_sockets_seen_total") >= 2
    assert value(live, "process_resident_memory_bytes") > 0
    finish_hold(flow, rounds=2)
    # Both sockets closed: the pair is counted, no longer active.
    wait_for(lambda: value(scrape(metrics), "eztunnel_active_pairs", rule="cross_mirror") == 0,
             what="the pair gone")  # fmt: skip
    assert scrape(metrics, "/metrics").keys() == scrape(metrics).keys()
    log = agent.terminate()
    assert "Traceback" not in log and "metrics.error" not in log, log


@pytest.mark.kernel
def test_metrics_refuse_oversize_and_bad_requests_without_traceback(
    lab: Lab, agents: list[AgentProc], tmp_path: Path
) -> None:
    agent, metrics = metrics_agent(lab, agents, tmp_path, lab.add_pod())
    huge = b"a" * (100 << 10)
    assert http(metrics, b"GET /" + huge + b" HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.0 431 ")
    header = b"GET /stats/prometheus HTTP/1.1\r\nX-Big: " + huge + b"\r\n\r\n"
    assert http(metrics, header).startswith(b"HTTP/1.0 431 ")
    many = b"GET /metrics HTTP/1.1\r\n" + b"X-A: b\r\n" * 1000 + b"\r\n"
    assert http(metrics, many).startswith(b"HTTP/1.0 431 ")
    assert http(metrics, b"\x16\x03\x01garbage\r\n\r\n").startswith(b"HTTP/1.0 400 ")
    assert http(metrics, b"POST /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.0 405 ")
    assert http(metrics, b"GET /nope HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.0 404 ")
    assert http(metrics, b"GET /stats HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.0 404 ")
    ok = http(metrics, b"GET /stats/prometheus?x=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert ok.startswith(b"HTTP/1.0 200 ")
    assert value(parse(ok.split(b"\r\n\r\n", 1)[1])[0], "eztunnel_endpoints_enrolled") == 1
    log = agent.terminate()
    assert "Traceback" not in log and "metrics.error" not in log, log


@pytest.mark.kernel
def test_metrics_bound_connections_and_their_time(
    lab: Lab, agents: list[AgentProc], tmp_path: Path
) -> None:
    agent, metrics = metrics_agent(lab, agents, tmp_path, lab.add_pod())
    host, port = metrics.rsplit(":", 1)
    idle = [
        socket.create_connection((host, int(port)), timeout=15)
        for _ in range(httpd.MAX_CONNECTIONS)
    ]
    try:
        # Every slot is held by a client that sends nothing: the next one is refused...
        assert http(metrics, b"GET /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.0 503 ")
        # ...and the idle ones are closed by the server, not kept forever.
        for s in idle:
            while s.recv(65536):
                pass
    finally:
        for s in idle:
            s.close()
    wait_for(lambda: http(metrics, b"GET /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.0 200"),
             what="metrics served again")  # fmt: skip
    assert "Traceback" not in agent.terminate()
