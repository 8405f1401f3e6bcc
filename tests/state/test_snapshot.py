"""Snapshot and SnapshotSource: what both endpoint sources give the reconciler."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from eztunnel_plugin.endpoints_file import StaticEndpoints
from eztunnel_plugin.reconciler import MemorySink, Reconciler
from eztunnel_plugin.state.snapshot import Snapshot, SnapshotSource
from eztunnel_plugin.state.workloads import ADDRESSES, AUTHORIZATIONS, WorkloadState
from tests.state.testlib import NODE, by_uid, workload


def test_a_snapshot_cannot_be_changed() -> None:
    snap = Snapshot(1, True, frozenset({"10.0.0.1"}))
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.version = 2  # type: ignore[misc]


def sources(tmp_path: Path) -> list[tuple[SnapshotSource, list[int]]]:
    """Both sources, each with the versions its listener heard, before any full view."""
    state = WorkloadState(NODE)
    missing = StaticEndpoints(tmp_path / "endpoints.yaml")  # not written yet
    out: list[tuple[SnapshotSource, list[int]]] = []
    for src in (state, missing):
        heard: list[int] = []
        src.subscribe(heard.append)
        out.append((src, heard))
    return out


def test_both_sources_stay_incomplete_until_a_full_view(tmp_path: Path) -> None:
    (state, state_heard), (static, static_heard) = sources(tmp_path)
    assert isinstance(state, WorkloadState) and isinstance(static, StaticEndpoints)
    sink = MemorySink({"10.9.9.9": 1})
    recs = [Reconciler(state, sink), Reconciler(static, sink)]
    state.apply_addresses(by_uid(workload("u/a", "10.0.0.1")))
    state.mark_synced(ADDRESSES)
    assert not state.snapshot().complete and not static.snapshot().complete
    assert [r.reconcile() for r in recs] == [False, False]
    assert sink.ops == []  # fail closed: nothing written by either
    state.mark_synced(AUTHORIZATIONS)
    (tmp_path / "endpoints.yaml").write_text('endpoints: ["10.0.0.2"]\n')
    assert static.reload()
    assert state.snapshot() == Snapshot(state.version, True, frozenset({"10.0.0.1"}))
    assert static.snapshot() == Snapshot(static.version, True, frozenset({"10.0.0.2"}))
    assert state_heard[-1] == state.version and static_heard == [static.version]
