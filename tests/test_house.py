"""The border between the agent (eztunnel_plugin: what the image ships) and the lab
(eztunnel_lab: the simulator, the demo, the fake istiod, the benchmarks).

The agent never imports the lab, neither package has an import cycle (function-level
imports and TYPE_CHECKING blocks included), and the agent's CLI runs with nothing but the
image's dependencies. Everything is read statically (ast) except the last check, which
runs the CLI in a fresh interpreter that cannot import anything the image lacks."""

from __future__ import annotations

import ast
import contextlib
import importlib.metadata
import importlib.util
import io
import json
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from eztunnel_lab import cli as lab_cli

from .conftest import run_isolated

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
AGENT, LAB = "eztunnel_plugin", "eztunnel_lab"
LAB_COMMANDS = ("sim", "demo", "fake-istiod", "bench")
# Installed here for the lab and the tests, never in the image.
LAB_ONLY = ("cryptography", "matplotlib", "hypothesis", LAB)


@dataclass(frozen=True)
class Import:
    target: str  # absolute dotted name; for `from m import n` both m and m.n are listed
    line: int
    type_checking: bool  # inside `if TYPE_CHECKING:`


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _dynamic_import(node: ast.Call) -> str | None:
    """The literal name given to importlib.import_module() or __import__(), if any."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if name not in ("import_module", "__import__") or not node.args:
        return None
    arg = node.args[0]
    return arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else None


def imports_of(source: str, module: str, is_package: bool = False) -> list[Import]:
    """Every import of a module wherever it is: top level, in functions and classes, under
    TYPE_CHECKING, and importlib.import_module()/__import__() with a literal name."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[Import] = []

    def absolute(level: int, name: str | None) -> str:
        if level == 0:
            return name or ""
        base = package.split(".")[: len(package.split(".")) - (level - 1)]
        return ".".join([*base, *([name] if name else [])])

    def visit(node: ast.AST, tc: bool) -> None:
        if isinstance(node, ast.If) and _type_checking(node.test):
            for stmt in node.body:
                visit(stmt, True)
            for stmt in node.orelse:
                visit(stmt, tc)
            return
        if isinstance(node, ast.Import):
            found.extend(Import(a.name, node.lineno, tc) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = absolute(node.level, node.module)
            found.append(Import(base, node.lineno, tc))
            found.extend(
                Import(f"{base}.{a.name}", node.lineno, tc) for a in node.names if a.name != "*"
            )
        elif isinstance(node, ast.Call) and (name := _dynamic_import(node)):
            found.append(Import(name, node.lineno, tc))
        for child in ast.iter_child_nodes(node):
            visit(child, tc)

    visit(ast.parse(source), False)
    return found


def module_files(package: str, src: Path = SRC) -> dict[str, Path]:
    """Hand-written modules of a package by dotted name (the generated pb/ left out)."""
    root = src / package
    out: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] == "pb":
            continue
        parts = [package, *rel.with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def import_graph(package: str, type_checking: bool, src: Path = SRC) -> dict[str, set[str]]:
    """module -> modules of the same package it imports. Importing a.b.c runs a and a.b
    first, so those count too."""
    files = module_files(package, src)
    edges: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        for imp in imports_of(path.read_text(), module, path.name == "__init__.py"):
            if imp.type_checking and not type_checking:
                continue
            parts = imp.target.split(".")
            for i in range(1, len(parts) + 1):
                target = ".".join(parts[:i])
                if target in files and target != module:
                    edges[module].add(target)
    return edges


def strongly_connected(edges: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan: the components with more than one module are the import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[set[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(edges[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp: set[str] = set()
            while True:
                w = stack.pop()
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


def a_cycle(component: set[str], edges: dict[str, set[str]]) -> list[str]:
    """The shortest cycle through the component's first module, for the failure message."""
    start = min(component)
    prev: dict[str, str] = {}
    queue = [start]
    for u in queue:  # BFS; queue grows while iterating, bounded by the component
        for w in sorted(edges[u] & component):
            if w == start:
                path = [u]
                while path[-1] != start:
                    path.append(prev[path[-1]])
                return [*reversed(path), start]
            if w not in prev:
                prev[w] = u
                queue.append(w)
    raise AssertionError(f"{component} is not strongly connected")


def cycles(package: str, type_checking: bool, src: Path = SRC) -> list[str]:
    edges = import_graph(package, type_checking, src)
    return [" -> ".join(a_cycle(c, edges)) for c in strongly_connected(edges)]


# ---- the checks check what they claim ------------------------------------------------

SAMPLE = """\
import importlib
import typing
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from eztunnel_lab import sim
if typing.TYPE_CHECKING:
    import eztunnel_lab.demo
else:
    import json


def lazy() -> None:
    from eztunnel_lab.bench import metric
    import eztunnel_lab.netlab as n


class Late:
    def load(self) -> None:
        importlib.import_module("eztunnel_lab.measure")
        __import__("eztunnel_lab.cli")


from . import sibling
from ..pb import thing
"""


def test_import_scan_sees_lazy_type_checking_and_dynamic_imports() -> None:
    got = {(i.target, i.line, i.type_checking) for i in imports_of(SAMPLE, "eztunnel_plugin.x.m")}
    lab = {t for t in got if t[0].startswith(LAB)}
    assert lab == {
        (LAB, 6, True),
        (f"{LAB}.sim", 6, True),
        (f"{LAB}.demo", 8, True),
        (f"{LAB}.bench", 14, False),
        (f"{LAB}.bench.metric", 14, False),
        (f"{LAB}.netlab", 15, False),
        (f"{LAB}.measure", 20, False),
        (f"{LAB}.cli", 21, False),
    }
    assert ("json", 10, False) in got  # the else branch of TYPE_CHECKING runs
    assert ("eztunnel_plugin.x.sibling", 24, False) in got
    assert ("eztunnel_plugin.pb.thing", 25, False) in got


def test_cycle_finder_finds_lazy_and_type_checking_cycles(tmp_path: Path) -> None:
    pkg = tmp_path / "pkgx"
    pkg.mkdir()
    files = {
        "__init__.py": "",
        "a.py": "def f() -> None:\n    from pkgx import b\n",
        "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkgx.a import f\n",
        "c.py": "import pkgx.a\n",
        "d.py": "from . import e\n",
        "e.py": "def g() -> None:\n    import pkgx.d\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    assert cycles("pkgx", False, tmp_path) == ["pkgx.d -> pkgx.e -> pkgx.d"]
    assert sorted(cycles("pkgx", True, tmp_path)) == [
        "pkgx.a -> pkgx.b -> pkgx.a",
        "pkgx.d -> pkgx.e -> pkgx.d",
    ]


# ---- the border ----------------------------------------------------------------------


def test_agent_never_imports_the_lab() -> None:
    files = sorted((SRC / AGENT).rglob("*.py"))
    assert len(files) > 10
    offenders = []
    for path in files:
        source = path.read_text()
        for imp in imports_of(source, AGENT):
            if imp.target == LAB or imp.target.startswith(f"{LAB}."):
                offenders.append(f"{path.relative_to(ROOT)}:{imp.line}: imports {imp.target}")
        # `python -m eztunnel_lab...` in a subprocess is a dependency too.
        for node in ast.walk(ast.parse(source)):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and re.fullmatch(rf"{LAB}(\.\w+)*", node.value)
            ):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not offenders, "the agent must not depend on the lab:\n" + "\n".join(offenders)


@pytest.mark.parametrize("package", [AGENT, LAB])
def test_no_import_cycle_at_runtime(package: str) -> None:
    found = cycles(package, type_checking=False)
    assert not found, "import cycles (function-level imports included):\n" + "\n".join(found)


@pytest.mark.parametrize("package", [LAB, AGENT])
def test_no_import_cycle_under_type_checking(package: str) -> None:
    found = cycles(package, type_checking=True)
    assert not found, "import cycles (TYPE_CHECKING included):\n" + "\n".join(found)


# ---- the API sees the agent through its view only -------------------------------------

API = f"{AGENT}.api"


def test_the_api_never_imports_the_agent_module() -> None:
    """inspector, admin and metrics get an api.view.AgentView, never the Agent: no import
    of the agent module from api/, not even under TYPE_CHECKING."""
    files = {m: p for m, p in module_files(AGENT).items() if m == API or m.startswith(f"{API}.")}
    assert {f"{API}.inspector", f"{API}.admin", f"{API}.metrics", f"{API}.view"} <= set(files)
    offenders = [
        f"{module}:{imp.line}: {imp.target}"
        for module, path in files.items()
        for imp in imports_of(path.read_text(), module, path.name == "__init__.py")
        if imp.target == f"{AGENT}.agent" or imp.target.startswith(f"{AGENT}.agent.")
    ]
    assert not offenders, "the API imports the agent:\n" + "\n".join(offenders)


# ---- one module for errors -------------------------------------------------------------

ERRORS = f"{AGENT}.errors"


def agent_modules() -> dict[str, Path]:
    """Every hand-written module but __main__ (importing it runs the CLI)."""
    return {m: p for m, p in module_files(AGENT).items() if p.name != "__main__.py"}


def test_every_exception_class_lives_in_errors() -> None:
    from eztunnel_plugin import errors

    strays = []
    for module in agent_modules():
        mod = importlib.import_module(module)
        for name, obj in vars(mod).items():
            if (
                isinstance(obj, type)
                and issubclass(obj, BaseException)
                and obj.__module__ == module
                and module != ERRORS
            ):
                strays.append(f"{module}.{name}")
    assert not strays, "exception classes outside errors.py:\n" + "\n".join(strays)

    classes = {
        name: obj
        for name, obj in vars(errors).items()
        if isinstance(obj, type) and issubclass(obj, BaseException)
    }
    assert {"EztunnelError", "ConfigError", "DataplaneError", "BpfError", "Rejected"} <= set(
        classes
    )
    for name, cls in classes.items():
        assert issubclass(cls, errors.EztunnelError), name
        assert cls.__doc__ and cls.__doc__.strip(), f"{name} has no docstring"
    # A leaf: any module may import it without making a cycle.
    own = imports_of((SRC / AGENT / "errors.py").read_text(), ERRORS)
    assert not [i.target for i in own if i.target.startswith(AGENT)]


# ---- tests mirror the agent package ----------------------------------------------------

TESTS = ROOT / "tests"


def mirrored_test(module: str) -> Path:
    """eztunnel_plugin.api.inspector -> tests/api/test_inspector.py."""
    *packages, leaf = module.split(".")[1:]
    return TESTS.joinpath(*packages, f"test_{leaf}.py")


def test_mirror_maps_modules_to_test_files() -> None:
    assert mirrored_test(f"{AGENT}.api.inspector") == TESTS / "api" / "test_inspector.py"
    assert mirrored_test(f"{AGENT}.cli") == TESTS / "test_cli.py"
    assert mirrored_test(f"{AGENT}.bpf.maps") == TESTS / "bpf" / "test_maps.py"


def test_every_agent_module_has_its_mirrored_test_file() -> None:
    modules = [m for m, p in agent_modules().items() if p.name != "__init__.py"]
    assert f"{AGENT}.agent" in modules and f"{AGENT}.api.view" in modules
    missing = [
        f"{m} -> {mirrored_test(m).relative_to(ROOT)}"
        for m in modules
        if not mirrored_test(m).is_file()
    ]
    assert not missing, "modules without their test file:\n" + "\n".join(missing)
    # A sub-directory of tests/ is a package too: equal basenames would clash otherwise.
    for test_dir in {mirrored_test(m).parent for m in modules}:
        assert (test_dir / "__init__.py").is_file(), f"{test_dir} has no __init__.py"


# ---- the agent's CLI in the image ---------------------------------------------------


def agent_runtime_distributions() -> set[str]:
    """The agent's [project] dependencies and all they require, markers evaluated here."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    dists: set[str] = set()
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [Requirement(r) for r in project["dependencies"]]
    todo = [r for r in todo if r.marker is None or r.marker.evaluate({"extra": ""})]
    while todo:
        req = todo.pop()
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        dists.add(key[0])
        for text in importlib.metadata.requires(req.name) or []:
            sub = Requirement(text)
            extras = ("", *req.extras)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in extras):
                todo.append(sub)
    return dists


PROBE = r"""
import argparse, contextlib, importlib.abc, io, json, sys

ALLOWED = set(json.loads(sys.argv[1]))
blocked = []


class ImageOnly(importlib.abc.MetaPathFinder):
    # The image has the standard library, the agent and the agent's dependencies.
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in ALLOWED or top in sys.stdlib_module_names:
            return None
        blocked.append(name)
        raise ModuleNotFoundError(f"No module named {name!r} (not in the image)", name=name)


sys.meta_path.insert(0, ImageOnly())
from eztunnel_plugin import cli
def run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as e:
            code = e.code
    return {"argv": argv, "code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


def absent(name):
    try:
        __import__(name)
    except ModuleNotFoundError:
        return True
    return False


parser = cli.build_parser()
commands = [
    c for a in parser._actions if isinstance(a, argparse._SubParsersAction) for c in a.choices
]
runs = [run(["--help"])] + [run([c, "--help"]) for c in commands]
result = {"commands": commands, "runs": runs, "blocked": sorted(set(blocked))}
result["absent"] = {n: absent(n) for n in json.loads(sys.argv[2])}
print(json.dumps(result))
"""


def test_agent_cli_runs_with_only_the_image_dependencies(tmp_path: Path) -> None:
    owners = importlib.metadata.packages_distributions()
    dists = agent_runtime_distributions()
    allowed = {top for top, by in owners.items() if any(canonicalize_name(d) in dists for d in by)}
    allowed.add(AGENT)
    assert {"grpc", "google", "yaml", "structlog"} <= allowed
    for name in LAB_ONLY:
        # Installed here: the probe's "absent" proves the blocker, not a lucky venv.
        assert importlib.util.find_spec(name) is not None, name
        assert name not in allowed, f"{name} is a dependency of the agent"
    got = run_probe(tmp_path, PROBE, json.dumps(sorted(allowed)), json.dumps(LAB_ONLY))
    assert got["absent"] == dict.fromkeys(LAB_ONLY, True)
    assert {"run", "uninstall", "status", "health"} <= set(got["commands"])
    assert not set(got["commands"]) & set(LAB_COMMANDS), got["commands"]
    for run in got["runs"]:
        assert run["code"] == 0, f"{run['argv']}: exit {run['code']}\n{run['stderr']}"
        assert "Traceback" not in run["stderr"]
        assert run["stdout"].startswith("usage: eztunnel-plugin"), run
    top = got["runs"][0]["stdout"]
    for command in LAB_COMMANDS:
        assert not re.search(rf"^\s+{re.escape(command)}\b", top, re.M), top


# ---- what the agent's daemon loads ------------------------------------------------------


def run_probe(cwd: Path, code: str, *args: str) -> Any:
    """Run `code` in a fresh, isolated interpreter; its stdout parsed as JSON."""
    return json.loads(run_isolated(code, *args, cwd=cwd))


# Never on the daemon's path, each resident memory for nothing the daemon uses: _hashlib
# maps libcrypto's digests and ssl libssl too (lazyssl.py: prometheus_client's exposition
# module imports ssl), yaml reads only a static endpoints file, rich only draws the CLI's
# live view. Without --metrics-listen, no prometheus_client either.
DAEMON_NEVER = ("_hashlib", "ssl", "_ssl", "yaml", "rich")
DAEMON_WITHOUT_METRICS_NEVER = (*DAEMON_NEVER, "prometheus_client")

DAEMON_PROBE = r"""
import json, sys
from eztunnel_plugin import agent, cli, config  # `run`
from eztunnel_plugin.api import health  # --health-listen
if sys.argv[2] == "metrics":
    from eztunnel_plugin.api import metrics  # --metrics-listen
print(json.dumps(sorted(m for m in json.loads(sys.argv[1]) if m in sys.modules)))
"""


@pytest.mark.parametrize(
    ("flags", "never"),
    [("metrics", DAEMON_NEVER), ("no-metrics", DAEMON_WITHOUT_METRICS_NEVER)],
)
def test_the_daemon_path_loads_no_module_it_does_not_use(
    tmp_path: Path, flags: str, never: tuple[str, ...]
) -> None:
    assert run_probe(tmp_path, DAEMON_PROBE, json.dumps(never), flags) == []


# ---- the lab's CLI ---------------------------------------------------------------------


LAB_FLAGS = {
    "sim": ("--pods", "--no-agent", "--check", "--duration"),
    "demo": ("--seconds",),
    "fake-istiod": ("--workloads", "--listen", "--tls-cert", "--tls-key", "--poll-interval"),
    "bench": ("--rounds", "--seconds", "--out", "dataplane", "xds", "ambient", "all"),
}


def _lab(argv: list[str]) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            code = lab_cli.main(argv)
        except SystemExit as e:
            code = int(e.code or 0)
    return code, out.getvalue()


def test_lab_cli_has_the_lab_commands_with_their_flags() -> None:
    code, top = _lab(["--help"])
    assert code == 0 and top.startswith("usage: eztunnel-lab")
    assert set(LAB_FLAGS) == set(LAB_COMMANDS)
    for command, flags in LAB_FLAGS.items():
        assert re.search(rf"^\s+{re.escape(command)}\b", top, re.M), top
        code, text = _lab([command, "--help"])
        assert code == 0, text
        for flag in flags:
            assert flag in text, f"eztunnel-lab {command}: no {flag}\n{text}"


@pytest.mark.parametrize("module", [LAB, f"{LAB}.bench"])
def test_lab_runs_as_a_module(module: str) -> None:
    r = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: eztunnel-lab")
