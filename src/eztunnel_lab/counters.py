"""The agent's BPF counters as the lab reads them: what one step of traffic moved."""

from __future__ import annotations

from collections.abc import Mapping

# The pairing rule of each spliced hop of an ambient connection: app <-> ztunnel in the
# client pod (capture), ztunnel <-> ztunnel across the pods, ztunnel <-> app in the server pod.
HOP_RULES = ("pairs_capture", "pairs_cross_mirror", "pairs_netns_mirror")


def delta(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    """How far each counter moved from `before` to `after` (one missing before was 0)."""
    return {name: value - before.get(name, 0) for name, value in after.items()}
