"""Where the data plane lives: the bpffs pin directory, its generations, the cgroup, the object.

Everything is pinned under one bpffs directory: the current generation at its top, a
previous layout's generation in old-v<layout>-m<sockhash id>/ until its sockets close
(docs/dataplane.md, "Upgrades").
"""

from __future__ import annotations

import ctypes
import os
import struct
from importlib import resources
from pathlib import Path

from eztunnel_plugin.bpf import syscalls
from eztunnel_plugin.errors import DataplaneError

DEFAULT_BPFFS = Path("/sys/fs/bpf/eztunnel")
BPFFS_MAGIC = 0xCAFE4A11
# A previous layout's generation, kept for its live sockets: old-v<layout>-m<sockhash id>.
OLD_PREFIX = "old-"


def default_object() -> Path:
    """The BPF object shipped in the package."""
    path = Path(str(resources.files("eztunnel_plugin") / "data" / "eztunnel.bpf.o"))
    if not path.exists():
        raise DataplaneError(f"BPF object {path} is missing: run `make build`")
    return path


def cgroup2_root(mountinfo: str | None = None) -> Path:
    """The cgroup v2 mount point (not always /sys/fs/cgroup: hybrid hosts differ)."""
    text = mountinfo if mountinfo is not None else Path("/proc/self/mountinfo").read_text()
    for line in text.splitlines():
        _, _, rest = line.partition(" - ")
        if rest.split(" ", 1)[0] == "cgroup2":
            return Path(line.split()[4])
    raise DataplaneError("no cgroup2 filesystem is mounted (see /proc/self/mountinfo)")


def check_cgroup_dir(cgroup: Path) -> None:
    if not cgroup.is_dir():
        raise DataplaneError(f"cgroup directory {cgroup} does not exist")


def is_bpffs(path: Path) -> bool:
    buf = ctypes.create_string_buffer(120)
    if syscalls.libc().statfs(os.fsencode(path), buf) != 0:
        return False
    return bool(struct.unpack_from("=q", buf, 0)[0] == BPFFS_MAGIC)


def check_bpffs_dir(bpffs: Path) -> None:
    """The pin directory, existing or not, is usable: on bpffs, its name without a dot."""
    # First: bpffs refuses even to look up a name with a dot (EPERM).
    if "." in bpffs.name:
        raise DataplaneError(f"bpffs directory name {bpffs.name!r} must not contain a dot")
    # An existing directory must itself be on bpffs: a container that mounts only its own
    # pin directory sees no bpffs above it. A missing one is created in its parent.
    where = bpffs if bpffs.is_dir() else bpffs.parent
    if not where.is_dir() or not is_bpffs(where):
        raise DataplaneError(
            f"{where} is not a bpf filesystem; mount one with `mount -t bpf bpf {where}`"
        )


def old_generations(bpffs: Path) -> list[Path]:
    """Previous layouts' generations kept for their live sockets, oldest map id first."""
    if not bpffs.is_dir():
        return []
    found = [e for e in os.scandir(bpffs) if e.name.startswith(OLD_PREFIX) and e.is_dir()]
    return sorted((Path(e.path) for e in found), key=lambda p: p.name)
