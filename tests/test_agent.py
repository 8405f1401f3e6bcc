"""The agent process end to end on the real kernel: `eztunnel-plugin run` and the CLI."""

from __future__ import annotations

import json
import os
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

from .conftest import PY, finish_hold, hold_client, hold_server, wait_for, wait_line

pytestmark = pytest.mark.kernel

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


# ---- metrics listener ------------------------------------------------------------------


def http(addr: str, request: bytes) -> bytes:
    """Send raw bytes, return everything the server answers before it closes."""
    host, port = addr.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=15) as s:
        s.sendall(request)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_metrics_refuse_oversize_and_bad_requests_without_traceback(
    lab: Lab, agents: list[AgentProc], tmp_path: Path
) -> None:
    a = lab.add_pod()
    metrics = f"127.0.0.1:{free_port()}"
    agent = AgentProc(lab, "--endpoints-file", str(endpoints_file(tmp_path / "e", a.ip4)),
                      "--metrics-listen", metrics)  # fmt: skip
    agents.append(agent)
    agent.wait_serving()
    huge = b"a" * (100 << 10)
    assert http(metrics, b"GET /" + huge + b" HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.0 431 ")
    header = b"GET /metrics HTTP/1.1\r\nX-Big: " + huge + b"\r\n\r\n"
    assert http(metrics, header).startswith(b"HTTP/1.0 431 ")
    many = b"GET /metrics HTTP/1.1\r\n" + b"X-A: b\r\n" * 1000 + b"\r\n"
    assert http(metrics, many).startswith(b"HTTP/1.0 431 ")
    assert http(metrics, b"\x16\x03\x01garbage\r\n\r\n").startswith(b"HTTP/1.0 400 ")
    assert http(metrics, b"POST /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.0 405 ")
    assert http(metrics, b"GET /nope HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.0 404 ")
    ok = http(metrics, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert ok.startswith(b"HTTP/1.0 200 ") and b"eztunnel_endpoints 1" in ok
    log = agent.terminate()
    assert "Traceback" not in log and "metrics.error" not in log, log


def test_metrics_bound_connections_and_their_time(
    lab: Lab, agents: list[AgentProc], tmp_path: Path
) -> None:
    from eztunnel_plugin.api import metrics as metrics_module

    a = lab.add_pod()
    metrics = f"127.0.0.1:{free_port()}"
    agent = AgentProc(lab, "--endpoints-file", str(endpoints_file(tmp_path / "e", a.ip4)),
                      "--metrics-listen", metrics)  # fmt: skip
    agents.append(agent)
    agent.wait_serving()
    host, port = metrics.rsplit(":", 1)
    idle = [
        socket.create_connection((host, int(port)), timeout=15)
        for _ in range(metrics_module.MAX_CONNECTIONS)
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
