"""The simulator's HBONE stand-in for ztunnel: `eztunnel-hbone` (Rust, lab/hbone/).

One process, two tokio workers, listening inside every pod netns on [::]:15001, 15006
and 15008 as ztunnel does in-pod; HTTP/2 CONNECT inside mutual TLS 1.3 between the
pods, pooled per (source workload, source IP, destination identity, destination
address). This module writes its configuration and reads its counters.

Counters (`stats()`) use the hop names of the HAProxy stand-in (standin.py), so the
path checks read the same for both: `out-<pod>` (15001 connections), `hbone-<pod>`
(CONNECT streams sent), `in-<pod>` (CONNECT streams received on 15008), `inplain-<pod>`
(15006 connections), `app-<pod>` (connections to the app). With pooling, the TLS
connections are counted apart (`tunnels()`): many streams share one tunnel.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from eztunnel_lab.standin import ProxyStat

BINARY = "eztunnel-hbone"
THREADS = 2  # ztunnel's default worker threads


def binary_path() -> Path:
    path = Path(str(resources.files("eztunnel_lab") / "data" / BINARY))
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `make build`")
    return path


@dataclass(frozen=True)
class Settings:
    """ztunnel's defaults (its config.rs); the lab may shorten the idle timeout."""

    workers: int = THREADS
    pool_max_streams: int = 100
    pool_idle_timeout_ms: int = 300_000
    stream_window: int = 4 << 20
    connection_window: int = 16 << 20
    frame_size: int = 1 << 20
    mark: int = 0x539


@dataclass(frozen=True)
class PodHbone:
    name: str
    netns: str  # name under /run/netns
    cert: Path  # PEM bundle: leaf certificate + key
    identity: str  # spiffe://...
    ips: tuple[str, ...]


def config(
    pods: Sequence[PodHbone], ca_file: Path, stats_socket: Path, settings: Settings = Settings()
) -> str:
    lines = [
        f"workers {settings.workers}",
        f"mark {settings.mark}",
        f"ca {ca_file}",
        f"stats {stats_socket}",
        f"pool_max_streams {settings.pool_max_streams}",
        f"pool_idle_timeout_ms {settings.pool_idle_timeout_ms}",
        f"stream_window {settings.stream_window}",
        f"connection_window {settings.connection_window}",
        f"frame_size {settings.frame_size}",
    ]
    for p in pods:
        lines.append(f"pod {p.name} /run/netns/{p.netns} {p.cert} {p.identity} {' '.join(p.ips)}")
    return "\n".join(lines) + "\n"


def _command(stats_socket: Path, command: str, timeout: float = 5.0) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(stats_socket))
        s.sendall(command.encode() + b"\n")
        chunks = []
        for _ in range(10_000):  # bounded; the stand-in closes after one answer
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    doc: dict[str, Any] = json.loads(b"".join(chunks))
    if "error" in doc:
        raise RuntimeError(f"eztunnel-hbone: {doc['error']}")
    return doc


def raw_stats(stats_socket: Path) -> dict[str, Any]:
    """Everything: {"pods": {pod: {out|hbone|in|inplain|app: counters}}, "settings": ...}."""
    return _command(stats_socket, "stats")


# Which counter is each hop's "new connections" (what the path checks compare).
_HOP_COUNTER = {
    "out": "connections",
    "hbone": "streams",
    "in": "streams",
    "inplain": "connections",
    "app": "connections",
}


def stats(stats_socket: Path) -> dict[str, ProxyStat]:
    """'<hop>-<pod>' -> counters, in the HAProxy stand-in's shape."""
    out: dict[str, ProxyStat] = {}
    for pod, hops in raw_stats(stats_socket)["pods"].items():
        for hop, key in _HOP_COUNTER.items():
            c = hops[hop]
            active = c["streams_active"] if key == "streams" else 0
            out[f"{hop}-{pod}"] = ProxyStat(int(c[key]), int(active), c["bytes_in"], c["bytes_out"])
    return out


@dataclass(frozen=True)
class Tunnels:
    """The pooled HBONE connections of one source pod (its `hbone` counters)."""

    opened: int
    reused: int  # streams that took an already open tunnel
    active: int
    streams: int
    max_streams_on_a_tunnel: int
    wire_bytes: int  # TLS bytes the proxy wrote to its tunnel sockets (both directions' ends)

    @property
    def streams_per_tunnel(self) -> float:
        return self.streams / self.opened if self.opened else 0.0


def tunnels(doc: dict[str, Any], src: str, dst: str) -> Tunnels:
    """src's outbound tunnels, with the TLS bytes written on both ends (src's and dst's)."""
    h, i = doc["pods"][src]["hbone"], doc["pods"][dst]["in"]
    return Tunnels(
        opened=int(h["tunnels_opened"]),
        reused=int(h["tunnels_reused"]),
        active=int(h["tunnels_active"]),
        streams=int(h["streams"]),
        max_streams_on_a_tunnel=int(h["max_streams_on_a_tunnel"]),
        wire_bytes=int(h["wire_bytes_out"]) + int(i["wire_bytes_out"]),
    )


def release_idle(stats_socket: Path) -> int:
    """Close every pooled tunnel that carries no stream now (the idle timeout, early)."""
    return int(_command(stats_socket, "release-idle")["released"])
