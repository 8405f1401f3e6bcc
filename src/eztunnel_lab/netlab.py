"""Throwaway "nodes" made of network namespaces, a bridge and a cgroup.

Used by the tests, the demo, the benchmarks and the simulator. Everything a lab
creates carries its unique id and is removed by `close()`, even after a failure:
the node netns (its bridge and veths go with it), the pod netns, the cgroup and
the bpffs directory; processes the lab started are killed by pid.
The initial network namespace and the root cgroup are never touched.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from eztunnel_plugin.bpf import loader, paths, syscalls

CLONE_NEWNET = 0x40000000
BPFFS_ROOT = Path("/sys/fs/bpf")


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def listening(netns: str | None, ports: Iterable[int]) -> bool:
    """Whether the netns (None: this process's own) has a TCP listener on every port (on
    any address)."""
    inside = () if netns is None else ("ip", "netns", "exec", netns)
    out = run(*inside, "ss", "-ltnH").stdout
    # ss -ltnH: state, recv-q, send-q, local address:port, peer address:port
    bound = {line.split()[3].rpartition(":")[2] for line in out.splitlines() if line.strip()}
    return all(str(port) in bound for port in ports)


class WaitError(RuntimeError):
    """What wait_until waited for did not happen."""


def wait_until(
    cond: Callable[[], bool],
    timeout: float,
    what: str,
    proc: subprocess.Popen[bytes] | None = None,
) -> None:
    """Poll cond (bounded in time); fail early if proc (the process it waits on) exits."""
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise WaitError(f"{what}: process exited ({proc.returncode})")
        if time.monotonic() > deadline:
            raise WaitError(f"timed out waiting for {what}")
        time.sleep(0.05)


def wait_listening(
    netns: str | None,
    ports: Iterable[int],
    timeout: float = 10.0,
    proc: subprocess.Popen[bytes] | None = None,
    what: str = "",
) -> None:
    """Wait until every port listens in the netns (see wait_until)."""
    want = list(ports)
    what = what or f"a listener on port(s) {want} in {netns or 'this netns'}"
    wait_until(lambda: listening(netns, want), timeout, what, proc)


def ensure_bpffs() -> None:
    """Mount bpffs at /sys/fs/bpf if nothing is mounted there yet."""
    if not paths.is_bpffs(BPFFS_ROOT):
        run("mount", "-t", "bpf", "bpf", str(BPFFS_ROOT))


@dataclass
class Pod:
    name: str  # netns name
    ip4: str
    ip6: str
    cgroup: Path

    @property
    def netns_path(self) -> Path:
        return Path("/run/netns") / self.name


def _enter(netns: Path, cgroup: Path) -> None:
    """Runs in the child between fork and exec: join the cgroup, then the netns."""
    (cgroup / "cgroup.procs").write_text(str(os.getpid()))
    fd = os.open(netns, os.O_RDONLY)
    if syscalls.libc().setns(fd, CLONE_NEWNET) != 0:
        os._exit(121)
    os.close(fd)


class Managed:
    """`with` support for things built by start() and removed by close(): a failed
    start() is undone before the error propagates."""

    def start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Lab(Managed):
    """One node: pods on a bridge inside a private node netns, one cgroup."""

    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    subnet4: str = "10.240.0"
    subnet6: str = "fd00:ee::"
    pods: list[Pod] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _netns: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.node = f"ezn-{self.tag}"
        self.cgroup = paths.cgroup2_root() / f"eztest-{self.tag}"
        self.bpffs = BPFFS_ROOT / f"eztest-{self.tag}"

    def start(self) -> None:
        ensure_bpffs()
        self.cgroup.mkdir()
        self._add_netns(self.node)
        self.ip(self.node, "link", "add", "br0", "type", "bridge")
        self.ip(self.node, "link", "set", "br0", "up")
        self.ip(self.node, "link", "set", "lo", "up")

    def _add_netns(self, name: str) -> None:
        run("ip", "netns", "add", name)
        self._netns.append(name)

    def ip(self, netns: str, *args: str) -> None:
        run("ip", "-n", netns, *args)

    def exec(self, netns: str, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run("ip", "netns", "exec", netns, *argv, check=check)

    def add_pod(self, cgroup_name: str | None = None) -> Pod:
        """A pod netns on the bridge; with `cgroup_name`, also its own child cgroup."""
        n = len(self.pods) + 1
        pod = Pod(
            name=f"ezp-{self.tag}-{n}",
            ip4=f"{self.subnet4}.{10 + n}",
            ip6=f"{self.subnet6}{10 + n:x}",
            cgroup=self.child_cgroup(cgroup_name) if cgroup_name else self.cgroup,
        )
        self._add_netns(pod.name)
        self.ip(
            self.node,
            "link",
            "add",
            f"v{n}",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            pod.name,
        )
        self.ip(self.node, "link", "set", f"v{n}", "master", "br0", "up")
        self.ip(pod.name, "link", "set", "lo", "up")
        self.ip(pod.name, "addr", "add", f"{pod.ip4}/24", "dev", "eth0")
        self.ip(pod.name, "addr", "add", f"{pod.ip6}/64", "dev", "eth0", "nodad")
        self.ip(pod.name, "link", "set", "eth0", "up")
        self.pods.append(pod)
        return pod

    def child_cgroup(self, name: str) -> Path:
        """A cgroup below the lab's (programs attached to the lab's apply to it too)."""
        path = self.cgroup / name
        path.mkdir(exist_ok=True)
        return path

    def spawn(
        self, pod: Pod | str, argv: Sequence[str], cgroup: Path | None = None, **kw: object
    ) -> subprocess.Popen[bytes]:
        """Start a process inside the pod's netns and the pod's cgroup (or `cgroup`)."""
        netns = Path("/run/netns") / (pod.name if isinstance(pod, Pod) else pod)
        target = cgroup or (pod.cgroup if isinstance(pod, Pod) else self.cgroup)
        proc: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
            list(argv), preexec_fn=lambda: _enter(netns, target), **kw
        )
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        if self.bpffs.exists():
            with contextlib.suppress(Exception):
                loader.uninstall(self.bpffs)
        for name in reversed(self._netns):
            run("ip", "netns", "del", name, check=False)
        self._netns.clear()
        if self.cgroup.exists():
            for child in [p for p in self.cgroup.iterdir() if p.is_dir()]:
                rmdir_cgroup(child)
            rmdir_cgroup(self.cgroup)


def cgroup_cpu_us(cgroup: Path) -> int:
    """usage_usec of the cgroup, its exited processes included (0 when it does not exist)."""
    stat = cgroup / "cpu.stat"
    if not stat.exists():
        return 0
    for line in stat.read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "usage_usec":
            return int(value)
    return 0


def cgroups_cpu_us(groups: dict[str, Path]) -> dict[str, int]:
    """cgroup_cpu_us of each named cgroup."""
    return {name: cgroup_cpu_us(cg) for name, cg in groups.items()}


def cgroup_pids(cgroup: Path) -> list[int]:
    """The processes in the cgroup now (none when it does not exist)."""
    procs = cgroup / "cgroup.procs"
    return [int(x) for x in procs.read_text().split()] if procs.exists() else []


def rmdir_cgroup(path: Path) -> None:
    """Remove an empty cgroup, waiting (bounded) for exiting tasks to leave it."""
    # rmdir fails while exiting tasks linger for a moment
    deadline = time.monotonic() + 10
    while path.exists():
        try:
            path.rmdir()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
