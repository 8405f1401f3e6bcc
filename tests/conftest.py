"""Fixtures for tests on the real kernel: a lab node per test, cleaned up even on failure."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from eztunnel_lab import traffic
from eztunnel_lab.netlab import Lab, Pod
from eztunnel_plugin.bpf import layout, loader
from eztunnel_plugin.bpf.maps import Dataplane

TOOLS = Path(__file__).parent / "tools"
PY = sys.executable


def run_isolated(code: str, *args: str, cwd: Path | None = None, timeout: float = 120) -> str:
    """Run `code` in a fresh, isolated interpreter (`python -I`); it must exit 0. Its stdout."""
    r = subprocess.run(
        [PY, "-I", "-c", code, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("kernel tests need root (BPF, namespaces, cgroups)")


@pytest.fixture
def lab() -> Iterator[Lab]:
    require_root()
    with Lab() as node:
        yield node


@pytest.fixture
def dp(lab: Lab) -> Iterator[Dataplane]:
    plane = loader.install_or_reuse(lab.bpffs, lab.cgroup)
    yield plane
    plane.close()


def enroll(plane: Dataplane, *pods: Pod) -> None:
    for pod in pods:
        plane.endpoints.put(pod.ip4, layout.EP_ENROLLED)
        plane.endpoints.put(pod.ip6, layout.EP_ENROLLED)


def wait_line(proc: subprocess.Popen[bytes], want: str, timeout: float = 10.0) -> str:
    """Read the process's stdout until a line starting with `want` (bounded in time)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    os.set_blocking(proc.stdout.fileno(), False)
    buf = b""
    while time.monotonic() < deadline:
        chunk = proc.stdout.read()
        if chunk:
            buf += chunk
            for line in buf.decode(errors="replace").splitlines():
                if line.startswith(want):
                    return line
        elif proc.poll() is not None:
            break
        time.sleep(0.01)
    raise AssertionError(f"no {want!r} from {proc.args!r}; got {buf!r}, rc={proc.poll()}")


def wait_for(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def flowcheck_server(lab: Lab, pod: Pod, port: int, *extra: str) -> subprocess.Popen[bytes]:
    proc = lab.spawn(
        pod,
        traffic.command("flowcheck", "server", "--port", str(port), *extra),
        stdout=subprocess.PIPE,
    )
    wait_line(proc, '{"listening"')
    return proc


def flowcheck_client(
    lab: Lab, pod: Pod, host: str, port: int, *extra: str, timeout: float = 120.0
) -> dict[str, object]:
    args = ("--connect", host, "--port", str(port), "--timeout", str(timeout - 10), *extra)
    proc = lab.spawn(
        pod,
        traffic.command("flowcheck", "client", *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = proc.communicate(timeout=timeout)
    assert out, f"flowcheck client printed nothing; stderr: {err.decode()}"
    result: dict[str, object] = traffic.report(out)
    assert result["ok"], f"flowcheck failed: {result}; stderr: {err.decode()[-2000:]}"
    return result


def hold_server(lab: Lab, pod: Pod, host: str, port: int) -> subprocess.Popen[bytes]:
    proc = lab.spawn(
        pod, [PY, str(TOOLS / "hold.py"), "server", host, str(port)], stdout=subprocess.PIPE
    )
    wait_line(proc, "listening")
    return proc


def hold_client(lab: Lab, pod: Pod, host: str, port: int, *extra: str) -> subprocess.Popen[bytes]:
    proc = lab.spawn(
        pod,
        [PY, str(TOOLS / "hold.py"), "client", host, str(port), *extra],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    wait_line(proc, "held")
    return proc


def finish_hold(proc: subprocess.Popen[bytes], rounds: int = 0) -> None:
    """Exchange more echo rounds, close, and require a clean exit (bytes intact)."""
    assert proc.stdin is not None
    proc.stdin.write(b"x\n" * rounds)
    proc.stdin.close()
    proc.wait(timeout=30)
    assert proc.returncode == 0, f"hold client failed (rc={proc.returncode})"
