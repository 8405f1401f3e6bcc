"""Load, pin, attach, reuse and remove the splicing programs; read and write their maps.

Lifecycle (design.md section 3): everything lives under one bpffs directory.
A fresh install loads the object with pylibbpf, pins every map, attaches the
sk_msg program to the SOCKHASH and the sockops program to a cgroup through BPF
links and pins the links, so they outlive this process. A later start over
complete pins reuses them untouched (live flows stay spliced, nothing is
attached twice). Uninstall turns pairing off, detaches the links and unpins
everything; sockets that are still paired keep the program and maps alive
through the kernel's own references until they close, so no queued byte is
dropped (deleting a socket from the SOCKHASH would drop its queue).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from eztunnel_plugin import bpfsys, layout, log

DEFAULT_BPFFS = Path("/sys/fs/bpf/eztunnel")
BPFFS_MAGIC = 0xCAFE4A11

LINK_SOCKOPS = "link_sockops"
LINK_MSG = "link_msg"
LINK_SKB = "link_skb"

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
    libc = bpfsys.libc()
    if libc.statfs(os.fsencode(path), buf) != 0:
        return False
    return bool(struct.unpack_from("=q", buf, 0)[0] == BPFFS_MAGIC)


def _check_bpffs_dir(bpffs: Path) -> None:
    parent = bpffs.parent
    if not parent.is_dir() or not _is_bpffs(parent):
        raise DataplaneError(
            f"{parent} is not a bpf filesystem; mount one with `mount -t bpf bpf {parent}`"
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
        for key in bpfsys.map_keys(self._fd, ctypes.sizeof(layout.Addr)):
            raw = bpfsys.map_lookup(self._fd, key, ctypes.sizeof(layout.Endpoint))
            if raw is not None:
                ip = layout.Addr.from_buffer_copy(key).ip()
                out[str(ip)] = layout.Endpoint.from_buffer_copy(raw).flags
        return out

    def put(self, ip: str, flags: int) -> None:
        try:
            bpfsys.map_update(self._fd, bytes(layout.Addr.of(ip)), bytes(layout.Endpoint(flags)))
        except bpfsys.BpfError as e:
            if e.errno == errno.E2BIG:
                raise DataplaneError(
                    f"endpoint map is full ({layout.MAX_ENDPOINTS} entries); {ip} not added"
                ) from e
            raise

    def delete(self, ip: str) -> None:
        bpfsys.map_delete(self._fd, bytes(layout.Addr.of(ip)))


@dataclass
class Dataplane:
    """Open handles on the pinned data plane under one bpffs directory."""

    bpffs: Path
    maps: dict[str, int]
    links: dict[str, int] = field(default_factory=dict)
    reused: bool = False

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
        """Reuse complete pins under `bpffs`, or load, pin and attach from scratch.

        isolated: load in a short-lived child process, so that pylibbpf (and the
        llvmlite it imports) never take memory in a long-running agent.
        """
        cgroup = cgroup or cgroup2_root()
        _check_bpffs_dir(bpffs)
        if not cgroup.is_dir():
            raise DataplaneError(f"cgroup directory {cgroup} does not exist")
        expected = {LINK_SOCKOPS, LINK_MSG} | ({LINK_SKB} if skb_verdict else set())
        pinned = set(os.listdir(bpffs)) if bpffs.is_dir() else set()
        if pinned >= set(layout.MAPS) | expected:
            dp = cls._reuse(bpffs, cgroup, expected)
            _log.info("dataplane reused", bpffs=str(bpffs), cgroup=str(cgroup))
            return dp
        if pinned:
            # Incomplete (an install died half-way): nothing attached depends on it.
            _log.warning("removing incomplete pins", bpffs=str(bpffs), pins=sorted(pinned))
            uninstall(bpffs)
        if isolated:
            _install_in_child(bpffs, cgroup, obj, capture_ports, skb_verdict)
            dp = cls._reuse(bpffs, cgroup, expected)
            dp.reused = False
        else:
            dp = cls._install(bpffs, cgroup, obj or default_object(), capture_ports, skb_verdict)
        _log.info("dataplane installed", bpffs=str(bpffs), cgroup=str(cgroup))
        return dp

    @classmethod
    def open(cls, bpffs: Path = DEFAULT_BPFFS) -> Dataplane:
        """Open existing pins read-write without touching attachments."""
        if not (bpffs / "ez_config").exists():
            raise DataplaneError(f"no eztunnel data plane is pinned under {bpffs}")
        maps = {name: bpfsys.obj_get(bpffs / name) for name in layout.MAPS}
        dp = cls(bpffs, maps, reused=True)
        dp._check_layout()
        return dp

    @classmethod
    def _reuse(cls, bpffs: Path, cgroup: Path, expected: set[str]) -> Dataplane:
        dp = cls.open(bpffs)
        try:
            dp.links = {name: bpfsys.obj_get(bpffs / name) for name in expected}
            cg_id = os.stat(cgroup).st_ino
            attached = bpfsys.link_info(dp.links[LINK_SOCKOPS]).target_id
            if attached != cg_id:
                raise DataplaneError(
                    f"pins under {bpffs} are attached to another cgroup (id {attached}), "
                    f"not {cgroup} (id {cg_id}); uninstall first to move them"
                )
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
    ) -> Dataplane:
        import pylibbpf

        bpffs.mkdir(mode=0o700, exist_ok=True)
        try:
            bpf_obj = pylibbpf.BpfObject(str(obj))
            bpf_obj.load()
        except Exception as e:  # pylibbpf raises its own exception types
            raise DataplaneError(f"loading {obj} failed: {e}") from e
        progs = bpfsys.own_prog_fds()
        maps = {name: os.dup(bpf_obj.get_map(name).get_fd()) for name in layout.MAPS}
        dp = cls(bpffs, maps)
        try:
            for name, fd in maps.items():
                bpfsys.obj_pin(fd, bpffs / name)
            dp._write_config(layout.Config(1, layout.LAYOUT_VERSION, layout.DEFAULT_BACKLOG_LIMIT))
            dp.set_capture_ports(capture_ports)
            # sk_msg (and the optional verdict) first: a socket takes the map's
            # programs when it is added, and sockops adds sockets.
            dp._attach(LINK_MSG, progs["ez_msg"], maps["ez_socks"], bpfsys.SK_MSG_VERDICT)
            if skb_verdict:
                verdict = bpfsys.SK_SKB_STREAM_VERDICT
                dp._attach(LINK_SKB, progs["ez_skb_verdict"], maps["ez_socks"], verdict)
            cg_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
            try:
                dp._attach(LINK_SOCKOPS, progs["ez_sockops"], cg_fd, bpfsys.CGROUP_SOCK_OPS)
            finally:
                os.close(cg_fd)
        except BaseException:
            dp.close()
            uninstall(bpffs)
            raise
        finally:
            del bpf_obj  # program fds: the links hold the programs now
        return dp

    def _attach(self, name: str, prog_fd: int, target_fd: int, attach_type: int) -> None:
        fd = bpfsys.link_create(prog_fd, target_fd, attach_type)
        self.links[name] = fd
        bpfsys.obj_pin(fd, self.bpffs / name)

    def _check_layout(self) -> None:
        for name, (key, value) in layout.MAPS.items():
            info = bpfsys.map_info(self.maps[name])
            want = (layout.size_of(key), layout.size_of(value))
            if (info.key_size, info.value_size) != want:
                raise DataplaneError(
                    f"pinned map {self.bpffs / name} has key/value sizes "
                    f"{info.key_size}/{info.value_size}, this build needs {want[0]}/{want[1]}; "
                    f"run `eztunnel-plugin uninstall --bpffs {self.bpffs}` first"
                )
        version = self.config().layout_version
        if version != layout.LAYOUT_VERSION:
            raise DataplaneError(
                f"pinned data plane under {self.bpffs} has layout version {version}, "
                f"this build needs {layout.LAYOUT_VERSION}; "
                f"run `eztunnel-plugin uninstall --bpffs {self.bpffs}` first"
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
        raw = bpfsys.map_lookup(self.maps["ez_config"], bytes(4), ctypes.sizeof(layout.Config))
        assert raw is not None  # array maps always hold index 0
        return layout.Config.from_buffer_copy(raw)

    def _write_config(self, cfg: layout.Config) -> None:
        bpfsys.map_update(self.maps["ez_config"], bytes(4), bytes(cfg))

    def set_enabled(self, enabled: bool) -> None:
        """The kill switch: off passes every byte through TCP and pairs nothing new."""
        cfg = self.config()
        cfg.enabled = int(enabled)
        self._write_config(cfg)

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
        keys = bpfsys.map_keys(self.maps["ez_ports"], 4)
        return sorted(struct.unpack("=I", k)[0] for k in keys)

    def set_capture_ports(self, ports: tuple[int, ...]) -> None:
        bad = [p for p in ports if not 0 < p < 65536]
        if bad or len(ports) > layout.MAX_CAPTURE_PORTS:
            raise DataplaneError(f"invalid capture ports {list(ports)}")
        fd = self.maps["ez_ports"]
        for old in set(self.capture_ports()) - set(ports):
            bpfsys.map_delete(fd, struct.pack("=I", old))
        for port in ports:
            bpfsys.map_update(fd, struct.pack("=I", port), struct.pack("=I", 1))

    @property
    def endpoints(self) -> EndpointMap:
        return EndpointMap(self.maps["ez_endpoints"])

    # ---- observation -----------------------------------------------------

    def counters(self) -> dict[str, int]:
        """Every counter summed over CPUs, by lower-case name."""
        fd = self.maps["ez_counters"]
        out: dict[str, int] = {}
        for c in layout.Counter:
            slots = bpfsys.percpu_lookup(fd, struct.pack("=I", c.value), 8)
            out[c.name.lower()] = sum(struct.unpack("=Q", s)[0] for s in slots)
        return out

    def sockets(self) -> dict[int, layout.SockInfo]:
        fd = self.maps["ez_sockinfo"]
        size = ctypes.sizeof(layout.SockInfo)
        out: dict[int, layout.SockInfo] = {}
        for key in bpfsys.map_keys(fd, 8, limit=layout.MAX_SOCKETS):
            raw = bpfsys.map_lookup(fd, key, size)
            if raw is not None:
                out[struct.unpack("=Q", key)[0]] = layout.SockInfo.from_buffer_copy(raw)
        return out

    def flows(self) -> list[Flow]:
        """Socket pairs the programs spliced (paired once; either side may now be tainted)."""
        socks = self.sockets()
        return list(_pairs(socks))

    def attachments(self) -> dict[str, bpfsys.LinkInfo]:
        return {name: bpfsys.link_info(fd) for name, fd in self.links.items()}


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
    paired_sockets: int  # still alive: they keep the programs until they close


def uninstall(bpffs: Path = DEFAULT_BPFFS) -> UninstallReport:
    """Turn pairing off, detach, unpin; never deletes a socket from the SOCKHASH."""
    report = UninstallReport(bpffs, [], [], 0)
    if not bpffs.is_dir():
        return report
    _check_bpffs_dir(bpffs)
    names = set(os.listdir(bpffs))
    # 1. Kill switch first: paired sockets fall back to TCP on their next send,
    #    and what they already queued stays deliverable (their psock lives on).
    if "ez_config" in names:
        with contextlib.suppress(DataplaneError, OSError), Dataplane.open(bpffs) as dp:
            dp.set_enabled(False)
            report.paired_sockets = sum(
                1 for s in dp.sockets().values() if s.state == layout.SockState.PAIRED
            )
    # 2. Detach links: sockops first (no new sockets), then the map programs.
    for name in (LINK_SOCKOPS, LINK_SKB, LINK_MSG):
        if name not in names:
            continue
        fd = bpfsys.obj_get(bpffs / name)
        try:
            bpfsys.link_detach(fd)
        except bpfsys.BpfError as e:
            if e.errno not in (errno.ENOLINK, errno.EINVAL):
                raise
        finally:
            os.close(fd)
        report.detached.append(name)
    # 3. Unpin our maps and links; anything else there is not ours to remove.
    ours = set(layout.MAPS) | {LINK_SOCKOPS, LINK_SKB, LINK_MSG}
    for name in sorted(set(os.listdir(bpffs)) & ours):
        (bpffs / name).unlink()
        report.unpinned.append(name)
    try:
        bpffs.rmdir()
    except OSError as e:
        left = sorted(os.listdir(bpffs))
        raise DataplaneError(f"{bpffs} still holds objects that are not ours: {left}") from e
    _log.info(
        "dataplane uninstalled",
        bpffs=str(bpffs),
        detached=report.detached,
        live_paired_sockets=report.paired_sockets,
    )
    return report


def _install_in_child(
    bpffs: Path,
    cgroup: Path,
    obj: Path | None,
    capture_ports: tuple[int, ...],
    skb_verdict: bool,
) -> None:
    ports = ",".join(map(str, capture_ports))
    argv = [sys.executable, "-m", "eztunnel_plugin.dataplane", str(bpffs), str(cgroup), ports,
            str(obj or ""), "1" if skb_verdict else "0"]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or ["no output"]
        raise DataplaneError(f"loading the BPF object failed: {lines[-1]}")


def _child_main(argv: list[str]) -> int:
    """The isolated loader: install, pin, attach, exit (the pins keep everything)."""
    bpffs, cgroup, ports, obj, skb = argv
    try:
        Dataplane._install(
            Path(bpffs), Path(cgroup), Path(obj) if obj else default_object(),
            tuple(int(p) for p in ports.split(",")), skb == "1",
        ).close()  # fmt: skip
    except (DataplaneError, OSError) as e:
        print(f"{e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
