"""C and Python can never drift: layout.py against the BTF of the compiled object."""

from __future__ import annotations

import ctypes
import json
import platform
import subprocess
from pathlib import Path
from typing import Any

import pytest

from eztunnel_plugin.bpf import dataplane, layout

REPO = Path(__file__).resolve().parent.parent

Btf = dict[tuple[str, str], dict[str, Any]]


def read_btf(obj: Path) -> Btf:
    """(kind, name) -> BTF type: a map variable and its value struct may share a name."""
    out = subprocess.run(
        ["bpftool", "-j", "btf", "dump", "file", str(obj)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {(t["kind"], t["name"]): t for t in json.loads(out)["types"] if t.get("name")}


@pytest.fixture(scope="module")
def btf() -> Btf:
    return read_btf(dataplane.default_object())


def check_struct(btf: Btf, name: str) -> None:
    c_struct = btf["STRUCT", name]
    mirror = layout.STRUCTS[name]
    assert ctypes.sizeof(mirror) == c_struct["size"]
    c_fields = [(m["name"], m["bits_offset"] // 8) for m in c_struct["members"]]
    py_fields = [(f[0], getattr(mirror, f[0]).offset) for f in mirror._fields_]
    assert py_fields == c_fields


@pytest.mark.parametrize("name", sorted(layout.STRUCTS))
def test_struct_matches_btf(btf: Btf, name: str) -> None:
    check_struct(btf, name)


def test_arm64_object_builds_with_the_same_layout(tmp_path: Path) -> None:
    # The Makefile derives the BPF target architecture from the machine; an arm64
    # node's object must compile and share every layout with this one.
    out = tmp_path / "arm64.bpf.o"
    proc = subprocess.run(
        ["make", "-s", "--no-print-directory", "bpf-object", f"BPF_OUT={out}", "ARCH=arm64"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    arm64 = read_btf(out)
    for name in layout.STRUCTS:
        check_struct(arm64, name)
    for name, values in layout.ENUMS.items():
        assert {v["name"]: v["val"] for v in arm64["ENUM", name]["values"]} == values


@pytest.mark.parametrize("name", sorted(layout.ENUMS))
def test_enum_matches_btf(btf: Btf, name: str) -> None:
    values = {v["name"]: v["val"] for v in btf["ENUM", name]["values"]}
    assert values == layout.ENUMS[name]


def test_every_map_is_mirrored(btf: Btf) -> None:
    # .maps section variables are the maps the loader pins; each needs sizes here.
    maps = {name for kind, name in btf if kind == "VAR" and name.startswith("ez_")}
    maps.discard("ez_anchor")
    assert maps == set(layout.MAPS)


def test_counter_names_are_unique_and_dense() -> None:
    assert [c.value for c in layout.Counter] == list(range(layout.COUNTER_MAX))


def test_bpf_target_arch_follows_the_machine(tmp_path: Path) -> None:
    want = {"x86_64": "x86", "aarch64": "arm64"}.get(platform.machine())
    if want is None:
        pytest.skip(f"no expectation for {platform.machine()}")
    out = subprocess.run(
        ["make", "-n", "--no-print-directory", "bpf-object", f"BPF_OUT={tmp_path / 'x.o'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert f"-D__TARGET_ARCH_{want} " in out, out
