"""The few bpf(2) commands pylibbpf does not expose, over ctypes.

Program fds of a loaded object, BPF links (cgroup sock_ops, sk_msg on a
SOCKHASH), pinning and opening pins, object info, and map access by fd
(including per-CPU values, which pylibbpf reads with a wrong buffer size).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
from dataclasses import dataclass
from functools import cache
from pathlib import Path

# enum bpf_cmd
MAP_LOOKUP_ELEM = 1
MAP_UPDATE_ELEM = 2
MAP_DELETE_ELEM = 3
MAP_GET_NEXT_KEY = 4
OBJ_PIN = 6
OBJ_GET = 7
OBJ_GET_INFO_BY_FD = 15
LINK_CREATE = 28
LINK_DETACH = 34

# enum bpf_attach_type
CGROUP_SOCK_OPS = 3
SK_SKB_STREAM_VERDICT = 5
SK_MSG_VERDICT = 7

# map update flags
ANY = 0
NOEXIST = 1

# enum bpf_map_type values we need to recognise
MAP_TYPE_PERCPU_ARRAY = 6

_SYS_BPF = 321  # x86_64
_ATTR_SIZE = 128


class BpfError(OSError):
    """A bpf(2) call failed; carries errno and what we tried to do."""


@cache
def libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _bpf(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str) -> int:
    ret: int = libc().syscall(_SYS_BPF, cmd, attr, _ATTR_SIZE)
    if ret < 0:
        err = ctypes.get_errno()
        raise BpfError(err, f"{what}: {os.strerror(err)}")
    return ret


def _attr(*fields: tuple[int, str, int]) -> ctypes.Array[ctypes.c_char]:
    """Build a zeroed union bpf_attr and pack (offset, struct-format, value) fields."""
    buf = ctypes.create_string_buffer(_ATTR_SIZE)
    for offset, fmt, value in fields:
        struct.pack_into(fmt, buf, offset, value)
    return buf


def _addr(buf: ctypes.Array[ctypes.c_char] | ctypes.c_char_p) -> int:
    return ctypes.cast(buf, ctypes.c_void_p).value or 0


# ---- pins ----------------------------------------------------------------


def obj_pin(fd: int, path: Path) -> None:
    p = ctypes.create_string_buffer(os.fsencode(path))
    _bpf(OBJ_PIN, _attr((0, "=Q", _addr(p)), (8, "=I", fd)), f"pin {path}")


def obj_get(path: Path) -> int:
    p = ctypes.create_string_buffer(os.fsencode(path))
    return _bpf(OBJ_GET, _attr((0, "=Q", _addr(p))), f"open pin {path}")


# ---- object info ------------------------------------------------------------


@dataclass(frozen=True)
class ProgInfo:
    type: int
    id: int
    tag: str
    name: str


@dataclass(frozen=True)
class MapInfo:
    type: int
    id: int
    key_size: int
    value_size: int
    max_entries: int
    name: str


@dataclass(frozen=True)
class LinkInfo:
    type: int
    id: int
    prog_id: int
    target_id: int  # cgroup id for cgroup links, map id for sockmap links
    attach_type: int


def _info(fd: int, size: int) -> bytes:
    buf = ctypes.create_string_buffer(size)
    _bpf(
        OBJ_GET_INFO_BY_FD,
        _attr((0, "=I", fd), (4, "=I", size), (8, "=Q", _addr(buf))),
        f"info of fd {fd}",
    )
    return buf.raw


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode(errors="replace")


def prog_info(fd: int) -> ProgInfo:
    raw = _info(fd, 232)
    ptype, pid = struct.unpack_from("=II", raw, 0)
    return ProgInfo(ptype, pid, raw[8:16].hex(), _cstr(raw[64:80]))


def map_info(fd: int) -> MapInfo:
    raw = _info(fd, 96)
    mtype, mid, ksz, vsz, maxe = struct.unpack_from("=IIIII", raw, 0)
    return MapInfo(mtype, mid, ksz, vsz, maxe, _cstr(raw[24:40]))


# enum bpf_link_type
LINK_TYPE_CGROUP = 3
LINK_TYPE_SOCKMAP = 14


def link_info(fd: int) -> LinkInfo:
    raw = _info(fd, 64)
    ltype, lid, prog_id = struct.unpack_from("=III", raw, 0)
    if ltype == LINK_TYPE_CGROUP:
        target, attach = struct.unpack_from("=QI", raw, 16)
    else:
        target, attach = struct.unpack_from("=II", raw, 16)
    return LinkInfo(ltype, lid, prog_id, target, attach)


def fd_kind(fd: int) -> str:
    """'bpf-prog', 'bpf-map', 'bpf_link', ... from the fd's anon inode name."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""
    return target.removeprefix("anon_inode:")


def own_prog_fds() -> dict[str, int]:
    """Name -> fd of every BPF program this process holds open (pylibbpf hides them)."""
    found: dict[str, int] = {}
    for entry in os.listdir("/proc/self/fd"):
        fd = int(entry)
        if fd_kind(fd) == "bpf-prog":
            found[prog_info(fd).name] = fd
    return found


# ---- links -------------------------------------------------------------------


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    return _bpf(
        LINK_CREATE,
        _attr((0, "=I", prog_fd), (4, "=I", target_fd), (8, "=I", attach_type)),
        f"create link (attach type {attach_type})",
    )


def link_detach(link_fd: int) -> None:
    _bpf(LINK_DETACH, _attr((0, "=I", link_fd)), "detach link")


# ---- map access by fd -----------------------------------------------------------


@cache
def possible_cpus() -> int:
    """Count of possible CPUs: per-CPU map values come back one slot per CPU."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    count = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        count += int(hi or lo) - int(lo) + 1
    return count


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    try:
        _bpf(
            MAP_LOOKUP_ELEM,
            _attr((0, "=I", fd), (8, "=Q", _addr(k)), (16, "=Q", _addr(v))),
            "map lookup",
        )
    except BpfError as e:
        if e.errno == errno.ENOENT:
            return None
        raise
    return v.raw


def map_update(fd: int, key: bytes, value: bytes, flags: int = ANY) -> None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    _bpf(
        MAP_UPDATE_ELEM,
        _attr((0, "=I", fd), (8, "=Q", _addr(k)), (16, "=Q", _addr(v)), (24, "=Q", flags)),
        "map update",
    )


def map_delete(fd: int, key: bytes) -> bool:
    """Delete a key; False when it was not there."""
    k = ctypes.create_string_buffer(key, len(key))
    try:
        _bpf(MAP_DELETE_ELEM, _attr((0, "=I", fd), (8, "=Q", _addr(k))), "map delete")
    except BpfError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    return True


def map_keys(fd: int, key_size: int, limit: int = 1 << 20) -> list[bytes]:
    """Every key of a hash map (bounded: a map can't hold more than max_entries)."""
    keys: list[bytes] = []
    nxt = ctypes.create_string_buffer(key_size)
    cur: ctypes.Array[ctypes.c_char] | None = None
    while len(keys) < limit:
        try:
            _bpf(
                MAP_GET_NEXT_KEY,
                _attr(
                    (0, "=I", fd),
                    (8, "=Q", _addr(cur) if cur is not None else 0),
                    (16, "=Q", _addr(nxt)),
                ),
                "map next key",
            )
        except BpfError as e:
            if e.errno == errno.ENOENT:
                break
            raise
        keys.append(nxt.raw)
        cur = ctypes.create_string_buffer(nxt.raw, key_size)
    return keys


def percpu_lookup(fd: int, key: bytes, value_size: int) -> list[bytes]:
    """One value per possible CPU (each slot rounded up to 8 bytes)."""
    slot = (value_size + 7) & ~7
    raw = map_lookup(fd, key, slot * possible_cpus())
    if raw is None:
        return []
    return [raw[i * slot : i * slot + value_size] for i in range(possible_cpus())]
