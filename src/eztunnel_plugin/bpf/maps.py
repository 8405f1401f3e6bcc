"""The pinned maps, one class each, and the `Dataplane` handle that holds their fds.

Endpoints (which addresses are enrolled), config (kill switch, backlog limit, layout
version), capture ports, counters, and the socket table with the flows it pairs.
Each class reads and writes its map by fd; none attaches, pins or unpins anything
(that is loader.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from eztunnel_plugin.bpf import layout, paths, syscalls
from eztunnel_plugin.errors import BpfError, DataplaneError

_ZERO = bytes(4)  # the one index of an array map with one entry


class EndpointMap:
    """ez_endpoints: enrolled addresses -> flags, keyed by IP (canonical text in and out)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def read_all(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for key in syscalls.map_keys(self._fd, ctypes.sizeof(layout.Addr)):
            raw = syscalls.map_lookup(self._fd, key, ctypes.sizeof(layout.Endpoint))
            if raw is not None:
                flags = layout.Endpoint.from_buffer_copy(raw).flags
                out[layout.Addr.from_buffer_copy(key).text()] = flags
        return out

    def put(self, ip: str, flags: int) -> None:
        try:
            syscalls.map_update(self._fd, bytes(layout.Addr.of(ip)), bytes(layout.Endpoint(flags)))
        except BpfError as e:
            if e.errno == errno.E2BIG:
                raise DataplaneError(
                    f"endpoint map is full ({layout.MAX_ENDPOINTS} entries); {ip} not added"
                ) from e
            raise

    def delete(self, ip: str) -> None:
        syscalls.map_delete(self._fd, bytes(layout.Addr.of(ip)))


class ConfigMap:
    """ez_config: the kill switch, the backlog limit and the layout version of the pins."""

    def __init__(self, fd: int, bpffs: Path | None = None) -> None:
        self._fd = fd
        self._bpffs = bpffs  # where previous generations are, for the kill switch

    def read(self) -> layout.Config:
        raw = syscalls.map_lookup(self._fd, _ZERO, ctypes.sizeof(layout.Config))
        assert raw is not None  # array maps always hold index 0
        return layout.Config.from_buffer_copy(raw)

    def _write(self, cfg: layout.Config) -> None:
        syscalls.map_update(self._fd, _ZERO, bytes(cfg))

    def reset(self, enabled: bool) -> None:
        """A fresh config: this build's layout version, the default backlog limit."""
        cfg = layout.Config(int(enabled), layout.LAYOUT_VERSION, layout.DEFAULT_BACKLOG_LIMIT)
        self._write(cfg)

    @property
    def enabled(self) -> bool:
        return bool(self.read().enabled)

    @property
    def layout_version(self) -> int:
        return int(self.read().layout_version)

    def set_enabled(self, enabled: bool) -> None:
        """The kill switch: off passes every byte through TCP and pairs nothing new."""
        cfg = self.read()
        cfg.enabled = int(enabled)
        self._write(cfg)
        # Sockets spliced by a previous layout's generation run its programs, which read
        # its own config: the switch must reach them too.
        for old in paths.old_generations(self._bpffs) if self._bpffs else []:
            with contextlib.suppress(FileNotFoundError):
                write_enabled(old / "ez_config", enabled)

    def set_backlog_limit(self, limit: int) -> None:
        """Unread redirected bytes a peer may hold before the sender falls back to TCP."""
        if not 0 < limit < 1 << 32:
            raise DataplaneError(f"backlog limit {limit} out of range")
        cfg = self.read()
        cfg.backlog_limit = limit
        self._write(cfg)


def config_head(path: Path) -> tuple[int, int, bytes]:
    """(enabled, layout_version, raw value) of any generation's pinned ez_config: every
    layout's config starts with these two u32 fields."""
    with syscalls.pin_fd(path) as fd:
        info = syscalls.map_info(fd)
        raw = None
        if info.key_size == 4 and info.value_size >= 8:
            raw = syscalls.map_lookup(fd, _ZERO, info.value_size)
    if raw is None:
        raise DataplaneError(f"{path} is not an eztunnel config map")
    enabled, version = struct.unpack_from("=II", raw)
    return enabled, version, raw


def write_enabled(path: Path, enabled: bool) -> None:
    """The kill switch of any generation's pinned ez_config, whatever its layout."""
    try:
        _, _, raw = config_head(path)
        with syscalls.pin_fd(path) as fd:
            syscalls.map_update(fd, _ZERO, struct.pack("=I", int(enabled)) + raw[4:])
    except BpfError as e:
        if e.errno == errno.ENOENT:
            raise FileNotFoundError(errno.ENOENT, "no config pinned", str(path)) from e
        raise


class CapturePortMap:
    """ez_ports: the ports whose captured connections may be paired with their proxy socket."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def read(self) -> list[int]:
        keys = syscalls.map_keys(self._fd, 4)
        return sorted(struct.unpack("=I", k)[0] for k in keys)

    def set(self, ports: tuple[int, ...]) -> None:
        bad = [p for p in ports if not 0 < p < 65536]
        if bad or len(ports) > layout.MAX_CAPTURE_PORTS:
            raise DataplaneError(f"invalid capture ports {list(ports)}")
        for old in set(self.read()) - set(ports):
            syscalls.map_delete(self._fd, struct.pack("=I", old))
        for port in ports:
            syscalls.map_update(self._fd, struct.pack("=I", port), struct.pack("=I", 1))


class CounterMap:
    """ez_counters: one per-CPU u64 per layout.Counter."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def read(self) -> dict[str, int]:
        """Every counter summed over CPUs, by lower-case name."""
        out: dict[str, int] = {}
        for c in layout.Counter:
            slots = syscalls.percpu_lookup(self._fd, struct.pack("=I", c.value), 8)
            out[c.name.lower()] = sum(struct.unpack("=Q", s)[0] for s in slots)
        return out


@dataclass(frozen=True)
class Flow:
    """One spliced socket pair, as the socket table holds it."""

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
    # Bytes each direction sent through TCP while paired (a fallback, or for good).
    tcp_active_to_passive: int = 0
    tcp_passive_to_active: int = 0


def endpoint_text(ip: layout.Addr, port: int) -> str:
    """ip:port, with brackets around IPv6."""
    text = ip.text()
    return f"[{text}]:{port}" if ":" in text else f"{text}:{port}"


def pairs(socks: Mapping[int, layout.SockInfo]) -> Iterator[Flow]:
    """The flows of a socket table (cookie -> entry): one per active socket whose peer's
    entry points back at it (paired once; either side may now be tainted)."""
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
            local=endpoint_text(info.local, info.local_port),
            remote=endpoint_text(info.remote, info.remote_port),
            active_netns=info.netns,
            passive_netns=peer.netns,
            bytes_active_to_passive=info.bytes_out,
            bytes_passive_to_active=peer.bytes_out,
            state_active=layout.SockState(info.state),
            state_passive=layout.SockState(peer.state),
            tcp_active_to_passive=info.tcp_bytes,
            tcp_passive_to_active=peer.tcp_bytes,
        )


class SockInfoMap:
    """ez_sockinfo: socket cookie -> what the programs know of the socket (and its pair)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def sockets(self) -> dict[int, layout.SockInfo]:
        size = ctypes.sizeof(layout.SockInfo)
        out: dict[int, layout.SockInfo] = {}
        for key in syscalls.map_keys(self._fd, 8, limit=layout.MAX_SOCKETS):
            raw = syscalls.map_lookup(self._fd, key, size)
            if raw is not None:
                out[struct.unpack("=Q", key)[0]] = layout.SockInfo.from_buffer_copy(raw)
        return out

    def flows(self) -> list[Flow]:
        """Socket pairs the programs spliced (paired once; either side may now be tainted)."""
        return list(pairs(self.sockets()))


def sizes_problem(maps: Mapping[str, int]) -> str:
    """'' when every map (name -> fd) has this build's key/value sizes, else what differs."""
    for name, (key, value) in layout.MAPS.items():
        info = syscalls.map_info(maps[name])
        want = (layout.size_of(key), layout.size_of(value))
        if (info.key_size, info.value_size) != want:
            return (
                f"{name} has key/value sizes {info.key_size}/{info.value_size}, "
                f"this build needs {want[0]}/{want[1]}"
            )
    return ""


@dataclass
class Dataplane:
    """Open fds of the pinned maps (and links) under one bpffs directory, and a class per map.

    Made by loader.install_or_reuse (which attaches) or Dataplane.open (which does not).
    """

    bpffs: Path
    maps: dict[str, int]  # pinned map name -> fd
    links: dict[str, int] = field(default_factory=dict)  # link pin name -> fd
    reused: bool = False
    action: str = ""  # what loader.install_or_reuse did (see loader.Prepared.action)

    @classmethod
    def open(cls, bpffs: Path = paths.DEFAULT_BPFFS) -> Dataplane:
        """Open existing pins read-write without touching attachments."""
        if not (bpffs / "ez_config").exists():
            raise DataplaneError(f"no eztunnel data plane is pinned under {bpffs}")
        dp = cls(bpffs, {}, reused=True)
        try:
            for name in layout.MAPS:
                dp.maps[name] = syscalls.obj_get(bpffs / name)
            dp._check_layout()
        except BaseException:
            dp.close()
            raise
        return dp

    def _check_layout(self) -> None:
        problem = sizes_problem(self.maps)
        if problem:
            raise DataplaneError(
                f"pinned map {self.bpffs}/{problem}; "
                f"run `eztunnel-plugin uninstall --bpffs {self.bpffs}` first"
            )
        version = self.config.layout_version
        if version != layout.LAYOUT_VERSION:
            raise DataplaneError(
                f"pinned data plane under {self.bpffs} has layout version {version}, "
                f"this build needs {layout.LAYOUT_VERSION}: start this build's agent, which "
                f"migrates it, or run `eztunnel-plugin uninstall --bpffs {self.bpffs}`"
            )

    @property
    def endpoints(self) -> EndpointMap:
        return EndpointMap(self.maps["ez_endpoints"])

    @property
    def config(self) -> ConfigMap:
        return ConfigMap(self.maps["ez_config"], self.bpffs)

    @property
    def ports(self) -> CapturePortMap:
        return CapturePortMap(self.maps["ez_ports"])

    @property
    def counters(self) -> CounterMap:
        return CounterMap(self.maps["ez_counters"])

    @property
    def sockinfo(self) -> SockInfoMap:
        return SockInfoMap(self.maps["ez_sockinfo"])

    def attachments(self) -> dict[str, syscalls.LinkInfo]:
        return {name: syscalls.link_info(fd) for name, fd in self.links.items()}

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
