"""Who may change the agent's state: root on the admin socket, identified by the kernel.

The admin server in process over a fake view (what it asks of the agent), then the
agent process on the real kernel; unprivileged callers are real processes running as
uid 65534 (setpriv), on the TCP port and on the admin socket.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import pytest

from eztunnel_lab.netlab import Lab
from eztunnel_plugin.api import admin
from eztunnel_plugin.errors import AdminSocketError
from eztunnel_plugin.pb.eztunnel.v1 import inspector_pb2 as pb
from eztunnel_plugin.pb.eztunnel.v1 import inspector_pb2_grpc as pb_grpc

from ..conftest import PY
from ..test_agent import CLI, AgentProc, endpoints_file, log_events
from ..test_agent_xds import GRPCURL
from .fake_view import FakeView

kernel = pytest.mark.kernel

NOBODY = 65534
PROTO = Path(__file__).parents[2] / "proto"

# A bare gRPC call (no generated code): method path and request bytes in, status out.
RAW_CALL = """
import sys, grpc
target, method, body = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3])
with grpc.insecure_channel(target) as channel:
    try:
        reply = channel.unary_unary(method)(body, timeout=10)
        print("OK", reply.hex())
    except grpc.RpcError as e:
        print(e.code().name, e.details())
"""
DISABLE = ""  # SetEnabledRequest{enabled: false}: every field at its default
ENABLE = "0801"  # field 1, varint 1


def as_nobody(argv: Sequence[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=30)
    return proc.returncode, out.strip(), err.strip()


def raw_call(target: str, method: str, body: str) -> subprocess.Popen[str]:
    return as_nobody([PY, "-c", RAW_CALL, target, method, body])


@pytest.fixture
def agents() -> Iterator[list[AgentProc]]:
    started: list[AgentProc] = []
    yield started
    for a in started:
        a.stop()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path, for unix sockets (at most 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="ezt-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def agent(lab: Lab, agents: list[AgentProc], tmp_path: Path) -> AgentProc:
    a = lab.add_pod()
    proc = AgentProc(lab, "--endpoints-file", str(endpoints_file(tmp_path / "e", a.ip4)))
    agents.append(proc)
    proc.wait_serving()
    return proc


# ---- the service over a fake view (no BPF) -----------------------------------------------


def set_enabled(path: Path, fake: FakeView, enabled: bool) -> tuple[bool | None, str]:
    """SetEnabled through the admin socket at `path`: (the reply, or None and the code)."""

    async def main() -> tuple[bool | None, str]:
        server = await admin.start(fake, path)
        try:
            async with grpc.aio.insecure_channel(f"unix:{path}") as channel:
                stub = pb_grpc.AdminStub(channel)
                try:
                    r = await stub.SetEnabled(pb.SetEnabledRequest(enabled=enabled), timeout=10)
                except grpc.aio.AioRpcError as e:
                    return None, f"{e.code().name}: {e.details()}"
                return r.enabled, "OK"
        finally:
            await server.stop(0)

    return asyncio.run(main())


def test_the_switch_reaches_the_view_with_the_callers_identity(short_dir: Path) -> None:
    fake = FakeView()
    path = short_dir / "run" / "admin.sock"
    assert set_enabled(path, fake, False) == (False, "OK")
    assert fake.switched == [(False, os.geteuid(), os.getpid())]
    assert fake.plane is not None and fake.plane.enabled is False
    assert set_enabled(path, fake, True) == (True, "OK")
    assert [s[0] for s in fake.switched] == [False, True]
    assert not path.exists() and os.listdir(path.parent) == []  # all removed at stop


def test_the_switch_is_unavailable_before_the_data_plane_is_loaded(short_dir: Path) -> None:
    fake = FakeView(plane=None)
    path = short_dir / "run" / "admin.sock"
    assert set_enabled(path, fake, False) == (None, "UNAVAILABLE: data plane not loaded yet")
    assert fake.switched == []


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("run/admin.sock", "must be an absolute path"),
        ("/run/ez admin.sock", "must be an absolute path"),
        ("/run/" + "x" * 100, "is too long"),
    ],
)
def test_unusable_socket_paths_are_named(path: str, problem: str) -> None:
    assert problem in (admin.path_problem(Path(path)) or "")
    with pytest.raises(AdminSocketError, match=problem):
        asyncio.run(admin.start(FakeView(), Path(path)))


def test_only_root_or_the_agents_own_user_is_allowed() -> None:
    assert admin.allowed(admin.Caller(pid=1, uid=0, gid=0))
    assert admin.allowed(admin.Caller(pid=1, uid=os.geteuid(), gid=0))
    assert not admin.allowed(admin.Caller(pid=1, uid=NOBODY, gid=NOBODY)) or os.geteuid() == NOBODY


# ---- the agent process ---------------------------------------------------------------------


def enabled(agent: AgentProc) -> bool:
    return bool(agent.cli_json("status")["enabled"])


@kernel
def test_socket_files_are_root_only_and_removed_at_stop(agent: AgentProc) -> None:
    directory = agent.admin.parent
    st_dir, st_sock = os.stat(directory), os.lstat(agent.admin)
    assert stat.S_IMODE(st_dir.st_mode) == 0o700 and st_dir.st_uid == 0
    assert stat.S_ISSOCK(st_sock.st_mode)
    assert stat.S_IMODE(st_sock.st_mode) == 0o600 and st_sock.st_uid == 0
    private = directory / f".{agent.admin.name}.d"
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o700
    agent.terminate()
    assert agent.proc.returncode == 0
    assert os.listdir(directory) == []  # the socket and the private directory are gone


@kernel
def test_nobody_cannot_change_the_kill_switch(agent: AgentProc) -> None:
    assert enabled(agent)
    # TCP: the old method and the Admin one are refused, naming the admin socket.
    for method in ("/eztunnel.v1.Inspector/SetEnabled", "/eztunnel.v1.Admin/SetEnabled"):
        rc, out, err = finish(raw_call(agent.addr, method, DISABLE))
        assert rc == 0 and out.startswith("PERMISSION_DENIED "), (out, err)
        assert str(agent.admin) in out
    # grpcurl with the proto file (TCP's reflection does not list Admin at all).
    rc, out, err = finish(as_nobody([
        GRPCURL, "-plaintext", "-import-path", str(PROTO), "-proto",
        "eztunnel/v1/inspector.proto", "-d", '{"enabled": false}', agent.addr,
        "eztunnel.v1.Admin/SetEnabled",
    ]))  # fmt: skip
    assert rc != 0 and "PermissionDenied" in err and str(agent.admin) in err, err

    # The admin socket: nobody may not even connect...
    rc, out, err = finish(raw_call(f"unix:{agent.admin}", "/eztunnel.v1.Admin/SetEnabled", ENABLE))
    assert out.startswith("UNAVAILABLE "), (out, err)
    rc, out, err = finish(
        as_nobody([*CLI, "disable", "--admin-socket", str(agent.admin), "--timeout", "5"])
    )
    assert rc == 1 and out == "", (out, err)
    assert err.splitlines() == [
        f"eztunnel-plugin: permission denied on {agent.admin}: "
        "changing the agent's state needs root"
    ]
    # ...and with the files opened up to everyone, the agent itself still refuses,
    # by the caller's credentials.
    for directory in (agent.admin.parent.parent, agent.admin.parent):
        os.chmod(directory, 0o711)
    os.chmod(agent.admin, 0o666)
    denied = raw_call(f"unix:{agent.admin}", "/eztunnel.v1.Admin/SetEnabled", DISABLE)
    rc, out, err = finish(denied)
    assert out.startswith("PERMISSION_DENIED uid 65534 may not change"), (out, err)
    assert enabled(agent)

    log = agent.terminate()
    refusals = log_events(log, "admin.denied")
    assert [(e["uid"], e["pid"]) for e in refusals] == [(NOBODY, denied.pid)], refusals
    assert len(log_events(log, "admin.refused_on_tcp")) == 3
    assert log_events(log, "killswitch.set") == []


@kernel
def test_root_cli_changes_it_and_the_log_names_the_caller(agent: AgentProc) -> None:
    procs = []
    for command, want in (("disable", False), ("enable", True)):
        proc = subprocess.Popen(
            [*CLI, command, "--admin-socket", str(agent.admin)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert out.strip() == f"splicing {'enabled' if want else 'disabled'}"
        assert enabled(agent) is want
        procs.append(proc)
    changes = log_events(agent.terminate(), "killswitch.set")
    assert [(e["enabled"], e["was"], e["uid"], e["pid"]) for e in changes] == [
        (False, True, 0, procs[0].pid),
        (True, False, 0, procs[1].pid),
    ]


@kernel
def test_stale_socket_is_replaced_and_a_live_one_is_not_taken(
    lab: Lab, agents: list[AgentProc], tmp_path: Path, short_dir: Path
) -> None:
    path = short_dir / "run" / "admin.sock"
    path.parent.mkdir(mode=0o700)
    with socket.socket(socket.AF_UNIX) as s:  # left by a killed agent: nobody serves it
        s.bind(str(path))
    eps = str(endpoints_file(tmp_path / "e"))
    agent = AgentProc(lab, "--endpoints-file", eps, admin=path)
    agents.append(agent)
    agent.wait_serving()
    assert agent.cli("disable").stdout.strip() == "splicing disabled"

    # A second agent on the same socket is refused, and the first keeps serving.
    other = AgentProc(lab, "--endpoints-file", eps, admin=path)
    agents.append(other)
    _, err = other.proc.communicate(timeout=30)
    assert other.proc.returncode == 1
    assert err.decode().strip().splitlines()[-1] == (
        f"eztunnel-plugin: error: {path} is served by another process (another agent?)"
    )
    assert agent.cli("enable").stdout.strip() == "splicing enabled"
    assert log_events(agent.terminate(), "admin.stale_socket_removed")


@kernel
@pytest.mark.parametrize("kind", ["file", "open-dir"])
def test_unsafe_socket_paths_are_refused(
    lab: Lab, agents: list[AgentProc], tmp_path: Path, short_dir: Path, kind: str
) -> None:
    path = short_dir / "run" / "admin.sock"
    path.parent.mkdir()
    if kind == "file":
        path.write_text("not a socket")
        want = f"{path} exists and is not a socket; remove it first"
    else:
        (path.parent / "someone-elses").write_text("")
        os.chmod(path.parent, 0o777)
        want = f"{path.parent} (mode 0777) may be changed by other users"
    agent = AgentProc(lab, "--endpoints-file", str(endpoints_file(tmp_path / "e")), admin=path)
    agents.append(agent)
    _, err = agent.proc.communicate(timeout=30)
    assert agent.proc.returncode == 1
    assert err.decode().strip().splitlines()[-1].startswith(f"eztunnel-plugin: error: {want}")
    assert "Traceback" not in err.decode()


@kernel
def test_a_caller_the_relay_did_not_identify_changes_nothing(agent: AgentProc) -> None:
    # Root, but straight to the gRPC server behind the relay: no credentials recorded.
    private = agent.admin.parent / f".{agent.admin.name}.d" / "grpc.sock"
    direct = subprocess.run(
        [PY, "-c", RAW_CALL, f"unix:{private}", "/eztunnel.v1.Admin/SetEnabled", DISABLE],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert direct.stdout.startswith("PERMISSION_DENIED the caller could not be identified")
    assert enabled(agent)
    denied = log_events(agent.terminate(), "admin.denied")
    assert [e["reason"] for e in denied] == ["caller not identified"]
