"""The decode comparison bench: ours alone when envoy-data-plane is absent (and it says so),
both columns through --envoy-python, and one clear line when the other side fails."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from eztunnel_lab.bench import envoy_decode

SRC = Path(__file__).resolve().parents[1] / "src"

# A stand-in for envoy_data_plane: its DeltaDiscoveryResponse.parse, backed by our modules,
# optionally losing the last resource (a decoder that decodes something else).
FAKE = """
from eztunnel_plugin.pb.envoy.service.discovery.v3 import discovery_pb2

class DeltaDiscoveryResponse:
    @staticmethod
    def parse(raw):
        resp = discovery_pb2.DeltaDiscoveryResponse.FromString(raw)
        if {drop}:
            del resp.resources[-1]
        return resp
"""


def fake_envoy_python(tmp_path: Path, drop: bool = False) -> str:
    pkg = tmp_path / "site" / "envoy_data_plane" / "envoy" / "service" / "discovery" / "v3"
    pkg.mkdir(parents=True)
    for d in (pkg, *pkg.parents):
        if d == tmp_path / "site":
            break
        (d / "__init__.py").touch()
    (pkg / "__init__.py").write_text(FAKE.format(drop=drop))
    python = tmp_path / "python"
    python.write_text(
        f'#!/bin/sh\nPYTHONPATH={tmp_path / "site"}:{SRC} exec {sys.executable} "$@"\n'
    )
    python.chmod(0o755)
    return str(python)


def test_ours_alone_says_why(capsys: pytest.CaptureFixture[str]) -> None:
    # The project's venv must never carry it: the bench installs it elsewhere.
    assert importlib.util.find_spec("envoy_data_plane") is None
    assert envoy_decode.main(["--resources", "50", "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("50-resource DeltaDiscoveryResponse")
    assert "envoy-data-plane is not importable here" in out
    assert " n/a" in out and "ms" in out.splitlines()[2]


def test_both_columns_through_another_python(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    python = fake_envoy_python(tmp_path)
    assert envoy_decode.main(["--resources", "40", "--rounds", "2", "--json",
                              "--envoy-python", python]) == 0  # fmt: skip
    got = json.loads(capsys.readouterr().out)
    assert got["resources"] == 40 and got["envoy_python"] == python
    for side in ("ours", "envoy"):
        assert got[side]["resources"] == 40
        assert got[side]["envelope_ms"] > 0 and got[side]["import_rss_mb"] >= 0
    assert got["ours"]["full_ms"] > 0 and "full_ms" not in got["envoy"]
    text = envoy_decode.report(got)
    assert "envoy-data-plane / ours, envelope:" in text and "no such type" in text


def test_a_decoder_that_decodes_something_else_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    python = fake_envoy_python(tmp_path, drop=True)
    code = envoy_decode.main(["--resources", "20", "--rounds", "1", "--envoy-python", python])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("envoy_decode: envoy-data-plane decoded something else")
    assert len(err.strip().splitlines()) == 1


def test_a_missing_python_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "nope" / "python")
    code = envoy_decode.main(["--resources", "10", "--rounds", "1", "--envoy-python", missing])
    captured = capsys.readouterr()
    assert code == 1 and captured.out == ""
    assert captured.err.strip() == f"envoy_decode: cannot run {missing}: No such file or directory"
