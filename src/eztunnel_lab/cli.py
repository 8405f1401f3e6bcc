"""Command line: `eztunnel-lab <command>` (also `python -m eztunnel_lab`).

The agent's own commands are `eztunnel-plugin`'s; these are the tools around it. A
command's module (the TLS stack, the simulator, matplotlib) loads only when chosen.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from eztunnel_lab import __version__
from eztunnel_plugin.cli import dispatch

PROG = "eztunnel-lab"

# name, help, the module with add_arguments(parser), its entry point (args -> exit code)
COMMANDS: tuple[tuple[str, str, str, str], ...] = (
    ("sim", "a simulated ambient node (pods, istio-cni rules, proxy)", "eztunnel_lab.sim", "main"),
    ("demo", "build a simulated node and show splicing live", "eztunnel_lab.demo", "main"),
    (
        "fake-istiod",
        "a local delta-xDS server from a YAML file",
        "eztunnel_lab.fake_istiod",
        "main",
    ),
    ("bench", "benchmarks: plain vs spliced, side by side", "eztunnel_lab.bench.cli", "run"),
    (
        "soak",
        "byte-checked traffic through the data plane until a deadline",
        "eztunnel_lab.soak",
        "main",
    ),
)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the chosen `command` gets its arguments (and imports its module)."""
    p = argparse.ArgumentParser(
        prog=PROG, description="Simulator, demo, fake istiod and benchmarks for eztunnel-plugin."
    )
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_, module, entry in COMMANDS:
        tool = sub.add_parser(name, help=help_)
        if name == command:
            mod = importlib.import_module(module)
            mod.add_arguments(tool)
            tool.set_defaults(func=getattr(mod, entry))
    return p


def main(argv: list[str] | None = None) -> int:
    return dispatch(
        lambda args: build_parser(next((a for a in args if not a.startswith("-")), None)), argv
    )


if __name__ == "__main__":
    sys.exit(main())
