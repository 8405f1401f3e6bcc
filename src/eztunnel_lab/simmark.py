"""Attach simmark.bpf.o (every new socket gets mark 0x539) to one cgroup through a BPF link.

The link is not pinned: it lives as long as the returned fd, so a crashed
simulator cannot leave it behind (and removing the cgroup releases it too).
"""

from __future__ import annotations

import contextlib
import os
from importlib import resources
from pathlib import Path

from eztunnel_plugin.bpf import syscalls

CGROUP_INET_SOCK_CREATE = 2  # enum bpf_attach_type BPF_CGROUP_INET_SOCK_CREATE
PROG_NAME = "ez_simmark"


def object_path() -> Path:
    path = Path(str(resources.files("eztunnel_lab") / "data" / "simmark.bpf.o"))
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `make build`")
    return path


def attach(cgroup: Path) -> int:
    """Load and attach to `cgroup`; returns the link fd (close or detach() to remove)."""
    import pylibbpf

    obj = pylibbpf.BpfObject(str(object_path()))
    obj.load()
    try:
        prog_fd = syscalls.own_prog_fds()[PROG_NAME]
        cg_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return syscalls.link_create(prog_fd, cg_fd, CGROUP_INET_SOCK_CREATE)
        finally:
            os.close(cg_fd)
    finally:
        del obj  # the link holds the program now


def detach(link_fd: int) -> None:
    with contextlib.suppress(OSError):
        syscalls.link_detach(link_fd)
    with contextlib.suppress(OSError):
        os.close(link_fd)
