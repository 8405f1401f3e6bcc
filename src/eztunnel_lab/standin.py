"""The simulator's ztunnel stand-in: one HAProxy process with ztunnel's in-pod data path.

Per pod, inside the pod's netns (HAProxy `namespace`), like ztunnel's InPodSocketFactory:

- 15001 `out-<pod>` (outbound capture, S2). istio-cni REDIRECTs the app's connection
  here; HAProxy reads the original destination with SO_ORIGINAL_DST (its `dst`).
- backend `hbone-<pod>` (S3): mutual TLS 1.3 from the source pod to the destination
  pod's 15008. The server address 0.0.0.0:15008 means "the original destination's IP,
  port 15008" (HAProxy's transparent server address), which is what ztunnel does for
  an in-mesh destination, without any per-destination configuration. The original
  destination (what HBONE's CONNECT carries) travels as a PROXY v2 header.
- 15008 `in-<pod>` (S4): mutual TLS, client certificate required, PROXY v2 accepted.
- 15006 `inplain-<pod>`: inbound plaintext capture (REDIRECTed by istio-cni).
- backend `app-<pod>` (S5): connects to the original destination (the app) from the
  client's IP (`source 0.0.0.0 usesrc clientip`: IP_TRANSPARENT, kernel-chosen port,
  as ztunnel's freebind_connect).

Every socket the process creates carries mark 0x539 through simmark's cgroup
sock_create program (HAProxy cannot mark every socket itself).
"""

from __future__ import annotations

import csv
import io
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from eztunnel_lab import inpod

THREADS = 2  # ztunnel's default worker threads


@dataclass(frozen=True)
class PodTls:
    name: str  # workload name, used in proxy names
    netns: str
    cert: Path  # PEM bundle: leaf certificate + key


def config(
    pods: Sequence[PodTls], ca_file: Path, stats_socket: Path, threads: int = THREADS
) -> str:
    out = [
        f"""global
    nbthread {threads}
    maxconn 4096
    stats socket {stats_socket} mode 600 level admin
    ssl-default-bind-options ssl-min-ver TLSv1.3
    ssl-default-server-options ssl-min-ver TLSv1.3
    tune.ssl.default-dh-param 2048

defaults
    mode tcp
    timeout connect 5s
    timeout client 10m
    timeout server 10m
"""
    ]
    for p in pods:
        tls = f"ssl crt {p.cert} ca-file {ca_file} verify required"
        out.append(f"""
# ---- {p.name} (netns {p.netns})
frontend out-{p.name}
    bind 0.0.0.0:{inpod.OUTBOUND_PORT} namespace {p.netns}
    default_backend hbone-{p.name}

backend hbone-{p.name}
    server hbone 0.0.0.0:{inpod.INBOUND_PORT} namespace {p.netns} {tls} send-proxy-v2

frontend in-{p.name}
    bind 0.0.0.0:{inpod.INBOUND_PORT} namespace {p.netns} transparent accept-proxy {tls}
    default_backend app-{p.name}

frontend inplain-{p.name}
    bind 0.0.0.0:{inpod.INBOUND_PLAINTEXT_PORT} namespace {p.netns} transparent
    default_backend app-{p.name}

backend app-{p.name}
    source 0.0.0.0 usesrc clientip
    server app 0.0.0.0 namespace {p.netns}
""")
    return "".join(out)


def _command(stats_socket: Path, command: str, timeout: float = 5.0) -> str:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(stats_socket))
        s.sendall(command.encode() + b"\n")
        chunks = []
        for _ in range(100_000):  # bounded; HAProxy closes after one command
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks).decode()


@dataclass(frozen=True)
class ProxyStat:
    sessions_total: int  # stot: connections accepted (frontend) / made (backend)
    sessions_now: int
    bytes_in: int
    bytes_out: int


def stats(stats_socket: Path) -> dict[str, ProxyStat]:
    """'<proxy>' -> counters, for every frontend and backend (from `show stat`)."""
    text = _command(stats_socket, "show stat").lstrip("# ")
    out: dict[str, ProxyStat] = {}
    for row in csv.DictReader(io.StringIO(text)):
        if row.get("svname") in ("FRONTEND", "BACKEND"):
            out[row["pxname"]] = ProxyStat(
                int(row["stot"] or 0),
                int(row["scur"] or 0),
                int(row["bin"] or 0),
                int(row["bout"] or 0),
            )
    return out


def path_delta(
    before: dict[str, ProxyStat], after: dict[str, ProxyStat], src: str, dst: str
) -> dict[str, int]:
    """New connections on each hop of src -> dst: out-src, hbone-src, in-dst, app-dst."""
    hops = (f"out-{src}", f"hbone-{src}", f"in-{dst}", f"app-{dst}")
    return {h: after[h].sessions_total - before[h].sessions_total for h in hops}


def info(stats_socket: Path) -> dict[str, str]:
    """`show info` as a dict (e.g. CumSslConns: TLS connections, both sides, so far)."""
    out: dict[str, str] = {}
    for line in _command(stats_socket, "show info").splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out
