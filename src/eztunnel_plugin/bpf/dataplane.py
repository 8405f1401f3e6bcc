"""Load, pin, attach, reuse, upgrade and remove the splicing programs; read and write their maps.

Lifecycle (docs/dataplane.md): everything lives under one bpffs directory.
A fresh install loads the object through libbpf, pins every map, attaches the
sk_msg program to the SOCKHASH and the sockops program to a cgroup through BPF
links and pins the links and their programs, so they outlive this process.
A later start over complete pins keeps the maps and links: programs whose code
changed are swapped in place with BPF_LINK_UPDATE (same layout version), and a
new layout version gets a new generation of maps beside the old one, which stays
pinned for its live sockets (docs/dataplane.md, "Upgrades"). Uninstall turns
pairing off, detaches the links and unpins every generation; sockets that are
still paired keep the program and maps alive through the kernel's own references
until they close, so no queued byte is dropped (deleting a socket from the
SOCKHASH would drop its queue).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import json
import os
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from eztunnel_plugin import log
from eztunnel_plugin.bpf import layout, syscalls

DEFAULT_BPFFS = Path("/sys/fs/bpf/eztunnel")
BPFFS_MAGIC = 0xCAFE4A11

LINK_SOCKOPS = "link_sockops"
LINK_MSG = "link_msg"
LINK_SKB = "link_skb"
# The program behind each link, and the pin that keeps it reachable: opening the
# attached program by id would need CAP_SYS_ADMIN, which the agent does not have.
PROGRAMS = {LINK_SOCKOPS: "ez_sockops", LINK_MSG: "ez_msg", LINK_SKB: "ez_skb_verdict"}
PROG_PINS = {LINK_SOCKOPS: "prog_sockops", LINK_MSG: "prog_msg", LINK_SKB: "prog_skb"}
# A previous layout's generation, kept for its live sockets: old-v<layout>-m<sockhash id>.
OLD_PREFIX = "old-"
_PARKING = "parking"  # transient: a generation being moved aside
_PENDING = "pending"  # transient: a program pin about to replace another
_LOCK_WAIT = 30.0
_CHILD_TIMEOUT = 120.0

_log = log.get(__name__)


class DataplaneError(Exception):
    """A clear, user-facing failure of the data plane (bad setup, layout mismatch)."""


def default_object() -> Path:
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


def _is_bpffs(path: Path) -> bool:
    buf = ctypes.create_string_buffer(120)
    libc = syscalls.libc()
    if libc.statfs(os.fsencode(path), buf) != 0:
        return False
    return bool(struct.unpack_from("=q", buf, 0)[0] == BPFFS_MAGIC)


def _check_bpffs_dir(bpffs: Path) -> None:
    # An existing directory must itself be on bpffs: a container that mounts only its own
    # pin directory sees no bpffs above it. A missing one is created in its parent.
    where = bpffs if bpffs.is_dir() else bpffs.parent
    if not where.is_dir() or not _is_bpffs(where):
        raise DataplaneError(
            f"{where} is not a bpf filesystem; mount one with `mount -t bpf bpf {where}`"
        )
    if "." in bpffs.name:
        raise DataplaneError(f"bpffs directory name {bpffs.name!r} must not contain a dot")


@dataclass(frozen=True)
class Flow:
    """One spliced socket pair, as the pairing table holds it."""

    active_cookie: int
    passive_cookie: int
    rule: layout.Rule
    local: str  # active socket's local endpoint ip:port
    remote: str  # active socket's remote endpoint ip:port
    active_netns: int
    passive_netns: int
    bytes_active_to_passive: int
    bytes_passive_to_active: int
    state_active: layout.SockState
    state_passive: layout.SockState


def _endpoint(addr: layout.Addr, port: int) -> str:
    ip = addr.ip()
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


class EndpointMap:
    """The pinned endpoint map, keyed by IP (text in, text out)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def read_all(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for key in syscalls.map_keys(self._fd, ctypes.sizeof(layout.Addr)):
            raw = syscalls.map_lookup(self._fd, key, ctypes.sizeof(layout.Endpoint))
            if raw is not None:
                ip = layout.Addr.from_buffer_copy(key).ip()
                out[str(ip)] = layout.Endpoint.from_buffer_copy(raw).flags
        return out

    def put(self, ip: str, flags: int) -> None:
        try:
            syscalls.map_update(self._fd, bytes(layout.Addr.of(ip)), bytes(layout.Endpoint(flags)))
        except syscalls.BpfError as e:
            if e.errno == errno.E2BIG:
                raise DataplaneError(
                    f"endpoint map is full ({layout.MAX_ENDPOINTS} entries); {ip} not added"
                ) from e
            raise

    def delete(self, ip: str) -> None:
        syscalls.map_delete(self._fd, bytes(layout.Addr.of(ip)))


@dataclass
class Prepared:
    """What install_or_reuse did to the pins (the isolated loader reports it as JSON)."""

    action: str  # installed | reused | updated | migrated
    updated: list[dict[str, str | int]] = field(default_factory=list)  # per link swapped
    from_layout: int = 0  # migrated: the previous generation's layout version
    parked: str = ""  # migrated: where the previous generation now lives
    retired: list[str] = field(default_factory=list)  # drained generations unpinned
    removed: list[str] = field(default_factory=list)  # pins of an incomplete install


@dataclass
class Dataplane:
    """Open handles on the pinned data plane under one bpffs directory."""

    bpffs: Path
    maps: dict[str, int]
    links: dict[str, int] = field(default_factory=dict)
    reused: bool = False
    action: str = ""  # what install_or_reuse did (see Prepared.action)

    # ---- lifecycle -----------------------------------------------------

    @classmethod
    def install_or_reuse(
        cls,
        bpffs: Path = DEFAULT_BPFFS,
        cgroup: Path | None = None,
        obj: Path | None = None,
        capture_ports: tuple[int, ...] = layout.DEFAULT_CAPTURE_PORTS,
        skb_verdict: bool = False,
        isolated: bool = False,
    ) -> Dataplane:
        """Reuse complete pins under `bpffs` (swapping in changed programs, migrating an
        older layout), or load, pin and attach from scratch.

        isolated: load in a short-lived child process, so that libbpf and the object's
        loading never take memory in a long-running agent.
        """
        cgroup = cgroup or cgroup2_root()
        _check_bpffs_dir(bpffs)
        if not cgroup.is_dir():
            raise DataplaneError(f"cgroup directory {cgroup} does not exist")
        if isolated:
            done = _prepare_in_child(bpffs, cgroup, obj, capture_ports, skb_verdict)
        else:
            done = _prepare(bpffs, cgroup, obj or default_object(), capture_ports, skb_verdict)
        dp = cls._reuse(bpffs, cgroup, _expected_links(skb_verdict))
        dp.action = done.action
        dp.reused = done.action != "installed"
        _log_prepared(done, bpffs, cgroup)
        return dp

    @classmethod
    def open(cls, bpffs: Path = DEFAULT_BPFFS) -> Dataplane:
        """Open existing pins read-write without touching attachments."""
        if not (bpffs / "ez_config").exists():
            raise DataplaneError(f"no eztunnel data plane is pinned under {bpffs}")
        maps = {name: syscalls.obj_get(bpffs / name) for name in layout.MAPS}
        dp = cls(bpffs, maps, reused=True)
        try:
            dp._check_layout()
        except BaseException:
            dp.close()
            raise
        return dp

    @classmethod
    def _reuse(cls, bpffs: Path, cgroup: Path, expected: set[str]) -> Dataplane:
        dp = cls.open(bpffs)
        try:
            dp.links = {name: syscalls.obj_get(bpffs / name) for name in expected}
            _check_cgroup(bpffs, cgroup)
        except BaseException:
            dp.close()
            raise
        return dp

    @classmethod
    def _install(
        cls,
        bpffs: Path,
        cgroup: Path,
        obj: Path,
        capture_ports: tuple[int, ...],
        skb_verdict: bool,
        enabled: bool = True,
        endpoints: list[tuple[bytes, bytes]] | None = None,
    ) -> Dataplane:
        """A fresh generation at the top of `bpffs`; an existing sockops link is switched."""
        bpffs.mkdir(mode=0o700, exist_ok=True)
        loaded = _load(obj, {})
        try:
            dp, _ = cls._attach_new(
                bpffs, cgroup, loaded, capture_ports, skb_verdict, enabled, endpoints
            )
        finally:
            loaded.close()  # the pins and links hold what they need now
        return dp

    @classmethod
    def _attach_new(
        cls,
        bpffs: Path,
        cgroup: Path,
        loaded: syscalls.LoadedObject,
        capture_ports: tuple[int, ...],
        skb_verdict: bool,
        enabled: bool = True,
        endpoints: list[tuple[bytes, bytes]] | None = None,
    ) -> tuple[Dataplane, dict[str, str | int] | None]:
        """Pin a loaded object's maps at the top of `bpffs`, configure them, attach its map
        programs, then its sockops program: a new link, or the pinned one switched in one
        step (a migration or a salvaged install). On failure, unpin only what it pinned."""
        progs = loaded.prog_fds
        maps = {name: os.dup(loaded.map_fds[name]) for name in layout.MAPS}
        dp = cls(bpffs, maps)
        pinned: list[str] = []
        switched = None
        try:
            for name, fd in maps.items():
                syscalls.obj_pin(fd, bpffs / name)
                pinned.append(name)
            cfg = layout.Config(int(enabled), layout.LAYOUT_VERSION, layout.DEFAULT_BACKLOG_LIMIT)
            dp._write_config(cfg)
            dp.set_capture_ports(capture_ports)
            for key, value in endpoints or []:
                syscalls.map_update(maps["ez_endpoints"], key, value)
            # sk_msg (and the optional verdict) first: a socket takes the map's
            # programs when it is added, and sockops adds sockets.
            pinned += [LINK_MSG, PROG_PINS[LINK_MSG]]
            dp._attach(LINK_MSG, progs["ez_msg"], maps["ez_socks"], syscalls.SK_MSG_VERDICT)
            if skb_verdict:
                verdict = syscalls.SK_SKB_STREAM_VERDICT
                pinned += [LINK_SKB, PROG_PINS[LINK_SKB]]
                dp._attach(LINK_SKB, progs["ez_skb_verdict"], maps["ez_socks"], verdict)
            if (bpffs / LINK_SOCKOPS).exists():
                uses = {syscalls.map_info(fd).id for fd in maps.values()}
                switched = _switch(bpffs, LINK_SOCKOPS, progs["ez_sockops"], uses)
                dp.links[LINK_SOCKOPS] = syscalls.obj_get(bpffs / LINK_SOCKOPS)
            else:
                cg_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    pinned += [LINK_SOCKOPS, PROG_PINS[LINK_SOCKOPS]]
                    sockops = syscalls.CGROUP_SOCK_OPS
                    dp._attach(LINK_SOCKOPS, progs["ez_sockops"], cg_fd, sockops)
                finally:
                    os.close(cg_fd)
        except BaseException:
            dp.close()
            _remove_pins(bpffs, set(pinned) & _pins(bpffs), kill_switch=False)
            raise
        return dp, switched

    def _attach(self, name: str, prog_fd: int, target_fd: int, attach_type: int) -> None:
        fd = syscalls.link_create(prog_fd, target_fd, attach_type)
        self.links[name] = fd
        syscalls.obj_pin(fd, self.bpffs / name)
        syscalls.obj_pin(prog_fd, self.bpffs / PROG_PINS[name])

    def _check_layout(self) -> None:
        problem = _sizes_problem(self.maps)
        if problem:
            raise DataplaneError(
                f"pinned map {self.bpffs}/{problem}; "
                f"run `eztunnel-plugin uninstall --bpffs {self.bpffs}` first"
            )
        version = self.config().layout_version
        if version != layout.LAYOUT_VERSION:
            raise DataplaneError(
                f"pinned data plane under {self.bpffs} has layout version {version}, "
                f"this build needs {layout.LAYOUT_VERSION}: start this build's agent, which "
                f"migrates it, or run `eztunnel-plugin uninstall --bpffs {self.bpffs}`"
            )

    def close(self) -> None:
        for fd in [*self.maps.values(), *self.links.values()]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.maps = {}
        self.links = {}

    def __enter__(self) -> Dataplane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- configuration -----------------------------------------------------

    def config(self) -> layout.Config:
        raw = syscalls.map_lookup(self.maps["ez_config"], bytes(4), ctypes.sizeof(layout.Config))
        assert raw is not None  # array maps always hold index 0
        return layout.Config.from_buffer_copy(raw)

    def _write_config(self, cfg: layout.Config) -> None:
        syscalls.map_update(self.maps["ez_config"], bytes(4), bytes(cfg))

    def set_enabled(self, enabled: bool) -> None:
        """The kill switch: off passes every byte through TCP and pairs nothing new."""
        cfg = self.config()
        cfg.enabled = int(enabled)
        self._write_config(cfg)
        # Sockets spliced by a previous layout's generation run its programs, which read
        # its own config: the switch must reach them too.
        for old in old_generations(self.bpffs):
            with contextlib.suppress(FileNotFoundError):
                _write_enabled(old / "ez_config", enabled)

    def retire_drained(self, wait: float = _LOCK_WAIT) -> list[str]:
        """Unpin previous generations that no socket uses any more (see retire_drained)."""
        return retire_drained(self.bpffs, wait)

    def set_backlog_limit(self, limit: int) -> None:
        """Unread redirected bytes a peer may hold before the sender falls back to TCP."""
        if not 0 < limit < 1 << 32:
            raise DataplaneError(f"backlog limit {limit} out of range")
        cfg = self.config()
        cfg.backlog_limit = limit
        self._write_config(cfg)

    @property
    def enabled(self) -> bool:
        return bool(self.config().enabled)

    def capture_ports(self) -> list[int]:
        keys = syscalls.map_keys(self.maps["ez_ports"], 4)
        return sorted(struct.unpack("=I", k)[0] for k in keys)

    def set_capture_ports(self, ports: tuple[int, ...]) -> None:
        bad = [p for p in ports if not 0 < p < 65536]
        if bad or len(ports) > layout.MAX_CAPTURE_PORTS:
            raise DataplaneError(f"invalid capture ports {list(ports)}")
        fd = self.maps["ez_ports"]
        for old in set(self.capture_ports()) - set(ports):
            syscalls.map_delete(fd, struct.pack("=I", old))
        for port in ports:
            syscalls.map_update(fd, struct.pack("=I", port), struct.pack("=I", 1))

    @property
    def endpoints(self) -> EndpointMap:
        return EndpointMap(self.maps["ez_endpoints"])

    # ---- observation -----------------------------------------------------

    def counters(self) -> dict[str, int]:
        """Every counter summed over CPUs, by lower-case name."""
        fd = self.maps["ez_counters"]
        out: dict[str, int] = {}
        for c in layout.Counter:
            slots = syscalls.percpu_lookup(fd, struct.pack("=I", c.value), 8)
            out[c.name.lower()] = sum(struct.unpack("=Q", s)[0] for s in slots)
        return out

    def sockets(self) -> dict[int, layout.SockInfo]:
        fd = self.maps["ez_sockinfo"]
        size = ctypes.sizeof(layout.SockInfo)
        out: dict[int, layout.SockInfo] = {}
        for key in syscalls.map_keys(fd, 8, limit=layout.MAX_SOCKETS):
            raw = syscalls.map_lookup(fd, key, size)
            if raw is not None:
                out[struct.unpack("=Q", key)[0]] = layout.SockInfo.from_buffer_copy(raw)
        return out

    def flows(self) -> list[Flow]:
        """Socket pairs the programs spliced (paired once; either side may now be tainted)."""
        socks = self.sockets()
        return list(_pairs(socks))

    def attachments(self) -> dict[str, syscalls.LinkInfo]:
        return {name: syscalls.link_info(fd) for name, fd in self.links.items()}


def _pairs(socks: dict[int, layout.SockInfo]) -> Iterator[Flow]:
    for cookie, info in socks.items():
        if not info.active or info.rule == layout.Rule.NONE:
            continue
        peer = socks.get(info.peer_cookie)
        if peer is None or peer.peer_cookie != cookie:
            continue
        yield Flow(
            active_cookie=cookie,
            passive_cookie=info.peer_cookie,
            rule=layout.Rule(info.rule),
            local=_endpoint(info.local, info.local_port),
            remote=_endpoint(info.remote, info.remote_port),
            active_netns=info.netns,
            passive_netns=peer.netns,
            bytes_active_to_passive=info.bytes_out,
            bytes_passive_to_active=peer.bytes_out,
            state_active=layout.SockState(info.state),
            state_passive=layout.SockState(peer.state),
        )


@dataclass
class UninstallReport:
    bpffs: Path
    detached: list[str]
    unpinned: list[str]
    # Still alive: they keep the programs until they close (the current generation's
    # paired sockets, plus every socket still in a previous generation's sockhash).
    paired_sockets: int


def uninstall(bpffs: Path = DEFAULT_BPFFS) -> UninstallReport:
    """Turn pairing off, detach, unpin every generation; never deletes a socket from a
    SOCKHASH."""
    report = UninstallReport(bpffs, [], [], 0)
    if not bpffs.is_dir():
        return report
    _check_bpffs_dir(bpffs)
    with _locked(bpffs):
        _discard_transient(bpffs)
        gens = [bpffs, *old_generations(bpffs)]
        # 1. Kill switch first, in every generation: paired sockets fall back to TCP on
        #    their next send, and what they already queued stays deliverable (their
        #    psock lives on).
        for gen in gens:
            if (gen / "ez_config").exists():
                with contextlib.suppress(DataplaneError, OSError):
                    _write_enabled(gen / "ez_config", False)
            report.paired_sockets += _live_sockets(gen, current=gen == bpffs)
        # 2. Detach links: sockops first (no new sockets), then the map programs.
        for name in (LINK_SOCKOPS, LINK_SKB, LINK_MSG):
            for gen in gens:
                if (gen / name).exists():
                    _detach(gen / name)
                    report.detached.append(name if gen == bpffs else f"{gen.name}/{name}")
        # 3. Unpin our maps, links and programs; anything else is not ours to remove.
        for gen in reversed(gens):
            prefix = "" if gen == bpffs else f"{gen.name}/"
            for name in sorted(_pins(gen)):
                (gen / name).unlink()
                report.unpinned.append(prefix + name)
            if gen != bpffs:
                _rmdir_ours(gen)
        _rmdir_ours(bpffs)
    _log.info(
        "dataplane uninstalled",
        bpffs=str(bpffs),
        detached=report.detached,
        live_paired_sockets=report.paired_sockets,
    )
    return report


def _rmdir_ours(directory: Path) -> None:
    try:
        directory.rmdir()
    except OSError as e:
        left = sorted(os.listdir(directory))
        # EBUSY on an empty directory: it is a mount point (the chart's), clean but kept.
        if left or e.errno != errno.EBUSY:
            raise DataplaneError(
                f"{directory} still holds objects that are not ours: {left}"
            ) from e


def retire_drained(bpffs: Path = DEFAULT_BPFFS, wait: float = _LOCK_WAIT) -> list[str]:
    """Unpin every previous generation whose sockhash is empty: no socket runs its
    programs or reads its maps any more. Returns the generations retired. Cheap when
    there is none (a periodic caller passes wait=0 and retries later when busy)."""
    if not old_generations(bpffs):
        return []
    with _locked(bpffs, wait):
        retired = _retire_drained(bpffs)
    for name in retired:
        _log.info("old generation retired", bpffs=str(bpffs), generation=name)
    return retired


# ---- generations -------------------------------------------------------------------------
#
# The current generation's pins are at the top of the bpffs directory (its maps, link_msg,
# link_skb, their prog_* pins), beside the one cgroup link, link_sockops. A layout
# migration moves the previous generation into old-v<layout>-m<sockhash id>/ (hard links,
# then one directory rename, then the old names go), pins the new one at the top and
# switches link_sockops to the new program with one BPF_LINK_UPDATE. Each step leaves a
# state the next start recognises and completes (tests/test_upgrade.py breaks each one).


def _ours(name: str) -> bool:
    return name.startswith(("ez_", "link_", "prog_"))


def _pins(directory: Path) -> set[str]:
    """Our pins directly in `directory` (sub-directories are other generations)."""
    if not directory.is_dir():
        return set()
    return {e.name for e in os.scandir(directory) if _ours(e.name) and not e.is_dir()}


def old_generations(bpffs: Path) -> list[Path]:
    """Previous layouts' generations kept for their live sockets, oldest map id first."""
    if not bpffs.is_dir():
        return []
    found = [e for e in os.scandir(bpffs) if e.name.startswith(OLD_PREFIX) and e.is_dir()]
    return sorted((Path(e.path) for e in found), key=lambda p: p.name)


def _expected_links(skb_verdict: bool) -> set[str]:
    return {LINK_SOCKOPS, LINK_MSG} | ({LINK_SKB} if skb_verdict else set())


@contextlib.contextmanager
def _locked(bpffs: Path, wait: float = _LOCK_WAIT) -> Iterator[None]:
    """One installer, upgrader or uninstaller at a time per bpffs directory."""
    fd = os.open(bpffs, os.O_RDONLY | os.O_DIRECTORY)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise DataplaneError(
                        f"another eztunnel-plugin process has held {bpffs} for {wait:.0f} s "
                        "(install, upgrade or uninstall); try again once it is done"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def _pin_fd(path: Path) -> Iterator[int]:
    fd = syscalls.obj_get(path)
    try:
        yield fd
    finally:
        os.close(fd)


def _is_missing(e: syscalls.BpfError) -> bool:
    return e.errno == errno.ENOENT


def _config_head(path: Path) -> tuple[int, int, bytes]:
    """(enabled, layout_version, raw value) of any generation's ez_config: every layout's
    config starts with these two u32 fields."""
    with _pin_fd(path) as fd:
        info = syscalls.map_info(fd)
        raw = None
        if info.key_size == 4 and info.value_size >= 8:
            raw = syscalls.map_lookup(fd, bytes(4), info.value_size)
    if raw is None:
        raise DataplaneError(f"{path} is not an eztunnel config map")
    enabled, version = struct.unpack_from("=II", raw)
    return enabled, version, raw


def _write_enabled(path: Path, enabled: bool) -> None:
    try:
        _, _, raw = _config_head(path)
        with _pin_fd(path) as fd:
            syscalls.map_update(fd, bytes(4), struct.pack("=I", int(enabled)) + raw[4:])
    except syscalls.BpfError as e:
        if _is_missing(e):
            raise FileNotFoundError(errno.ENOENT, "no config pinned", str(path)) from e
        raise


def _sockhash_sockets(path: Path, limit: int = layout.MAX_SOCKETS) -> int:
    with _pin_fd(path) as fd:
        return len(syscalls.map_keys(fd, syscalls.map_info(fd).key_size, limit=limit))


def _live_sockets(gen: Path, current: bool) -> int:
    if current and (gen / "ez_config").exists():
        with contextlib.suppress(DataplaneError, OSError), Dataplane.open(gen) as dp:
            return sum(1 for s in dp.sockets().values() if s.state == layout.SockState.PAIRED)
    if (gen / "ez_socks").exists():
        with contextlib.suppress(OSError):
            return _sockhash_sockets(gen / "ez_socks")
    return 0


def _detach(path: Path) -> None:
    with _pin_fd(path) as fd:
        try:
            syscalls.link_detach(fd)
        except syscalls.BpfError as e:
            if e.errno not in (errno.ENOLINK, errno.EINVAL):
                raise


def _remove_pins(directory: Path, names: set[str], kill_switch: bool) -> None:
    """Detach (sockops first) and unpin `names` of one generation."""
    if kill_switch and "ez_config" in names:
        with contextlib.suppress(DataplaneError, OSError):
            _write_enabled(directory / "ez_config", False)
    for link in (LINK_SOCKOPS, LINK_SKB, LINK_MSG):
        if link in names:
            _detach(directory / link)
    for name in sorted(names):
        (directory / name).unlink(missing_ok=True)


def _discard_transient(bpffs: Path) -> None:
    """Leftovers of a start that died: a half-made parking directory holds only second
    names of pins that are still at the top; a pending program pin was never attached."""
    for name in (_PARKING, _PENDING):
        left = bpffs / name
        if left.is_dir():
            for entry in os.scandir(left):
                if _ours(entry.name) and not entry.is_dir():
                    os.unlink(entry.path)
            left.rmdir()


def _retire_drained(bpffs: Path) -> list[str]:
    retired = []
    serving = _served_generation(bpffs)  # a migration died before its switch: still live
    for gen in old_generations(bpffs):
        socks = gen / "ez_socks"
        if gen == serving:
            continue
        if socks.exists() and _sockhash_sockets(socks, limit=1):
            continue
        # Empty: a socket joins a sockhash only from that generation's sockops program,
        # which stopped running when link_sockops was switched (at an earlier start).
        _remove_pins(gen, _pins(gen), kill_switch=False)
        with contextlib.suppress(OSError):
            gen.rmdir()
            retired.append(gen.name)
    return retired


def _check_cgroup(bpffs: Path, cgroup: Path) -> None:
    with _pin_fd(bpffs / LINK_SOCKOPS) as fd:
        attached = syscalls.link_info(fd).target_id
    cg_id = os.stat(cgroup).st_ino
    if attached != cg_id:
        raise DataplaneError(
            f"pins under {bpffs} are attached to another cgroup (id {attached}), "
            f"not {cgroup} (id {cg_id}); uninstall first to move them"
        )


def _sizes_problem(maps: dict[str, int]) -> str:
    """'' when every map has this build's key/value sizes, else what differs."""
    for name, (key, value) in layout.MAPS.items():
        info = syscalls.map_info(maps[name])
        want = (layout.size_of(key), layout.size_of(value))
        if (info.key_size, info.value_size) != want:
            return (
                f"{name} has key/value sizes {info.key_size}/{info.value_size}, "
                f"this build needs {want[0]}/{want[1]}"
            )
    return ""


def _load(obj: Path, reuse: dict[str, int]) -> syscalls.LoadedObject:
    try:
        return syscalls.load_object(obj, reuse)
    except syscalls.LoadError as e:
        raise DataplaneError(f"loading {obj} failed: {e}") from e


def _attached_prog(bpffs: Path, link: str, prog_id: int) -> int | None:
    """An fd of the program `link` runs, from its program pin (top first, then previous
    generations); None when no pin holds it (pins made before program pins existed)."""
    for gen in [bpffs, *old_generations(bpffs)]:
        try:
            fd = syscalls.obj_get(gen / PROG_PINS[link])
        except syscalls.BpfError as e:
            if _is_missing(e):
                continue
            raise
        if syscalls.prog_info(fd).id == prog_id:
            return fd
        os.close(fd)
    return None


def _switch(bpffs: Path, link: str, new_fd: int, uses: set[int]) -> dict[str, str | int] | None:
    """Point the pinned `link` at program `new_fd` in one BPF_LINK_UPDATE, unless it already
    runs the same code (equal tag) on the maps `new_fd` uses among `uses`. Returns what
    changed, or None."""
    with _pin_fd(bpffs / link) as link_fd:
        attached = syscalls.link_info(link_fd).prog_id
        cur_fd = _attached_prog(bpffs, link, attached)
        try:
            new = syscalls.prog_info(new_fd)
            wanted = set(syscalls.prog_map_ids(new_fd)) & uses
            old_tag = "unknown"
            if cur_fd is not None:
                old_tag = syscalls.prog_info(cur_fd).tag
                if old_tag == new.tag and wanted <= set(syscalls.prog_map_ids(cur_fd)):
                    return None
            try:
                # With the old program known, the kernel refuses (EPERM) if someone
                # switched the link meanwhile instead of silently overwriting it.
                syscalls.link_update(link_fd, new_fd, cur_fd)
            except syscalls.BpfError as e:
                if e.errno == errno.EPERM and cur_fd is not None:
                    raise DataplaneError(
                        f"{bpffs / link} was switched to another program during this upgrade "
                        "(a second eztunnel-plugin?); start again"
                    ) from e
                raise
        finally:
            if cur_fd is not None:
                os.close(cur_fd)
    _pin_replace(new_fd, bpffs, PROG_PINS[link])
    return {
        "link": link,
        "old_prog_id": attached,
        "new_prog_id": new.id,
        "old_tag": old_tag,
        "new_tag": new.tag,
    }


def _pin_replace(fd: int, bpffs: Path, name: str) -> None:
    """Pin `fd` as bpffs/name in one rename, replacing what was there."""
    pending = bpffs / _PENDING
    pending.mkdir(mode=0o700, exist_ok=True)
    syscalls.obj_pin(fd, pending / name)
    os.rename(pending / name, bpffs / name)
    pending.rmdir()


def _update_programs(bpffs: Path, obj: Path, pins: set[str]) -> list[dict[str, str | int]]:
    """Same layout: load the object on the pinned maps and swap each link whose program
    differs. Map programs first (a socket takes them when it joins the sockhash)."""
    maps = {name: syscalls.obj_get(bpffs / name) for name in layout.MAPS}
    try:
        try:
            loaded = syscalls.load_object(obj, maps)
        except syscalls.LoadError as e:
            raise DataplaneError(
                f"{obj} cannot run on the maps pinned under {bpffs}: {e}; its layout changed "
                "without a new EZ_LAYOUT_VERSION (bpf/eztunnel.h), which a migration needs"
            ) from e
        try:
            pinned_ids = {syscalls.map_info(fd).id for fd in maps.values()}
            changes = []
            for link in (LINK_MSG, LINK_SKB, LINK_SOCKOPS):
                if link in pins:
                    change = _switch(bpffs, link, loaded.prog_fds[PROGRAMS[link]], pinned_ids)
                    if change:
                        changes.append(change)
            return changes
        finally:
            loaded.close()
    finally:
        for fd in maps.values():
            os.close(fd)


def _endpoints_to_carry(path: Path) -> list[tuple[bytes, bytes]]:
    """The previous generation's endpoints, when their layout is this build's: new
    connections are spliced from the first moment, before the agent's first sync."""
    key_size, value_size = ctypes.sizeof(layout.Addr), ctypes.sizeof(layout.Endpoint)
    out: list[tuple[bytes, bytes]] = []
    with _pin_fd(path) as fd:
        info = syscalls.map_info(fd)
        if (info.key_size, info.value_size) != (key_size, value_size):
            return out
        for key in syscalls.map_keys(fd, key_size, limit=layout.MAX_ENDPOINTS):
            value = syscalls.map_lookup(fd, key, value_size)
            if value is not None:
                out.append((key, value))
    return out


def _park(bpffs: Path, old_version: int) -> str:
    """Move the top generation (all but link_sockops) into old-v<layout>-m<sockhash id>/:
    hard links made in a parking directory, one rename, then the top names go."""
    with _pin_fd(bpffs / "ez_socks") as fd:
        socks_id = syscalls.map_info(fd).id
    name = f"{OLD_PREFIX}v{old_version}-m{socks_id}"
    target = bpffs / name
    moving = _pins(bpffs) - {LINK_SOCKOPS}
    if not target.is_dir():
        parking = bpffs / _PARKING
        parking.mkdir(mode=0o700)
        for pin in moving:
            os.link(bpffs / pin, parking / pin)
        parking.rename(target)
    for pin in moving:
        if not (target / pin).exists():  # a start that died after the rename
            os.link(bpffs / pin, target / pin)
        (bpffs / pin).unlink()
    return name


def _migrate(
    bpffs: Path,
    cgroup: Path,
    obj: Path,
    capture_ports: tuple[int, ...],
    skb_verdict: bool,
    old_version: int,
) -> Prepared:
    """Another layout: the new generation beside the old one, one switch of link_sockops."""
    loaded = _load(obj, {})  # verified before anything changes
    try:
        enabled, _, _ = _config_head(bpffs / "ez_config")
        endpoints = _endpoints_to_carry(bpffs / "ez_endpoints")
        parked = _park(bpffs, old_version)
        dp, switched = Dataplane._attach_new(
            bpffs, cgroup, loaded, capture_ports, skb_verdict, bool(enabled), endpoints
        )
        dp.close()
    finally:
        loaded.close()
    return Prepared(
        "migrated", updated=[switched] if switched else [], from_layout=old_version, parked=parked
    )


def _served_generation(bpffs: Path) -> Path | None:
    """The previous generation whose maps the attached sockops program uses, if any."""
    if not (bpffs / LINK_SOCKOPS).exists():
        return None
    with _pin_fd(bpffs / LINK_SOCKOPS) as fd:
        prog_fd = _attached_prog(bpffs, LINK_SOCKOPS, syscalls.link_info(fd).prog_id)
    if prog_fd is None:
        return None
    try:
        uses = set(syscalls.prog_map_ids(prog_fd))
    finally:
        os.close(prog_fd)
    for gen in old_generations(bpffs):
        with contextlib.suppress(OSError), _pin_fd(gen / "ez_socks") as socks:
            if syscalls.map_info(socks).id in uses:
                return gen
    return None


def _salvage(bpffs: Path, cgroup: Path, pins: set[str]) -> list[str]:
    """An incomplete top generation (an install or a migration died half-way): remove it,
    but keep a link_sockops attached to this cgroup, so the install switches it rather than
    leaving a moment without a program. Second names of a parked generation just go."""
    keep = set()
    if LINK_SOCKOPS in pins:
        with contextlib.suppress(DataplaneError, OSError):
            _check_cgroup(bpffs, cgroup)
            keep = {LINK_SOCKOPS, PROG_PINS[LINK_SOCKOPS]} & pins
    parked = {
        os.stat(Path(e.path)).st_ino
        for gen in old_generations(bpffs)
        for e in os.scandir(gen)
        if not e.is_dir()
    }
    leftovers = pins - keep
    seconds = {name for name in leftovers if os.stat(bpffs / name).st_ino in parked}
    for name in seconds:
        (bpffs / name).unlink()
    _remove_pins(bpffs, leftovers - seconds, kill_switch=True)
    return sorted(leftovers)


def _prepare(
    bpffs: Path,
    cgroup: Path,
    obj: Path,
    capture_ports: tuple[int, ...],
    skb_verdict: bool,
) -> Prepared:
    """Bring the pins under `bpffs` to this object: install, keep, swap programs, or
    migrate. Logs nothing (it may run in the isolated child); the caller logs the result."""
    bpffs.mkdir(mode=0o700, exist_ok=True)
    with _locked(bpffs):
        _discard_transient(bpffs)
        # Before any migration of this start: a generation parked now may still have a
        # sockops call in flight, one parked at an earlier start cannot.
        retired = _retire_drained(bpffs)
        pins = _pins(bpffs)
        done: Prepared | None = None
        if {"ez_config", "ez_socks", LINK_SOCKOPS} <= pins:
            _check_cgroup(bpffs, cgroup)
            _, version, _ = _config_head(bpffs / "ez_config")
            if version != layout.LAYOUT_VERSION:
                done = _migrate(bpffs, cgroup, obj, capture_ports, skb_verdict, version)
            elif pins >= set(layout.MAPS) | _expected_links(skb_verdict):
                with contextlib.ExitStack() as stack:
                    fds = {n: stack.enter_context(_pin_fd(bpffs / n)) for n in layout.MAPS}
                    problem = _sizes_problem(fds)
                if problem:
                    raise DataplaneError(
                        f"pinned map {bpffs}/{problem}, with the same layout version "
                        f"{version}; run `eztunnel-plugin uninstall --bpffs {bpffs}` first"
                    )
                changes = _update_programs(bpffs, obj, pins)
                done = Prepared("updated" if changes else "reused", updated=changes)
        if done is None:
            removed = _salvage(bpffs, cgroup, pins) if pins else []
            # A migration that died after parking: the parked generation still serves
            # link_sockops; carry its switch and endpoints over as the migration would.
            enabled, endpoints = True, None
            if (replaced := _served_generation(bpffs)) is not None:
                enabled = bool(_config_head(replaced / "ez_config")[0])
                endpoints = _endpoints_to_carry(replaced / "ez_endpoints")
            Dataplane._install(
                bpffs, cgroup, obj, capture_ports, skb_verdict, enabled, endpoints
            ).close()
            done = Prepared("installed", removed=removed)
        done.retired = retired
        return done


def _log_prepared(done: Prepared, bpffs: Path, cgroup: Path) -> None:
    where = {"bpffs": str(bpffs), "cgroup": str(cgroup)}
    if done.removed:
        _log.warning("removed incomplete pins", pins=done.removed, **where)
    for name in done.retired:
        _log.info("old generation retired", generation=name, **where)
    for change in done.updated:
        _log.info("program updated", **change, **where)
    if done.action == "migrated":
        _log.info(
            "dataplane migrated",
            from_layout=done.from_layout,
            to_layout=layout.LAYOUT_VERSION,
            previous_generation=done.parked,
            **where,
        )
    elif done.action == "reused":
        _log.info("programs unchanged", **where)
    _log.info(f"dataplane {'installed' if done.action == 'installed' else 'reused'}", **where)


# ---- the isolated loader ------------------------------------------------------------------


def _prepare_in_child(
    bpffs: Path,
    cgroup: Path,
    obj: Path | None,
    capture_ports: tuple[int, ...],
    skb_verdict: bool,
) -> Prepared:
    ports = ",".join(map(str, capture_ports))
    argv = [sys.executable, "-m", "eztunnel_plugin.bpf.dataplane", str(bpffs), str(cgroup), ports,
            str(obj or ""), "1" if skb_verdict else "0"]  # fmt: skip
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=_CHILD_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired as e:
        raise DataplaneError(
            f"the BPF loader process did not finish in {_CHILD_TIMEOUT:.0f} s"
        ) from e
    lines = proc.stdout.strip().splitlines()
    try:
        reply = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        reply = {}
    if "prepared" in reply:
        return Prepared(**reply["prepared"])
    if "error" in reply:
        raise DataplaneError(str(reply["error"]))
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    raise DataplaneError(f"the BPF loader process failed (exit {proc.returncode}): {last}")


def _child_main(argv: list[str]) -> int:
    """The isolated loader: install, keep, upgrade or migrate, report as one JSON line, exit
    (the pins keep everything)."""
    log.configure("console", "warning")
    bpffs, cgroup, ports, obj, skb = argv
    try:
        done = _prepare(
            Path(bpffs), Path(cgroup), Path(obj) if obj else default_object(),
            tuple(int(p) for p in ports.split(",")), skb == "1",
        )  # fmt: skip
    except (DataplaneError, OSError) as e:
        print(json.dumps({"error": str(e)}))
        return 1
    print(json.dumps({"prepared": dataclasses.asdict(done)}))
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
