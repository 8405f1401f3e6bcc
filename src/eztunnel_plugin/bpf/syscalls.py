"""The few bpf(2) commands pylibbpf does not expose, over ctypes.

Program fds of a loaded object, BPF links (cgroup sock_ops, sk_msg on a
SOCKHASH) and their in-place update, pinning and opening pins, object info,
and map access by fd (including per-CPU values, which pylibbpf reads with a
wrong buffer size; anonymous maps for tests). `load_object` loads an object
file through libbpf's C API (the copy bundled in pylibbpf's extension), with maps
reused from pins, which pylibbpf's Python API cannot do.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import importlib.util
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from eztunnel_plugin.errors import BpfError, LoadError

# enum bpf_cmd
MAP_CREATE = 0
MAP_LOOKUP_ELEM = 1
MAP_UPDATE_ELEM = 2
MAP_DELETE_ELEM = 3
MAP_GET_NEXT_KEY = 4
OBJ_PIN = 6
OBJ_GET = 7
OBJ_GET_INFO_BY_FD = 15
MAP_LOOKUP_BATCH = 24
PROG_GET_FD_BY_ID = 13
LINK_CREATE = 28
LINK_UPDATE = 29
LINK_DETACH = 34

# enum bpf_attach_type
CGROUP_SOCK_OPS = 3
SK_SKB_STREAM_VERDICT = 5
SK_MSG_VERDICT = 7

# map update flags
ANY = 0
NOEXIST = 1

# BPF_LINK_UPDATE flag: fail unless the link still runs old_prog_fd
F_REPLACE = 1 << 2

# enum bpf_map_type values we need to recognise
MAP_TYPE_HASH = 1
MAP_TYPE_ARRAY = 2
MAP_TYPE_PERCPU_ARRAY = 6

_SYS_BPF = 321  # x86_64
_ATTR_SIZE = 128


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


def _addr_of(obj: ctypes.Array[ctypes.c_uint32]) -> int:
    return ctypes.addressof(obj)


# ---- pins ----------------------------------------------------------------


def obj_pin(fd: int, path: Path) -> None:
    p = ctypes.create_string_buffer(os.fsencode(path))
    _bpf(OBJ_PIN, _attr((0, "=Q", _addr(p)), (8, "=I", fd)), f"pin {path}")


def obj_get(path: Path) -> int:
    p = ctypes.create_string_buffer(os.fsencode(path))
    return _bpf(OBJ_GET, _attr((0, "=Q", _addr(p))), f"open pin {path}")


@contextlib.contextmanager
def pin_fd(path: Path) -> Iterator[int]:
    """An fd of the object pinned at `path`, closed on exit."""
    fd = obj_get(path)
    try:
        yield fd
    finally:
        os.close(fd)


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
    map_flags: int = 0


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


def prog_map_ids(fd: int) -> list[int]:
    """Ids of the maps a program uses (its own .rodata included)."""
    room = 64
    ids = (ctypes.c_uint32 * room)()
    buf = ctypes.create_string_buffer(232)
    struct.pack_into("=IQ", buf, 52, room, _addr_of(ids))
    _bpf(
        OBJ_GET_INFO_BY_FD,
        _attr((0, "=I", fd), (4, "=I", len(buf)), (8, "=Q", _addr(buf))),
        f"map ids of program fd {fd}",
    )
    count = struct.unpack_from("=I", buf.raw, 52)[0]
    return list(ids[: min(count, room)])


def prog_get_fd_by_id(prog_id: int) -> int:
    """Open a program by id (needs CAP_SYS_ADMIN: tests and tools only, not the agent)."""
    return _bpf(PROG_GET_FD_BY_ID, _attr((0, "=I", prog_id)), f"open program id {prog_id}")


def map_info(fd: int) -> MapInfo:
    raw = _info(fd, 96)
    mtype, mid, ksz, vsz, maxe, flags = struct.unpack_from("=IIIIII", raw, 0)
    return MapInfo(mtype, mid, ksz, vsz, maxe, _cstr(raw[24:40]), flags)


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


def link_update(link_fd: int, new_prog_fd: int, old_prog_fd: int | None) -> None:
    """Swap the link's program in one step; with old_prog_fd, only if it still runs that one
    (EPERM otherwise), so a concurrent change is never overwritten."""
    flags = 0 if old_prog_fd is None else F_REPLACE
    _bpf(
        LINK_UPDATE,
        _attr(
            (0, "=I", link_fd),
            (4, "=I", new_prog_fd),
            (8, "=I", flags),
            (12, "=I", old_prog_fd or 0),
        ),
        "update link",
    )


# ---- map access by fd -----------------------------------------------------------


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int) -> int:
    """A new anonymous map (no pin, no program): gone when its last fd closes."""
    attr = _attr(
        (0, "=I", map_type), (4, "=I", key_size), (8, "=I", value_size), (12, "=I", max_entries)
    )
    return _bpf(MAP_CREATE, attr, f"create map (type {map_type})")


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


def map_lookup_batch(
    fd: int, key_size: int, value_size: int, bucket: int, count: int
) -> tuple[list[tuple[bytes, bytes]], int | None]:
    """Up to `count` entries of a hash map from hash bucket `bucket` on, whole buckets only.

    Returns the entries and the bucket to resume from (None at the end). The cursor is
    a bucket index, so it stays valid whatever is added or deleted meanwhile: an entry
    present throughout is returned exactly once over a walk. Raises BpfError ENOSPC
    when the first non-empty bucket holds more than `count` entries.
    """
    keys = ctypes.create_string_buffer(key_size * count)
    values = ctypes.create_string_buffer(value_size * count)
    cursor_in = ctypes.create_string_buffer(struct.pack("=I", bucket), 4)
    cursor_out = ctypes.create_string_buffer(4)
    attr = _attr(
        (0, "=Q", _addr(cursor_in)),
        (8, "=Q", _addr(cursor_out)),
        (16, "=Q", _addr(keys)),
        (24, "=Q", _addr(values)),
        (32, "=I", count),
        (36, "=I", fd),
    )
    end = False
    try:
        _bpf(MAP_LOOKUP_BATCH, attr, "map lookup batch")
    except BpfError as e:
        if e.errno != errno.ENOENT:
            raise
        end = True  # the last buckets: what they held is still returned
    n = struct.unpack_from("=I", attr, 32)[0]
    entries = [
        (
            keys.raw[i * key_size : (i + 1) * key_size],
            values.raw[i * value_size : (i + 1) * value_size],
        )
        for i in range(n)
    ]
    return entries, None if end else struct.unpack("=I", cursor_out.raw)[0]


def percpu_lookup(fd: int, key: bytes, value_size: int) -> list[bytes]:
    """One value per possible CPU (each slot rounded up to 8 bytes)."""
    slot = (value_size + 7) & ~7
    raw = map_lookup(fd, key, slot * possible_cpus())
    if raw is None:
        return []
    return [raw[i * slot : i * slot + value_size] for i in range(possible_cpus())]


# ---- loading an object through libbpf's C API ----------------------------------------


_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_LIBBPF_WARN = 0


@cache
def libbpf() -> ctypes.CDLL:
    """libbpf 1.x: the copy inside pylibbpf's extension (dlopen'ed as a plain library, so
    pylibbpf's Python package is never imported), else the system's libbpf.so.1."""
    candidates: list[str] = []
    spec = importlib.util.find_spec("pylibbpf")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        candidates += sorted(str(p) for p in Path(loc).glob("pylibbpf*.so"))
    candidates.append(ctypes.util.find_library("bpf") or "libbpf.so.1")
    for path in candidates:
        try:
            lib = ctypes.CDLL(path, use_errno=True)
        except OSError:
            continue
        if hasattr(lib, "bpf_map__reuse_fd") and hasattr(lib, "libbpf_set_print"):
            _declare(lib)
            return lib
    raise LoadError(f"no usable libbpf 1.x found (tried {', '.join(candidates)})")


def _declare(lib: ctypes.CDLL) -> None:
    vp, cp, i = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
    for name, res, args in (
        ("bpf_object__open_file", vp, [cp, vp]),
        ("bpf_object__load", i, [vp]),
        ("bpf_object__close", None, [vp]),
        ("bpf_object__next_map", vp, [vp, vp]),
        ("bpf_object__next_program", vp, [vp, vp]),
        ("bpf_map__name", cp, [vp]),
        ("bpf_map__fd", i, [vp]),
        ("bpf_map__reuse_fd", i, [vp, i]),
        ("bpf_map__type", i, [vp]),
        ("bpf_map__key_size", ctypes.c_uint32, [vp]),
        ("bpf_map__value_size", ctypes.c_uint32, [vp]),
        ("bpf_map__max_entries", ctypes.c_uint32, [vp]),
        ("bpf_map__map_flags", ctypes.c_uint32, [vp]),
        ("bpf_program__name", cp, [vp]),
        ("bpf_program__fd", i, [vp]),
        ("libbpf_set_print", vp, [vp]),
    ):
        fn = getattr(lib, name)
        fn.restype = res
        fn.argtypes = args


@dataclass
class LoadedObject:
    """Program and map fds of an object loaded by libbpf (valid until close())."""

    prog_fds: dict[str, int]
    map_fds: dict[str, int]
    reused: list[str]
    _handle: int | None = field(default=None, repr=False)

    def close(self) -> None:
        if self._handle is not None:
            libbpf().bpf_object__close(self._handle)
            self._handle = None
        self.prog_fds, self.map_fds = {}, {}


def load_object(path: Path, reuse: Mapping[str, int] | None = None) -> LoadedObject:
    """Open and load an object; each map named in `reuse` is not created but bound to that fd
    (libbpf refuses one whose type, sizes, max_entries or flags differ)."""
    lib = libbpf()
    messages: list[str] = []
    vsnprintf = libc().vsnprintf
    vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]

    def on_print(level: int, fmt: bytes, args: int) -> int:
        if level == _LIBBPF_WARN and len(messages) < 2000:
            out = ctypes.create_string_buffer(1024)
            vsnprintf(out, len(out), fmt, args)
            messages.append(out.value.decode(errors="replace").rstrip())
        return 0

    printer = _PRINT_FN(on_print)
    previous = lib.libbpf_set_print(ctypes.cast(printer, ctypes.c_void_p))
    handle = None
    try:
        handle = lib.bpf_object__open_file(os.fsencode(path), None)
        if not handle:
            raise LoadError(_explain(f"opening {path}", ctypes.get_errno(), messages))
        maps: dict[str, int] = {}
        pos = lib.bpf_object__next_map(handle, None)
        while pos:
            maps[lib.bpf_map__name(pos).decode()] = pos
            pos = lib.bpf_object__next_map(handle, pos)
        reused = []
        for name, fd in (reuse or {}).items():
            if name not in maps:
                raise LoadError(f"{path} has no map {name} to bind to its pin")
            # libbpf checks nothing for a reused fd: the programs would run on a map
            # of another shape (a layout changed without a new layout version).
            declared = _declared(lib, maps[name])
            pinned = map_info(fd)
            have = (pinned.type, pinned.key_size, pinned.value_size, pinned.max_entries)
            if (*have, pinned.map_flags) != declared:
                raise LoadError(
                    f"pinned map {name} (type, key, value, max entries, flags) "
                    f"{(*have, pinned.map_flags)} differs from the object's {declared}"
                )
            if (rc := lib.bpf_map__reuse_fd(maps[name], fd)) != 0:
                raise LoadError(_explain(f"reusing the pinned {name}", -rc, messages))
            reused.append(name)
        if (rc := lib.bpf_object__load(handle)) != 0:
            raise LoadError(_explain(f"loading {path}", -rc, messages))
        progs: dict[str, int] = {}
        pos = lib.bpf_object__next_program(handle, None)
        while pos:
            progs[lib.bpf_program__name(pos).decode()] = lib.bpf_program__fd(pos)
            pos = lib.bpf_object__next_program(handle, pos)
        loaded = LoadedObject(progs, {n: lib.bpf_map__fd(m) for n, m in maps.items()}, reused)
        loaded._handle, handle = handle, None
        return loaded
    finally:
        if handle:
            lib.bpf_object__close(handle)
        lib.libbpf_set_print(previous)


def _declared(lib: ctypes.CDLL, bpf_map: int) -> tuple[int, int, int, int, int]:
    return (
        lib.bpf_map__type(bpf_map),
        lib.bpf_map__key_size(bpf_map),
        lib.bpf_map__value_size(bpf_map),
        lib.bpf_map__max_entries(bpf_map),
        lib.bpf_map__map_flags(bpf_map),
    )


def _explain(what: str, err: int, messages: list[str]) -> str:
    """One line: what failed, errno, and libbpf's most telling message."""
    reason = os.strerror(err) if err > 0 else f"error {err}"
    telling = [m for m in messages if "fail" in m or "error" in m.lower() or "invalid" in m]
    hint = (telling or messages or [""])[-1 if not telling else 0]
    return f"{what}: {reason}" + (f" ({hint})" if hint else "")
