"""Command line: `eztunnel-plugin <command>` (also `python -m eztunnel_plugin`)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from eztunnel_plugin import __version__, log
from eztunnel_plugin.bpf import loader, paths
from eztunnel_plugin.errors import ConfigError, DataplaneError

PROG = "eztunnel-plugin"


def _fail(message: str, code: int = 2) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def cmd_run(args: argparse.Namespace) -> int:
    from eztunnel_plugin import agent, config

    try:
        cfg = config.from_args(args, os.environ, sys.stderr.isatty())
    except ConfigError as e:
        return _fail(str(e))
    log.configure(cfg.log_format, cfg.log_level)  # type: ignore[arg-type]
    try:
        return agent.main(cfg)
    except DataplaneError as e:
        return _fail(str(e), 1)
    except OSError as e:
        return _fail(f"{e}", 1)


def cmd_uninstall(args: argparse.Namespace) -> int:
    log.configure("console", "info")
    try:
        report = loader.uninstall(args.bpffs)
    except (DataplaneError, OSError) as e:
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


def cmd_selftest(args: argparse.Namespace) -> int:
    """The kernel self-test the agent runs at start, on demand: exit 0 when this kernel may
    splice (with or without the SK_SKB workaround), 1 when it may not."""
    import dataclasses
    import json

    from eztunnel_plugin import client, selftest

    if args.object is not None and not args.object.is_file():
        return _fail(f"--object: {args.object} is not a file")
    log.configure("console", "warning")
    st = selftest.run(args.object, allow_workaround=args.allow_workaround)
    if args.json:
        print(json.dumps(dataclasses.asdict(st), indent=2))
    else:
        rows = selftest.result_rows(st.checks)
        print(client.table(("CHECK", "WITHOUT WORKAROUND", "WITH SK_SKB WORKAROUND"), rows))
        listed = " (known to lose epoll wakeups without the workaround)" if st.kernel_listed else ""
        print(f"\nkernel:    {st.kernel}{listed}")
        print(f"ran in:    {st.environment or '-'} ({st.duration_s:.2f} s)")
        print(f"decision:  {st.decision}")
        print(f"reason:    {st.reason}")
    return 1 if st.decision == selftest.NO_SPLICE else 0


def _client(name: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        from eztunnel_plugin import client

        return client.COMMANDS[name](args)

    return run


def _bounded(kind: Callable[[str], float], low: float, high: float) -> Callable[[str], float]:
    """An argparse type: a number of `kind` within [low, high], or one clear error."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        if not low <= value <= high:  # also refuses nan
            raise argparse.ArgumentTypeError(f"{text} is not within {low:g} to {high:g}")
        return value

    parse.__name__ = kind.__name__
    return parse


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
    un.add_argument("--bpffs", type=Path, default=paths.DEFAULT_BPFFS)
    un.set_defaults(func=cmd_uninstall)

    st = sub.add_parser(
        "selftest",
        help="the kernel self-test the agent runs at start: exit 0 if this kernel may splice",
    )
    st.add_argument(
        "--object", type=Path, default=None, help="BPF object to test (default: the packaged one)"
    )
    config.add_workaround_arguments(st, "decide as an agent run with --refuse-workaround would")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=cmd_selftest)

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
            c.add_argument(
                "--watch", action="store_true", help="a live view, refreshed until Ctrl-C"
            )
            c.add_argument(
                "--interval", type=_bounded(float, 0.1, 3600), default=1.0,
                help="seconds between refreshes, 0.1 to 3600 (default %(default)s)",
            )  # fmt: skip
            c.add_argument(
                "--limit", type=_bounded(int, 0, 1_000_000), default=0,
                help="stop after N refreshes, at most 1000000 (default 0: until Ctrl-C)",
            )  # fmt: skip
            c.add_argument(
                "--top", type=_bounded(int, 1, 1000), default=20,
                help="flows the live view lists, fastest first, 1 to 1000 (default %(default)s)",
            )  # fmt: skip
        if name in ("enable", "disable"):
            c.add_argument(
                "--admin-socket",
                default=str(admin.DEFAULT_SOCKET),
                help="the agent's root-only socket for state changes (default %(default)s)",
            )
        c.set_defaults(func=_client(name))
    return p


def dispatch(
    parser_for: Callable[[list[str]], argparse.ArgumentParser], argv: Sequence[str] | None = None
) -> int:
    """main() of a CLI whose commands set `func` (args -> exit code), shared with the
    lab's: parse argv (default: sys.argv[1:]) with `parser_for(argv)`, run the chosen
    command and return its exit code; Ctrl-C ends it with 130 and no traceback."""
    args_list = sys.argv[1:] if argv is None else list(argv)
    args = parser_for(args_list).parse_args(args_list)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return 130
    return code


def main(argv: Sequence[str] | None = None) -> int:
    return dispatch(lambda _: build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
