"""Fixtures of the BPF tests (the lab, `dp` and the traffic helpers are in tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

Mount = Callable[[Path, str], Path]

REPO = Path(__file__).resolve().parents[2]


def build_object(out: Path, *make_vars: str) -> Path:
    """This tree's BPF object with the Makefile's flags, built to `out`; `make_vars` such as
    ARCH=arm64 or BPF_DEFINES=-DNAME change what it builds."""
    proc = subprocess.run(
        ["make", "-s", "--no-print-directory", "bpf-object", f"BPF_OUT={out}", *make_vars],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Mount]:
    """mount(dir, fstype): a fresh filesystem instance at dir (created); fstype "bind:<src>"
    bind-mounts src there instead. Unmounted at the end, last first."""
    if os.geteuid() != 0:
        pytest.fail("these tests mount bpffs: they need root")
    mounted: list[Path] = []

    def do(path: Path, fstype: str) -> Path:
        assert path.is_relative_to(tmp_path), "mount only below the test's own tmp dir"
        path.mkdir(parents=True, exist_ok=True)
        if fstype.startswith("bind:"):
            argv = ["mount", "--bind", fstype.removeprefix("bind:"), str(path)]
        else:
            argv = ["mount", "-t", fstype, fstype, str(path)]
        subprocess.run(argv, check=True, capture_output=True, timeout=30)
        mounted.append(path)
        return path

    yield do
    for path in reversed(mounted):
        # Unmounting drops a private bpffs instance with whatever is still pinned in it.
        done = subprocess.run(["umount", str(path)], check=False, capture_output=True, timeout=30)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=False, timeout=30)
