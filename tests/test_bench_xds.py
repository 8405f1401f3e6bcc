"""The control-plane benchmark runs end to end on a small scale (no timing asserted)."""

from __future__ import annotations

from eztunnel_lab.bench import xds as bench_xds


def test_bench_smoke() -> None:
    got = bench_xds.run(n=300, local=30, changes=5, rss=False)
    assert got["decode_ms_median"] > 0 and got["first_snapshot_to_sink_ms"] > 0
    assert got["change_to_sink_p99_ms"] >= got["change_to_sink_p50_ms"] > 0
