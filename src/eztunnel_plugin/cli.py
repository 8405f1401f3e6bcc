"""Command line: `eztunnel-plugin <command>` (also `python -m eztunnel_plugin`)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from eztunnel_plugin import __version__, log
from eztunnel_plugin.bpf import dataplane

PROG = "eztunnel-plugin"


def _fail(message: str, code: int = 2) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def cmd_run(args: argparse.Namespace) -> int:
    from eztunnel_plugin import agent, config

    try:
        cfg = config.from_args(args, os.environ, sys.stderr.isatty())
    except config.ConfigError as e:
        return _fail(str(e))
    log.configure(cfg.log_format, cfg.log_level)  # type: ignore[arg-type]
    try:
        return agent.main(cfg)
    except dataplane.DataplaneError as e:
        return _fail(str(e), 1)
    except OSError as e:
        return _fail(f"{e}", 1)


def cmd_uninstall(args: argparse.Namespace) -> int:
    log.configure("console", "info")
    try:
        report = dataplane.uninstall(args.bpffs)
    except (dataplane.DataplaneError, OSError) as e:
        return _fail(str(e), 1)
    if not report.unpinned:
        print(f"nothing pinned under {args.bpffs}; nothing to do")
        return 0
    print(
        f"detached {', '.join(report.detached) or 'nothing'}; "
        f"unpinned {len(report.unpinned)} objects from {args.bpffs}"
    )
    if report.paired_sockets:
        print(
            f"{report.paired_sockets} spliced sockets are still open: they fall back to "
            "plain TCP and release the programs when they close"
        )
    return 0


def _client(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from eztunnel_plugin import client

        return client.COMMANDS[name](args)

    return run


def build_parser() -> argparse.ArgumentParser:
    from eztunnel_plugin import config
    from eztunnel_plugin.api import admin

    p = argparse.ArgumentParser(
        prog=PROG, description="Kernel socket splicing beside Istio ambient's ztunnel."
    )
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the node agent")
    config.add_arguments(run)
    run.set_defaults(func=cmd_run)

    un = sub.add_parser("uninstall", help="remove everything pinned, without losing bytes")
    un.add_argument("--bpffs", type=Path, default=dataplane.DEFAULT_BPFFS)
    un.set_defaults(func=cmd_uninstall)

    for name, help_ in (
        ("status", "agent, data plane and xDS status"),
        ("endpoints", "enrolled endpoints, checked against the BPF map"),
        ("flows", "spliced socket pairs"),
        ("stats", "BPF counters, with every not-paired reason"),
        ("enable", "turn splicing on (kill switch off)"),
        ("disable", "turn splicing off: new flows go through TCP"),
        ("health", "exit 0 when the agent reports SERVING (for probes)"),
    ):
        c = sub.add_parser(name, help=help_)
        c.add_argument(
            "--grpc-addr", default="127.0.0.1:15081", help="agent API address (default %(default)s)"
        )
        c.add_argument("--json", action="store_true", help="machine-readable output")
        c.add_argument("--timeout", type=float, default=5.0, help="seconds per call")
        if name == "flows":
            c.add_argument("--watch", action="store_true", help="refresh until interrupted")
            c.add_argument("--interval", type=float, default=1.0)
            c.add_argument("--limit", type=int, default=0, help="stop after N refreshes")
        if name in ("enable", "disable"):
            c.add_argument(
                "--admin-socket",
                default=str(admin.DEFAULT_SOCKET),
                help="the agent's root-only socket for state changes (default %(default)s)",
            )
        c.set_defaults(func=_client(name))
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
