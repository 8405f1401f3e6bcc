"""The agent's command line in process: its commands and flags, the main() dispatch it
shares with the lab's CLI, and one clear line (never a traceback) for every failure."""

from __future__ import annotations

import argparse
import sys
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from eztunnel_lab import cli as lab_cli
from eztunnel_plugin import __version__, agent, cli, client
from eztunnel_plugin.api import admin
from eztunnel_plugin.bpf import loader
from eztunnel_plugin.errors import DataplaneError

COMMANDS = ("run", "uninstall", "selftest", "status", "endpoints", "flows", "stats", "enable",
            "disable", "health")  # fmt: skip


@pytest.fixture(autouse=True)
def fresh_structlog() -> Iterator[None]:
    yield
    structlog.reset_defaults()  # `run` and `uninstall` configure logging for the process


def commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_the_commands_and_their_flags() -> None:
    parsed = commands(cli.build_parser())
    assert tuple(parsed) == COMMANDS
    flows = cli.build_parser().parse_args(["flows", "--watch", "--limit", "3"])
    assert (flows.watch, flows.limit, flows.grpc_addr, flows.json) == (True, 3, "127.0.0.1:15081",
                                                                       False)  # fmt: skip
    off = cli.build_parser().parse_args(["disable"])
    assert off.admin_socket == str(admin.DEFAULT_SOCKET)
    assert cli.build_parser().parse_args(["uninstall"]).bpffs == Path("/sys/fs/bpf/eztunnel")


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"eztunnel-plugin {__version__}"


# ---- the shared dispatch -----------------------------------------------------------------


def parser_with(func: object) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="x")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("go").set_defaults(func=func)
    return p


def test_dispatch_returns_the_commands_exit_code() -> None:
    seen: list[argparse.Namespace] = []

    def go(args: argparse.Namespace) -> int:
        seen.append(args)
        return 7

    asked: list[list[str]] = []

    def parser_for(argv: list[str]) -> argparse.ArgumentParser:
        asked.append(argv)
        return parser_with(go)

    assert cli.dispatch(parser_for, ["go"]) == 7
    assert asked == [["go"]] and seen[0].command == "go"


def test_dispatch_reads_sys_argv_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["x", "go"])
    assert cli.dispatch(lambda _: parser_with(lambda _args: 3)) == 3


def test_ctrl_c_is_exit_130_without_a_traceback() -> None:
    def interrupted(args: argparse.Namespace) -> int:
        raise KeyboardInterrupt

    assert cli.dispatch(lambda _: parser_with(interrupted), ["go"]) == 130


def test_the_lab_cli_dispatches_through_the_same_helper(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("fake_lab_tool")
    calls: list[str] = []

    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--flag", default="d")

    def main(args: argparse.Namespace) -> int:
        calls.append(args.flag)
        if args.flag == "interrupt":
            raise KeyboardInterrupt
        return 5

    fake.add_arguments = add_arguments  # type: ignore[attr-defined]
    fake.main = main  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_lab_tool", fake)
    monkeypatch.setattr(lab_cli, "COMMANDS", (("tool", "a tool", "fake_lab_tool", "main"),))
    used: list[object] = []

    def spy(*args: Any) -> int:
        used.append(args)
        return cli.dispatch(*args)

    monkeypatch.setattr(lab_cli, "dispatch", spy)
    assert lab_cli.main(["tool", "--flag", "x"]) == 5
    assert lab_cli.main(["tool", "--flag", "interrupt"]) == 130
    assert calls == ["x", "interrupt"] and len(used) == 2


# ---- run and uninstall: one line, the right exit code ----------------------------------------


def test_a_bad_setting_is_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "--grpc-listen", "nonsense", "--endpoints-file", "/dev/null"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        "eztunnel-plugin: error: --grpc-listen: expected HOST:PORT, got 'nonsense'"
    ]


FAILURES = [
    DataplaneError("no cgroup2 filesystem is mounted"),
    PermissionError(1, "Operation not permitted"),
]


@pytest.mark.parametrize("error", FAILURES)
def test_a_failing_agent_is_one_line_and_exit_1(
    error: Exception, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    def fail(cfg: object) -> int:
        raise error

    monkeypatch.setattr(agent, "main", fail)
    eps = tmp_path / "eps.yaml"
    eps.write_text("endpoints: []")
    argv = ["run", "--endpoints-file", str(eps), "--admin-socket", str(tmp_path / "a.sock"),
            "--log-format", "json"]  # fmt: skip
    assert cli.main(argv) == 1
    assert capsys.readouterr().err.splitlines()[-1] == f"eztunnel-plugin: error: {error}"


def test_uninstall_reports_what_it_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    reports = [
        loader.UninstallReport(tmp_path, [], [], 0),
        loader.UninstallReport(tmp_path, ["link_sockops", "link_msg"], ["a", "b", "c"], 2),
    ]
    monkeypatch.setattr(loader, "uninstall", lambda bpffs: reports.pop(0))
    assert cli.main(["uninstall", "--bpffs", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"nothing pinned under {tmp_path}; nothing to do\n"
    assert cli.main(["uninstall", "--bpffs", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"detached link_sockops, link_msg; unpinned 3 objects from {tmp_path}",
        "2 spliced sockets are still open: they fall back to plain TCP and release the "
        "programs when they close",
    ]


def test_uninstall_failure_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def refuse(bpffs: Path) -> loader.UninstallReport:
        raise DataplaneError(f"{bpffs} is not a bpf filesystem")

    monkeypatch.setattr(loader, "uninstall", refuse)
    assert cli.main(["uninstall", "--bpffs", str(tmp_path)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"eztunnel-plugin: error: {tmp_path} is not a bpf filesystem"
    ]


def test_inspection_commands_run_the_client(monkeypatch: pytest.MonkeyPatch) -> None:
    got: list[tuple[str, str]] = []

    def fake(name: str) -> Callable[[argparse.Namespace], int]:
        def run(args: argparse.Namespace) -> int:
            got.append((name, args.grpc_addr))
            return 4

        return run

    for name in ("status", "endpoints", "flows", "stats", "enable", "disable", "health"):
        monkeypatch.setitem(client.COMMANDS, name, fake(name))
    assert cli.main(["stats", "--grpc-addr", "127.0.0.1:1"]) == 4
    assert cli.main(["health"]) == 4
    assert got == [("stats", "127.0.0.1:1"), ("health", "127.0.0.1:15081")]
