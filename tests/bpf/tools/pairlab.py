"""Helpers for the pairing tests: socket daemons in lab netns, extra netns the
attacker owns, a cgroup the programs are not attached to, and the pairing-table
checks by socket cookie.

Everything is removed by `Arena.close()`, even after a failure: processes it
started (by pid), then its netns and its cgroup.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from eztunnel_lab.netlab import Lab, Pod, rmdir_cgroup, run
from eztunnel_plugin.bpf import layout, paths
from eztunnel_plugin.bpf.maps import Dataplane

from .sockd import SockD

SOCKD = Path(__file__).parent / "sockd.py"


@dataclass
class Arena:
    lab: Lab
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _netns: list[str] = field(default_factory=list)
    _cgroups: list[Path] = field(default_factory=list)

    def netns(self, suffix: str) -> str:
        """A netns of our own with only lo (up): no link to the lab's bridge."""
        name = f"ezx-{self.lab.tag}-{suffix}"
        run("ip", "netns", "add", name)
        self._netns.append(name)
        self.lab.ip(name, "link", "set", "lo", "up")
        return name

    def blind_cgroup(self) -> Path:
        """A cgroup beside the lab's: sockets made there never reach our sockops."""
        path = paths.cgroup2_root() / f"ezblind-{self.lab.tag}"
        path.mkdir()
        self._cgroups.append(path)
        return path

    def sockd(self, where: Pod | str, cgroup: Path | None = None) -> SockD:
        proc = self.lab.spawn(
            where,
            [sys.executable, str(SOCKD)],
            cgroup=cgroup,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.procs.append(proc)
        return SockD(proc, where.name if isinstance(where, Pod) else where)

    def iptables(self, netns: str, *rule: str) -> None:
        self.lab.exec(netns, "iptables", "-w", "5", *rule)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        for name in reversed(self._netns):
            run("ip", "netns", "del", name, check=False)
        for path in self._cgroups:
            rmdir_cgroup(path)


def paired_peer(dp: Dataplane, cookie: int) -> int | None:
    """The peer cookie of a PAIRED socket, None when it is not paired."""
    info = dp.sockinfo.sockets().get(cookie)
    if info is None or info.state != layout.SockState.PAIRED:
        return None
    return int(info.peer_cookie)


def pairs_of(dp: Dataplane, cookie: int) -> set[int]:
    """Every socket the pairing table ties `cookie` to: flows and PAIRED entries."""
    out = {f.passive_cookie for f in dp.sockinfo.flows() if f.active_cookie == cookie}
    out |= {f.active_cookie for f in dp.sockinfo.flows() if f.passive_cookie == cookie}
    peer = paired_peer(dp, cookie)
    if peer is not None:
        out.add(peer)
    for other, info in dp.sockinfo.sockets().items():
        if info.state == layout.SockState.PAIRED and info.peer_cookie == cookie:
            out.add(other)
    return out
