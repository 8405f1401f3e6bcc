"""`eztunnel-plugin run` settings: flags plus the environment ztunnel's chart sets.

Every bad or missing setting becomes one ConfigError naming the setting; the
CLI prints it on one line and exits 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from eztunnel_plugin import dataplane, endpoints_file, layout
from eztunnel_plugin.xds_client import XdsConfig


class ConfigError(ValueError):
    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting}: {problem}")
        self.setting = setting


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


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--bpffs",
        type=Path,
        default=dataplane.DEFAULT_BPFFS,
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
        "--metrics-listen",
        default=None,
        help="Prometheus metrics address HOST:PORT (off by default)",
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
    p.add_argument(
        "--xds-stale-after",
        type=float,
        default=60.0,
        help="seconds without a live xDS stream before health turns NOT_SERVING",
    )
    p.add_argument(
        "--capture-port",
        type=int,
        action="append",
        default=None,
        help="outbound capture port (repeatable, default 15001)",
    )
    p.add_argument(
        "--backlog-limit",
        type=int,
        default=layout.DEFAULT_BACKLOG_LIMIT,
        help="unread bytes a spliced peer may hold before its sender falls back to TCP "
        "(default %(default)s)",
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
    try:
        cgroup = args.cgroup or dataplane.cgroup2_root()
    except dataplane.DataplaneError as e:
        raise ConfigError("--cgroup", str(e)) from e
    if not cgroup.is_dir():
        raise ConfigError("--cgroup", f"{cgroup} is not a directory")
    ports = tuple(args.capture_port or layout.DEFAULT_CAPTURE_PORTS)
    if any(not 0 < p < 65536 for p in ports) or len(ports) > layout.MAX_CAPTURE_PORTS:
        raise ConfigError("--capture-port", f"invalid ports {list(ports)}")
    if not 64 * 1024 <= args.backlog_limit < 1 << 32:
        raise ConfigError(
            "--backlog-limit", f"must be 65536..4294967295 bytes, not {args.backlog_limit}"
        )
    node = args.node_name or env.get("NODE_NAME", "")
    xds = None
    if args.endpoints_file is not None:
        try:
            endpoints_file.load(args.endpoints_file)
        except endpoints_file.EndpointsFileError as e:
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
        xds_stale_after_s=args.xds_stale_after,
        backlog_limit=args.backlog_limit,
        capture_ports=ports,
    )


def _xds_config(args: argparse.Namespace, env: Mapping[str, str]) -> XdsConfig:
    overrides: dict[str, object] = {"plaintext": bool(args.xds_plaintext)}
    if args.xds_address:
        overrides["address"] = args.xds_address
    xds = XdsConfig.from_env(env, **overrides)
    parse_listen("XDS_ADDRESS", xds.target)
    if xds.plaintext:
        # Local development: send a token only when one is actually there.
        if xds.token_file and not Path(xds.token_file).is_file():
            xds = dataclasses.replace(xds, token_file=None)
        return xds
    root = xds.root_cert
    if root and root != "SYSTEM" and not Path(root).is_file():
        setting = "XDS_ROOT_CA" if "XDS_ROOT_CA" in env else f"XDS_ROOT_CA (default {root})"
        raise ConfigError(setting, f"root certificate {root} not found")
    if xds.token is None and xds.token_file and not Path(xds.token_file).is_file():
        setting = "AUTH_TOKEN" if "AUTH_TOKEN" in env else f"AUTH_TOKEN (default {xds.token_file})"
        raise ConfigError(setting, f"token file {xds.token_file} not found")
    return xds
