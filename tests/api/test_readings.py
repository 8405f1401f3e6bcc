"""What the agent records at rest for its series: the push-to-map latency histogram.
(read_active_pairs is exercised on a live flow in test_metrics.py.)"""

from __future__ import annotations

import pytest

from eztunnel_plugin.api.readings import PUSH_BUCKETS, LatencyRecorder


def test_latency_recorder_buckets() -> None:
    r = LatencyRecorder((0.5, 1.0))
    assert r.snapshot().counts == (0, 0, 0)
    for seconds in (0.5, 0.75, 1.5, 0.1):
        r.observe(seconds)
    snap = r.snapshot()
    assert snap.counts == (2, 1, 1) and snap.total_s == pytest.approx(2.85)
    assert snap.bounds == (0.5, 1.0)


def test_the_default_buckets_span_a_change_to_a_first_snapshot() -> None:
    r = LatencyRecorder()
    for seconds in (0.0005, 0.3, 60.0):
        r.observe(seconds)
    snap = r.snapshot()
    assert snap.bounds == PUSH_BUCKETS and list(PUSH_BUCKETS) == sorted(PUSH_BUCKETS)
    assert snap.counts[0] == 1 and snap.counts[PUSH_BUCKETS.index(0.5)] == 1
    assert snap.counts[-1] == 1  # past the last bound: +Inf
