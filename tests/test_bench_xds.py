"""The control-plane benchmark runs end to end on a small scale (no timing asserted)."""

from __future__ import annotations

import asyncio

from eztunnel_lab.bench import xds as bench_xds


def test_bench_smoke() -> None:
    got = bench_xds.run(n=300, local=30, changes=5, rss=False)
    assert got["decode_ms_median"] > 0 and got["first_snapshot_to_sink_ms"] > 0
    assert got["change_to_sink_p99_ms"] >= got["change_to_sink_p50_ms"] > 0


def test_the_rss_row_runs_the_agent_as_the_chart_does() -> None:
    # The chart's defaults: the metrics listener serves a page, the health listener is ready.
    got = asyncio.run(bench_xds.bench_agent_rss(n=50, local=5))
    assert got["agent_metric_families"] > 10
    assert got["agent_ready_status"] == 200
    assert got["agent_local_endpoints"] == 5 and got["agent_rss_mb"] > 0
