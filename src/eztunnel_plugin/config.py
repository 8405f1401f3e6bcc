"""`eztunnel-plugin run` settings: flags plus the environment ztunnel's chart sets.

Every bad or missing setting becomes one ConfigError naming the setting; the
CLI prints it on one line and exits 2.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import ipaddress
import logging
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from eztunnel_plugin import endpoints_file
from eztunnel_plugin.api import admin
from eztunnel_plugin.bpf import layout, paths, syscalls
from eztunnel_plugin.errors import ConfigError, ConnectError, DataplaneError, EndpointsFileError
from eztunnel_plugin.xds.client import STATIC_TOKEN_PREFIX, XdsConfig, check_token, read_token

CGROUP2_SUPER_MAGIC: Final = 0x63677270
STALE_AFTER_RANGE: Final = (1.0, 86400.0)  # seconds; the staleness check ticks at 0.5 s


@dataclass(frozen=True)
class Listen:
    host: str
    port: int

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_number(
    setting: str, value: object, kind: type[int] | type[float], lo: float, hi: float
) -> float:
    """A finite number in [lo, hi] from a flag's text (or a default); else one ConfigError."""
    shown = str(value)[:40]
    try:
        number = kind(str(value).strip())
    except (TypeError, ValueError, OverflowError):
        want = "an integer" if kind is int else "a number"
        raise ConfigError(setting, f"expected {want}, got {shown!r}") from None
    if not math.isfinite(number) or not lo <= number <= hi:
        low, high = (int(lo), int(hi)) if kind is int else (lo, hi)
        raise ConfigError(setting, f"must be between {low} and {high}, not {shown}")
    return number


def check_cgroup2(setting: str, path: Path) -> None:
    """path must be a directory of a cgroup v2 filesystem (attaching elsewhere fails late)."""
    if not path.is_dir():
        raise ConfigError(setting, f"{path} is not a directory")
    buf = ctypes.create_string_buffer(120)  # struct statfs; f_type comes first
    if syscalls.libc().statfs(os.fsencode(path), buf) != 0:
        raise ConfigError(setting, f"cannot statfs {path}: {os.strerror(ctypes.get_errno())}")
    if struct.unpack_from("=q", buf, 0)[0] != CGROUP2_SUPER_MAGIC:
        raise ConfigError(setting, f"{path} is not a cgroup v2 directory (filesystem type cgroup2)")


def parse_listen(setting: str, text: str) -> Listen:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(setting, f"expected HOST:PORT, got {text!r}")
    return Listen(host, int(port))


@dataclass(frozen=True)
class AgentConfig:
    bpffs: Path
    cgroup: Path
    grpc_listen: Listen
    metrics_listen: Listen | None
    endpoints_file: Path | None
    xds: XdsConfig | None  # None with --endpoints-file
    node_name: str
    log_format: str
    log_level: str
    xds_stale_after_s: float
    capture_ports: tuple[int, ...]
    backlog_limit: int
    admin_socket: Path = admin.DEFAULT_SOCKET
    health_listen: Listen | None = None  # readiness and liveness over HTTP (api/health.py)
    allow_workaround: bool = True  # splice where only the SK_SKB workaround makes it work


def add_workaround_arguments(p: argparse.ArgumentParser, refuse_help: str) -> None:
    """--refuse-workaround, and --allow-workaround: the default since the verdict program
    cuts repeated bytes, still accepted so that command lines written before keep working."""
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--refuse-workaround", dest="allow_workaround", action="store_false", help=refuse_help
    )
    group.add_argument(
        "--allow-workaround",
        dest="allow_workaround",
        action="store_true",
        help="splice also where the kernel needs the SK_SKB workaround (the default)",
    )
    p.set_defaults(allow_workaround=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--bpffs",
        type=Path,
        default=paths.DEFAULT_BPFFS,
        help="bpffs directory for pins (default %(default)s)",
    )
    p.add_argument(
        "--cgroup",
        type=Path,
        default=None,
        help="cgroup v2 directory to attach to (default: the cgroup2 mount root)",
    )
    p.add_argument(
        "--grpc-listen",
        default="127.0.0.1:15081",
        help="inspection API address (default %(default)s)",
    )
    p.add_argument(
        "--grpc-allow-remote",
        action="store_true",
        help="allow --grpc-listen on a non-loopback address",
    )
    p.add_argument(
        "--admin-socket",
        type=Path,
        default=admin.DEFAULT_SOCKET,
        help="root-only unix socket for state changes (default %(default)s)",
    )
    p.add_argument(
        "--metrics-listen",
        default=None,
        help="Prometheus metrics at /stats/prometheus and /metrics, HOST:PORT (off by default, "
        "so that several agents of a test never share a port; Istio's port is 15020, the "
        "chart's default)",
    )
    p.add_argument(
        "--metrics-allow-remote",
        action="store_true",
        help="allow --metrics-listen on a non-loopback address",
    )
    p.add_argument(
        "--health-listen",
        default=None,
        help="readiness (/healthz/ready) and liveness (/healthz/live) over HTTP, HOST:PORT "
        "(off by default; ztunnel's port is 15021). It answers nothing but health",
    )
    p.add_argument(
        "--endpoints-file",
        type=Path,
        default=None,
        help='static endpoints YAML (endpoints: ["10.0.0.10"]) instead of xDS',
    )
    p.add_argument("--node-name", default=None, help="this node's name (env NODE_NAME)")
    p.add_argument("--xds-address", default=None, help="istiod address (env XDS_ADDRESS)")
    p.add_argument(
        "--xds-plaintext",
        action="store_true",
        help="talk to istiod without TLS (tests and local development only)",
    )
    # Numbers stay text here and are checked in from_args: one clear line for any mistake.
    p.add_argument(
        "--xds-stale-after",
        default=60.0,
        help="seconds without a live xDS stream before health turns NOT_SERVING "
        f"({STALE_AFTER_RANGE[0]:g}..{STALE_AFTER_RANGE[1]:g}, default %(default)s)",
    )
    p.add_argument(
        "--capture-port",
        action="append",
        default=None,
        help="outbound capture port (repeatable, default 15001)",
    )
    p.add_argument(
        "--backlog-limit",
        default=layout.DEFAULT_BACKLOG_LIMIT,
        help="unread bytes a spliced peer may hold before its sender falls back to TCP "
        "(default %(default)s)",
    )
    add_workaround_arguments(
        p,
        "attach nothing on kernels that need the SK_SKB workaround: pods stay on plain TCP "
        "there (default: splice with it once the self-test passed; README, kernel section)",
    )
    p.add_argument(
        "--log-format",
        default=None,
        help="json or console (default: json unless stderr is a terminal)",
    )
    p.add_argument("--log-level", default="info", help="debug, info, warning or error")


def from_args(args: argparse.Namespace, env: Mapping[str, str], tty: bool) -> AgentConfig:
    log_format = args.log_format or ("console" if tty else "json")
    if log_format not in ("json", "console"):
        raise ConfigError("--log-format", f"must be json or console, not {log_format!r}")
    if not isinstance(logging.getLevelName(str(args.log_level).upper()), int):
        raise ConfigError("--log-level", f"unknown level {args.log_level!r}")
    grpc_listen = parse_listen("--grpc-listen", args.grpc_listen)
    if not grpc_listen.loopback and not args.grpc_allow_remote:
        raise ConfigError(
            "--grpc-listen",
            f"{grpc_listen} is not loopback; add --grpc-allow-remote to expose the API",
        )
    metrics = parse_listen("--metrics-listen", args.metrics_listen) if args.metrics_listen else None
    if metrics is not None and not metrics.loopback and not args.metrics_allow_remote:
        raise ConfigError(
            "--metrics-listen",
            f"{metrics} is not loopback; add --metrics-allow-remote to expose metrics",
        )
    health = parse_listen("--health-listen", args.health_listen) if args.health_listen else None
    admin_problem = admin.path_problem(args.admin_socket)
    if admin_problem:
        raise ConfigError("--admin-socket", admin_problem)
    try:
        cgroup = args.cgroup or paths.cgroup2_root()
    except DataplaneError as e:
        raise ConfigError("--cgroup", str(e)) from e
    check_cgroup2("--cgroup", cgroup)
    ports = tuple(
        int(parse_number("--capture-port", p, int, 1, 65535))
        for p in (args.capture_port or layout.DEFAULT_CAPTURE_PORTS)
    )
    if len(ports) > layout.MAX_CAPTURE_PORTS:
        raise ConfigError(
            "--capture-port", f"at most {layout.MAX_CAPTURE_PORTS} ports, not {len(ports)}"
        )
    backlog_limit = int(
        parse_number("--backlog-limit", args.backlog_limit, int, 64 * 1024, (1 << 32) - 1)
    )
    stale_after = parse_number("--xds-stale-after", args.xds_stale_after, float, *STALE_AFTER_RANGE)
    node = args.node_name or env.get("NODE_NAME", "")
    xds = None
    if args.endpoints_file is not None:
        try:
            endpoints_file.load(args.endpoints_file)
        except EndpointsFileError as e:
            raise ConfigError("--endpoints-file", str(e)) from e
    else:
        if not node:
            raise ConfigError(
                "NODE_NAME", "not set (or pass --node-name): needed to pick this node's workloads"
            )
        xds = _xds_config(args, env)
    return AgentConfig(
        bpffs=args.bpffs,
        cgroup=cgroup,
        grpc_listen=grpc_listen,
        metrics_listen=metrics,
        endpoints_file=args.endpoints_file,
        xds=xds,
        node_name=node,
        log_format=log_format,
        log_level=args.log_level,
        xds_stale_after_s=stale_after,
        backlog_limit=backlog_limit,
        capture_ports=ports,
        admin_socket=args.admin_socket,
        health_listen=health,
        allow_workaround=args.allow_workaround,
    )


def _xds_config(args: argparse.Namespace, env: Mapping[str, str]) -> XdsConfig:
    overrides: dict[str, object] = {"plaintext": bool(args.xds_plaintext)}
    if args.xds_address:
        overrides["address"] = args.xds_address
    for name, hint in (
        ("XDS_ROOT_CA", "a certificate file, or SYSTEM for the OS roots"),
        ("AUTH_TOKEN", f"a token file, or {STATIC_TOKEN_PREFIX}<token>"),
    ):
        if name in env and not env[name].strip():
            raise ConfigError(name, f"is empty; set it to {hint}, or unset it for the default")
    xds = XdsConfig.from_env(env, **overrides)
    parse_listen("XDS_ADDRESS", xds.target)
    root = xds.root_cert
    if not xds.plaintext and root and root != "SYSTEM" and not Path(root).is_file():
        setting = "XDS_ROOT_CA" if "XDS_ROOT_CA" in env else f"XDS_ROOT_CA (default {root})"
        raise ConfigError(setting, f"root certificate {root} not found")
    explicit = "AUTH_TOKEN" in env
    setting = "AUTH_TOKEN" if explicit else f"AUTH_TOKEN (default {xds.token_file})"
    if xds.token is not None:
        try:
            check_token(xds.token, "the static token")
        except ConnectError as e:
            raise ConfigError("AUTH_TOKEN", str(e)) from None
    elif xds.token_file:
        if not Path(xds.token_file).exists():
            if xds.plaintext and not explicit:
                # Local development: the default token is sent only when it is there.
                return dataclasses.replace(xds, token_file=None)
            raise ConfigError(
                setting,
                f"token file {xds.token_file} not found (a static token is written "
                f"{STATIC_TOKEN_PREFIX}<token>)",
            )
        try:
            read_token(xds.token_file)
        except ConnectError as e:
            raise ConfigError(setting, str(e)) from None
    return xds
