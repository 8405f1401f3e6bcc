"""C and Python can never drift: layout.py against the BTF of the compiled object."""

from __future__ import annotations

import ctypes
import json
import subprocess
from typing import Any

import pytest

from eztunnel_plugin import dataplane, layout


@pytest.fixture(scope="module")
def btf() -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) -> BTF type: a map variable and its value struct may share a name."""
    out = subprocess.run(
        ["bpftool", "-j", "btf", "dump", "file", str(dataplane.default_object())],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {(t["kind"], t["name"]): t for t in json.loads(out)["types"] if t.get("name")}


@pytest.mark.parametrize("name", sorted(layout.STRUCTS))
def test_struct_matches_btf(btf: dict[tuple[str, str], dict[str, Any]], name: str) -> None:
    c_struct = btf["STRUCT", name]
    mirror = layout.STRUCTS[name]
    assert ctypes.sizeof(mirror) == c_struct["size"]
    c_fields = [(m["name"], m["bits_offset"] // 8) for m in c_struct["members"]]
    py_fields = [(f[0], getattr(mirror, f[0]).offset) for f in mirror._fields_]
    assert py_fields == c_fields


@pytest.mark.parametrize("name", sorted(layout.ENUMS))
def test_enum_matches_btf(btf: dict[tuple[str, str], dict[str, Any]], name: str) -> None:
    values = {v["name"]: v["val"] for v in btf["ENUM", name]["values"]}
    assert values == layout.ENUMS[name]


def test_every_map_is_mirrored(btf: dict[tuple[str, str], dict[str, Any]]) -> None:
    # .maps section variables are the maps the loader pins; each needs sizes here.
    maps = {name for kind, name in btf if kind == "VAR" and name.startswith("ez_")}
    maps.discard("ez_anchor")
    assert maps == set(layout.MAPS)


def test_counter_names_are_unique_and_dense() -> None:
    assert [c.value for c in layout.Counter] == list(range(layout.COUNTER_MAX))
