"""The agent: its view for the API (in process), and the agent process end to end on the
real kernel (`eztunnel-plugin run` and the CLI)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from eztunnel_lab.netlab import Lab
from eztunnel_plugin import cli, config
from eztunnel_plugin.agent import Agent, View
from eztunnel_plugin.api.view import FileStatus, FlowPage, Owner, SelftestStatus
from eztunnel_plugin.bpf.maps import Dataplane
from eztunnel_plugin.endpoints_file import StaticEndpoints
from eztunnel_plugin.state.workloads import WorkloadRecord, WorkloadState
from eztunnel_plugin.xds.client import XdsClient
from eztunnel_plugin.xds.updater import state_watches

from .conftest import PY, finish_hold, hold_client, hold_server, wait_for, wait_line

kernel = pytest.mark.kernel

CLI = [PY, "-m", "eztunnel_plugin"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class AgentProc:
    """One `eztunnel-plugin run` process (killed by pid at the end), with an admin
    socket of its own (a short path: unix socket paths are limited)."""

    def __init__(
        self, lab: Lab, *args: str, env: dict[str, str] | None = None, admin: Path | None = None
    ) -> None:
        self.addr = f"127.0.0.1:{free_port()}"
        self.admin_root: Path | None = None  # removed at stop() when made here
        if admin is None:
            self.admin_root = Path(tempfile.mkdtemp(prefix="ezadm-"))
            admin = self.admin_root / "run" / "admin.sock"
        self.admin = admin
        self.argv = [
            *CLI,
            "run",
            "--bpffs",
            str(lab.bpffs),
            "--cgroup",
            str(lab.cgroup),
            "--grpc-listen",
            self.addr,
            "--log-format",
            "json",
            "--admin-socket",
            str(self.admin),
            *args,
        ]
        self.env = {**os.environ, **(env or {})}
        self.proc = self.start()

    def start(self) -> subprocess.Popen[bytes]:
        self.proc = subprocess.Popen(
            self.argv, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        return self.proc

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        admin = ["--admin-socket", str(self.admin)] if args[0] in ("enable", "disable") else []
        r = subprocess.run(
            [*CLI, *args, "--grpc-addr", self.addr, *admin],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if check and r.returncode != 0:
            raise AssertionError(f"{args}: rc={r.returncode} {r.stdout} {r.stderr}")
        return r

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def wait_serving(self, timeout: float = 20) -> None:
        def serving() -> bool:
            if self.proc.poll() is not None:
                _, err = self.proc.communicate()
                raise AssertionError(f"agent exited {self.proc.returncode}: {err.decode()}")
            return self.cli("health", check=False).returncode == 0

        wait_for(serving, timeout, "agent SERVING")

    def terminate(self) -> str:
        """SIGTERM, wait, and return what the agent logged."""
        self.proc.terminate()
        _, err = self.proc.communicate(timeout=15)
        return err.decode()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.admin_root is not None:
            shutil.rmtree(self.admin_root, ignore_errors=True)


def log_events(log: str, event: str) -> list[dict[str, Any]]:
    """The agent's JSON log lines of one event."""
    lines = (json.loads(line) for line in log.splitlines() if line.startswith("{"))
    return [e for e in lines if e.get("event") == event]


@pytest.fixture
def agents() -> Iterator[list[AgentProc]]:
    started: list[AgentProc] = []
    yield started
    for a in started:
        a.stop()


def endpoints_file(path: Path, *ips: str) -> Path:
    path.write_text(json.dumps({"endpoints": list(ips)}))  # JSON is YAML
    return path


@kernel
def test_restart_keeps_live_flows_and_attaches_once(
    lab: Lab, agents: list[AgentProc], tmp_path: Path
) -> None:
    a, b = lab.add_pod(), lab.add_pod()
    eps = endpoints_file(tmp_path / "eps.yaml", a.ip4, b.ip4)
    agent = AgentProc(lab, "--endpoints-file", str(eps))
    agents.append(agent)
    agent.wait_serving()
    hold_server(lab, b, "0.0.0.0", 9000)
    flow = hold_client(lab, a, b.ip4, 9000, "--size", str(1 << 20))
    (before,) = agent.cli_json("flows")

    os.kill(agent.proc.pid, signal.SIGKILL)
    agent.proc.wait(timeout=10)
    assert flow.stdin is not None
    flow.stdin.write(b"x\nx\n")  # the flow goes on while no agent runs
    flow.stdin.flush()
    wait_line(flow, "round 2")

    agent.start()
    agent.wait_serving()
    status = agent.cli_json("status")
    assert status["reused_pins"] is True
    cg = subprocess.run(
        ["bpftool", "cgroup", "show", str(lab.cgroup)], capture_output=True, text=True, check=True
    ).stdout
    assert cg.count("ez_sockops") == 1, cg
    (after,) = agent.cli_json("flows")
    assert after["client_socket_cookie"] == before["client_socket_cookie"]
    assert int(after["bytes_client_to_server"]) >= int(before["bytes_client_to_server"]) + (2 << 20)
    finish_hold(flow, rounds=2)


@kernel
def test_sigterm_stops_quickly_and_keeps_pins(
    lab: Lab, agents: list[AgentProc], tmp_path: Path
) -> None:
    a = lab.add_pod()
    agent = AgentProc(lab, "--endpoints-file", str(endpoints_file(tmp_path / "e", a.ip4)))
    agents.append(agent)
    agent.wait_serving()
    started = time.monotonic()
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(timeout=5) == 0
    assert time.monotonic() - started < 5
    assert {"link_sockops", "link_msg", "ez_endpoints"} <= set(os.listdir(lab.bpffs))


@kernel
def test_endpoints_file_reload_and_cli(lab: Lab, agents: list[AgentProc], tmp_path: Path) -> None:
    a, b = lab.add_pod(), lab.add_pod()
    eps = endpoints_file(tmp_path / "eps.yaml", a.ip4)
    agent = AgentProc(lab, "--endpoints-file", str(eps))
    agents.append(agent)
    agent.wait_serving()
    listed = agent.cli_json("endpoints")["endpoints"]
    assert [(e["ip"], e["in_map"]) for e in listed] == [(a.ip4, True)]

    endpoints_file(eps, a.ip4, b.ip4, b.ip6)
    wait_for(
        lambda: len(agent.cli_json("endpoints")["endpoints"]) == 3,
        what="reloaded endpoints",
    )
    assert all(e["in_map"] for e in agent.cli_json("endpoints")["endpoints"])

    eps.write_text("endpoints: [not-an-ip]")  # a bad edit keeps the last good set
    time.sleep(1.5)
    assert len(agent.cli_json("endpoints")["endpoints"]) == 3

    hold_server(lab, b, "0.0.0.0", 9000)
    flow = hold_client(lab, a, b.ip4, 9000)
    table = agent.cli("flows").stdout
    assert f"{b.ip4}:9000" in table and "cross_mirror" in table
    stats = agent.cli_json("stats")
    assert int(stats["counters"]["pairs"]) >= 1
    assert "out_of_scope" in stats["not_paired_reasons"]
    status = agent.cli_json("status")
    assert status["capture_ports"] == [15001]
    assert status["backlog_limit_bytes"] == 4 << 20
    assert "4.0 MiB" in agent.cli("status").stdout
    assert agent.cli("disable").stdout.strip() == "splicing disabled"
    assert agent.cli_json("status")["enabled"] is False
    assert agent.cli("enable").stdout.strip() == "splicing enabled"
    finish_hold(flow, rounds=1)


@pytest.mark.parametrize(
    ("args", "env", "setting"),
    [
        (["--grpc-listen", "0.0.0.0:15081"], {}, "--grpc-listen"),
        (["--grpc-listen", "nonsense"], {}, "--grpc-listen"),
        (["--metrics-listen", "0.0.0.0:15082"], {}, "--metrics-listen"),
        (["--admin-socket", "run/admin.sock"], {}, "--admin-socket"),
        (["--admin-socket", "/run/ez admin.sock"], {}, "--admin-socket"),
        (["--admin-socket", "/run/" + "x" * 100], {}, "--admin-socket"),
        (["--endpoints-file", "/nonexistent/eps.yaml"], {}, "--endpoints-file"),
        (["--log-format", "xml", "--endpoints-file", "/dev/null"], {}, "--log-format"),
        (["--cgroup", "/nonexistent"], {"NODE_NAME": "n"}, "--cgroup"),
        ([], {"NODE_NAME": ""}, "NODE_NAME"),
        (
            ["--xds-address", "istiod:15012"],
            {"NODE_NAME": "n", "XDS_ROOT_CA": "/nope.pem"},
            "XDS_ROOT_CA",
        ),
    ],
)
def test_bad_configuration_is_one_clear_line(
    args: list[str], env: dict[str, str], setting: str
) -> None:
    r = subprocess.run(
        [*CLI, "run", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **env},
        check=False,
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and setting in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_cli_without_agent_is_a_clear_error() -> None:
    r = subprocess.run(
        [*CLI, "status", "--grpc-addr", f"127.0.0.1:{free_port()}", "--timeout", "1"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert r.returncode == 1
    assert "cannot reach the agent" in r.stderr and "Traceback" not in r.stderr


def test_agent_process_stays_lean() -> None:
    # Memory is a product target (< 60 MB): the agent must not carry the loader's
    # LLVM bindings, the simulator's TLS stack or plotting libraries.
    probe = (
        "import sys\n"
        "from eztunnel_plugin import agent, cli\n"
        "cli.build_parser()\n"
        "heavy = {'pylibbpf', 'llvmlite', 'cryptography', 'matplotlib', 'numpy'}\n"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))\n"
    )
    r = subprocess.run([PY, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert r.stdout.strip() == "[]"


# ---- the view the API gets (in process) ------------------------------------------------


def make_agent(*argv: str, env: dict[str, str] | None = None) -> Agent:
    args = cli.build_parser().parse_args(["run", *argv])
    return Agent(config.from_args(args, env or {}, False))


@pytest.fixture
def file_agent(tmp_path: Path) -> Iterator[Agent]:
    eps = endpoints_file(tmp_path / "eps.yaml", "10.0.0.2", "10.0.0.1")
    a = make_agent("--endpoints-file", str(eps), "--bpffs", "/sys/fs/bpf/ez-view-test")
    yield a
    a.reader.close()


def test_the_view_reads_plain_fields_and_nothing_from_an_unloaded_data_plane(
    file_agent: Agent,
) -> None:
    v = file_agent.view
    assert isinstance(v, View)
    assert (v.version, v.kernel, v.bpffs) == (file_agent.version, os.uname().release,
                                              "/sys/fs/bpf/ez-view-test")  # fmt: skip
    assert v.cgroup == str(file_agent.cfg.cgroup) and v.node == ""
    assert v.ready is False and v.stale is False
    file_agent.ready = True
    assert v.ready is True  # live: the view is no copy
    for read in (v.dataplane, v.endpoints_in_map, v.counters):
        assert read() is None
    assert v.flow_page(0, 10) is None
    assert v.set_enabled(False, uid=0, pid=1) is None


def test_the_view_of_a_file_source(file_agent: Agent) -> None:
    v = file_agent.view
    assert v.endpoints_file() is None and v.owners() == {}  # nothing before run()
    file_agent.static = StaticEndpoints(file_agent.cfg.endpoints_file or Path())
    assert v.endpoint_source == f"file:{file_agent.cfg.endpoints_file}"
    assert v.owners() == {"10.0.0.1": Owner("", "", ""), "10.0.0.2": Owner("", "", "")}
    assert v.endpoints_file() == FileStatus("", 0)
    assert v.xds() is None and v.addresses_refused == 0


def test_the_view_of_an_xds_source(tmp_path: Path) -> None:
    a = make_agent("--xds-address", "127.0.0.1:15010", "--xds-plaintext", "--node-name", "n1")
    try:
        assert a.cfg.xds is not None
        a.state = WorkloadState("n1")
        a.xds = XdsClient(a.cfg.xds, state_watches(a.state))
        status = a.view.xds()
        assert status is not None
        assert (status.address, status.connected, status.complete) == (a.cfg.xds.address,
                                                                        False, False)  # fmt: skip
        assert (status.nacks, status.streams, status.last_error) == (0, 0, "")
        assert [t.type_url for t in status.types] == list(a.cfg.xds.types)
        assert all(t.resources == 0 and t.last_acked_nonce == "" for t in status.types)
        a.stale = True
        assert a.view.xds() == dataclasses.replace(status, stale=True)
        assert a.view.endpoint_source == "xds" and a.view.endpoints_file() is None
        a.state.refused_total = 2
        assert a.view.addresses_refused == 2
        # Owners carry what `endpoints` shows as istioctl does: node and tunnel protocol.
        pod = WorkloadRecord("uid-p", "p", "ns", "n1", "", ("10.0.0.7",), True, False, False,
                             "sa", "")  # fmt: skip
        a.state.apply_addresses({"uid-p": pod})
        assert a.view.owners() == {"10.0.0.7": Owner("uid-p", "p", "ns", "n1", "HBONE")}
    finally:
        a.reader.close()


def test_the_view_hands_out_the_agents_events(file_agent: Agent) -> None:
    async def main() -> list[str]:
        async with file_agent.view.subscribe() as queue:
            file_agent.events.publish("agent.ready", endpoints=2)
            return [queue.get_nowait().kind]

    assert asyncio.run(main()) == ["agent.ready"]


@kernel
def test_the_view_reads_the_maps_and_flips_the_switch(
    file_agent: Agent, dp: Dataplane, lab: Lab
) -> None:
    file_agent.dp = dp
    v = file_agent.view
    plane = v.dataplane()
    assert plane is not None and plane.enabled is True
    assert plane.capture_ports == (15001,) and plane.backlog_limit == 4 << 20
    assert set(plane.programs) == set(dp.links) and plane.programs == tuple(sorted(dp.links))
    dp.endpoints.put("10.0.0.1", 1)
    assert v.endpoints_in_map() == {"10.0.0.1": 1}
    counters = v.counters()
    assert counters is not None and counters["pairs"] == 0
    assert v.flow_page(0, 10) == FlowPage([], None)

    async def switch() -> tuple[bool | None, list[tuple[str, dict[str, str]]]]:
        async with v.subscribe() as queue:
            was = v.set_enabled(False, uid=0, pid=4242)
            events = []
            while not queue.empty():
                e = queue.get_nowait()
                events.append((e.kind, e.fields))
            return was, events

    was, events = asyncio.run(switch())
    assert was is True and dp.config.enabled is False
    assert events == [("dataplane.disabled", {"uid": "0", "pid": "4242"})]
    assert (v.dataplane() or plane).enabled is False


# ---- the kernel self-test decides what the agent attaches ------------------------------------


@kernel
def test_the_agent_attaches_as_the_self_test_decided_and_says_why(
    lab: Lab, agents: list[AgentProc], tmp_path: Path
) -> None:
    a = lab.add_pod()
    agent = AgentProc(lab, "--endpoints-file", str(endpoints_file(tmp_path / "e", a.ip4)))
    agents.append(agent)
    agent.wait_serving()
    status = agent.cli_json("status")
    st = status["selftest"]
    assert st["decision"] in ("attach", "attach_with_workaround"), st
    assert st["kernel"] == status["kernel"] == os.uname().release
    verdict = st["decision"] == "attach_with_workaround"
    assert ("link_skb" in status["programs_attached"]) is verdict
    chosen = "skb_verdict" if verdict else "plain"
    assert all(c["passed"] for c in st["checks"] if c["name"].endswith(f"/{chosen}")), st
    table = agent.cli("status").stdout
    assert re.search(rf"^self-test +{st['decision']}$", table, re.M), table
    assert re.search(r"^  fionread +without workaround: (pass|FAIL: .*); with it: ", table, re.M)
    log = agent.terminate()
    (decided,) = log_events(log, "selftest.decided")
    assert decided["decision"] == st["decision"] and decided["reason"] == st["reason"]


@kernel
def test_a_no_splice_decision_attaches_nothing_and_removes_earlier_pins(
    lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A start whose self-test fails: what an earlier start attached goes (kill switch first,
    # no byte lost), nothing new is attached, and the agent still serves and gets ready.
    from eztunnel_plugin import selftest
    from eztunnel_plugin.api import health
    from eztunnel_plugin.bpf import loader

    loader.install_or_reuse(lab.bpffs, lab.cgroup).close()
    refused = SelftestStatus(selftest.NO_SPLICE, "epoll: lost EPOLLIN", (), kernel="6.99.1")
    monkeypatch.setattr(selftest, "run", lambda *a, **k: refused)
    eps = endpoints_file(tmp_path / "eps.yaml", "10.0.0.1")
    admin = Path(tempfile.mkdtemp(prefix="ezadm-")) / "admin.sock"
    port = free_port()
    agent = make_agent(
        "--endpoints-file", str(eps), "--bpffs", str(lab.bpffs), "--cgroup", str(lab.cgroup),
        "--grpc-listen", f"127.0.0.1:{free_port()}", "--admin-socket", str(admin),
        "--health-listen", f"127.0.0.1:{port}",
    )  # fmt: skip

    async def main() -> tuple[int, str, str]:
        stop = asyncio.Event()
        run = asyncio.create_task(agent.run(stop))
        for _ in range(500):  # bounded: until ready
            if agent.ready or run.done():
                break
            await asyncio.sleep(0.02)
        probe = await asyncio.to_thread(_get, port, health.READY)
        stats = await asyncio.to_thread(
            subprocess.run, [*CLI, "stats", "--grpc-addr", str(agent.cfg.grpc_listen)],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        stop.set()
        return await run, probe, stats.stderr

    try:
        code, probe, stats_err = asyncio.run(main())
    finally:
        shutil.rmtree(admin.parent, ignore_errors=True)
    assert code == 0 and probe.endswith("\r\n\r\nready\n")
    assert agent.selftest == refused and agent.dp is None
    assert not lab.bpffs.exists() or not any(lab.bpffs.iterdir())  # nothing pinned any more
    cg = subprocess.run(["bpftool", "cgroup", "show", str(lab.cgroup)],
                        capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "ez_sockops" not in cg
    assert "the kernel self-test decided not to splice (epoll: lost EPOLLIN)" in stats_err


def _get(port: int, path: str) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()
